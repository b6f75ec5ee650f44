"""ReplayRun and ForkRun over real Redis, real gRPC and a real worker process.

The scripted downstreams count every call they receive, so a replay that called anything, or
a fork that re-executed a step of its reused prefix, would show in the counts.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from foredeck.common.v1 import agent_pb2, journal_pb2, run_event_pb2, run_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck_kit.errors import error_details
from foredeck_orchestrator.config import OrchestratorSettings
from services.orchestrator.tests.loop_support import plan_text, reason_step, tool_step
from services.orchestrator.tests.service.loop_stand_ins import Script
from services.orchestrator.tests.service.runtime_support import (
    Api,
    Downstreams,
    WorkerProcess,
    api_server,
    consumer_seen,
    downstreams,
    settings_for,
    spawn_worker,
    wait_for,
)

pytestmark = pytest.mark.slow

SUCCEEDED = run_pb2.RUN_STATUS_SUCCEEDED
MEMORY = agent_pb2.MemoryPolicy(recall_enabled=True, remember_results=True)


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; every one is gone when the test ends."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


async def start_worker(
    workers: list[WorkerProcess],
    settings: OrchestratorSettings,
    tmp_path: Path,
    redis: Redis,
    name: str = "w",
) -> WorkerProcess:
    """A worker process, once it consumes from the queues."""
    worker = spawn_worker(settings, tmp_path, name)
    workers.append(worker)

    async def up() -> bool:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker exited: {worker.log()[-2000:]}")
        return await consumer_seen(redis, settings, worker.worker_id)

    await wait_for(up, within=60, what=f"worker {name} to consume")
    return worker


def script() -> Script:
    """Recall, a plan of a tool call and a reasoning step, synthesis, remember."""
    return Script(
        plans={
            "s2": plan_text(
                tool_step("calculator", {"expression": "6*7"}), reason_step("check the product")
            )
        }
    )


def calls(ds: Downstreams) -> Counter[str]:
    """Every call the stand-ins received, by method (tool calls by effect key)."""
    seen = Counter(ds.script.counts)
    for key, count in ds.effects.calls.items():
        seen[f"ExecuteTool {key}"] += count
    return seen


async def finished_run(api: Api, **fields: Any) -> run_pb2.Run:
    """Submit a run and wait for it to finish."""
    run_id = (await api.submit(**fields)).run.run_id
    await wait_for(lambda: api.finished(run_id), within=60, what="the run to finish")
    return await api.run(run_id)


async def test_a_replay_gives_the_recorded_result_with_no_downstream_call(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams(script()) as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent(memory_policy=MEMORY)
            # Submitted while no worker runs: it stays queued, not finished.
            waiting = (await api.submit(text="later")).run.run_id
            with pytest.raises(grpc.aio.AioRpcError) as unfinished:
                await api.runs.ReplayRun(pb.ReplayRunRequest(run_id=waiting), metadata=api.md())
            await start_worker(workers, settings, tmp_path, redis_client)
            run = await finished_run(api)
            # A newer version that would plan differently: the replay keeps the pinned one.
            await api.agents.CreateAgentVersion(
                pb.CreateAgentVersionRequest(
                    agent=agent_pb2.Agent(name="helper", allowed_tools=["other"]),
                    request_id=uuid.uuid4().hex,
                ),
                metadata=api.md(),
            )
            before = calls(ds)
            replay = await api.runs.ReplayRun(
                pb.ReplayRunRequest(run_id=run.run_id, strict=True), metadata=api.md()
            )
            again = await api.runs.ReplayRun(
                pb.ReplayRunRequest(run_id=run.run_id), metadata=api.md()
            )
            after = calls(ds)
            # The run's published events say a step ended otherwise than its journal entry: the
            # replay's own events for that step no longer match, so it is not identical.
            events_key = f"fdorch:run:{{{run.run_id}}}:events"
            recorded_events: Any = await redis_client.xrange(events_key)
            finished_steps = [
                run_event_pb2.RunEvent.FromString(fields[b"e"]).step_finished
                for _, fields in recorded_events
                if run_event_pb2.RunEvent.FromString(fields[b"e"]).HasField("step_finished")
            ]
            altered = run_event_pb2.RunEvent(
                step_finished=run_event_pb2.StepFinished(
                    step_id=finished_steps[1].step_id, success=True, summary="something else"
                )
            )
            altered_id: Any = await redis_client.xadd(
                events_key, {"e": altered.SerializeToString(), "s": 999, "t": 0}
            )
            events_differ = await api.runs.ReplayRun(
                pb.ReplayRunRequest(run_id=run.run_id), metadata=api.md()
            )
            await redis_client.xdel(events_key, altered_id)
            journal: Any = await redis_client.lrange(f"fdorch:run:{{{run.run_id}}}:journal", 0, -1)
            # The journal loses its last entries: the replay now needs steps it does not hold.
            await redis_client.ltrim(f"fdorch:run:{{{run.run_id}}}:journal", 0, len(journal) - 3)
            diverged = await api.runs.ReplayRun(
                pb.ReplayRunRequest(run_id=run.run_id), metadata=api.md()
            )
            with pytest.raises(grpc.aio.AioRpcError) as strict:
                await api.runs.ReplayRun(
                    pb.ReplayRunRequest(run_id=run.run_id, strict=True), metadata=api.md()
                )

    assert unfinished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(unfinished.value).reason == "RUN_NOT_FINISHED"
    assert run.status == SUCCEEDED
    assert min(before["Generate"], before["Recall"], before["Remember"]) > 0
    # Not one downstream call for either replay.
    assert after == before
    assert replay.status == run.status
    assert replay.output == run.output == "Six times seven is 42."
    assert replay.identical
    assert not replay.HasField("divergence")
    assert replay.replayed_entry_count == len(journal) == run.step_count
    assert replay.recorded_usage == run.usage
    assert again == replay
    assert not events_differ.identical
    assert events_differ.status == run.status
    assert events_differ.divergence.step_id == finished_steps[1].step_id
    assert "events" in events_differ.divergence.description
    assert not diverged.identical
    assert diverged.status == run_pb2.RUN_STATUS_FAILED
    assert diverged.error.reason == "REPLAY_DIVERGED"
    last = journal_pb2.JournalEntry.FromString(journal[-2])
    assert diverged.divergence.step_id == last.step_id
    assert diverged.replayed_entry_count == len(journal) - 2
    assert strict.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(strict.value).reason == "REPLAY_DIVERGED"
    assert dict(error_details(strict.value).metadata)["stepId"] == last.step_id


async def fork(api: Api, run_id: str, step: int, request_id: str, **fields: Any) -> Any:
    """ForkRun's reply."""
    return await api.runs.ForkRun(
        pb.ForkRunRequest(run_id=run_id, from_step_index=step, request_id=request_id, **fields),
        metadata=api.md(),
    )


async def test_a_fork_reuses_the_prefix_by_reference_and_runs_the_rest_under_new_keys(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams(script()) as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent(memory_policy=MEMORY)
            await start_worker(workers, settings, tmp_path, redis_client)
            source = await finished_run(api)
            await api.agents.CreateAgentVersion(
                pb.CreateAgentVersionRequest(
                    agent=agent_pb2.Agent(name="helper", system_prompt="Be terse."),
                    request_id=uuid.uuid4().hex,
                ),
                metadata=api.md(),
            )
            raws: Any = await redis_client.lrange(f"fdorch:run:{{{source.run_id}}}:journal", 0, -1)
            source_journal = [journal_pb2.JournalEntry.FromString(raw) for raw in raws]
            tool_step_index = next(
                e.step_index for e in source_journal if e.kind == run_event_pb2.STEP_KIND_TOOL_CALL
            )
            before = calls(ds)
            request_id = uuid.uuid4().hex
            first = await fork(api, source.run_id, tool_step_index, request_id)
            retry = await fork(api, source.run_id, tool_step_index, request_id)
            fork_id = first.run.run_id
            await wait_for(lambda: api.finished(fork_id), within=60, what="the fork to finish")
            forked = await api.run(fork_id)
            after = calls(ds)
            own: Any = await redis_client.lrange(f"fdorch:run:{{{fork_id}}}:journal", 0, -1)
            listed = await api.runs.ListJournalEntries(
                pb.ListJournalEntriesRequest(run_id=fork_id), metadata=api.md()
            )
            replay = await api.runs.ReplayRun(
                pb.ReplayRunRequest(run_id=fork_id, strict=True), metadata=api.md()
            )
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await fork(api, source.run_id, 1, request_id)
            with pytest.raises(grpc.aio.AioRpcError) as no_step:
                await fork(api, source.run_id, 99, uuid.uuid4().hex)
            with pytest.raises(grpc.aio.AioRpcError) as no_version:
                await fork(api, source.run_id, 2, uuid.uuid4().hex, agent_version=7)

    assert first.created
    assert not retry.created
    assert retry.run.run_id == fork_id
    assert forked.status == SUCCEEDED
    assert forked.output == source.output
    assert forked.forked_from_run_id == source.run_id
    assert forked.agent_version == source.agent_version == 1
    delta = after - before
    # The prefix (recall and plan) was reused, not re-executed.
    assert delta["Recall"] == 0
    assert f"{fork_id}:s2:1" not in [key for _, key in ds.script.calls]
    # The fork's tool call ran once, under the fork's own key; the source's was not repeated.
    assert delta[f"ExecuteTool {fork_id}:s2.1"] == 1
    assert delta[f"ExecuteTool {source.run_id}:s2.1"] == 0
    assert delta["Generate"] == 1  # the reasoning step, live
    assert delta["StreamGenerate"] == 1
    # Nothing copied: the fork's own list holds only its own entries, numbered after the prefix.
    prefix = tool_step_index - 1
    own_entries = [journal_pb2.JournalEntry.FromString(raw) for raw in own]
    assert len(own_entries) == len(source_journal) - prefix
    assert {e.run_id for e in own_entries} == {fork_id}
    assert own_entries[0].entry_index == prefix + 1
    assert own_entries[0].step_id == "s2.1"
    whole = list(listed.entries)
    assert [e.entry_index for e in whole] == list(range(1, len(source_journal) + 1))
    assert [e.run_id for e in whole[:prefix]] == [source.run_id] * prefix
    assert replay.identical
    assert replay.replayed_entry_count == len(source_journal)
    assert error_details(reused.value).reason == "REQUEST_ID_REUSED"
    assert no_step.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(no_step.value).reason == "STEP_NOT_FOUND"
    assert error_details(no_version.value).reason == "AGENT_VERSION_NOT_FOUND"


async def test_a_fork_whose_source_expired_fails_with_journal_expired(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams(script()) as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent(memory_policy=MEMORY)
            first = await start_worker(workers, settings, tmp_path, redis_client, "first")
            source = await finished_run(api)
            first.stop()
            fork_id = (await fork(api, source.run_id, 3, uuid.uuid4().hex)).run.run_id
            # The source's keys expire before any worker takes the fork up.
            await redis_client.delete(
                f"fdorch:run:{{{source.run_id}}}", f"fdorch:run:{{{source.run_id}}}:journal"
            )
            await start_worker(workers, settings, tmp_path, redis_client, "second")
            await wait_for(lambda: api.finished(fork_id), within=60, what="the fork to end")
            forked = await api.run(fork_id)

    assert forked.status == run_pb2.RUN_STATUS_FAILED
    assert forked.error.reason == "JOURNAL_EXPIRED"
