"""The API role and an in-process worker over real Redis and real gRPC: submit, run, watch,
idempotency, cancellation, priority and bad input."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from foredeck.common.v1 import run_event_pb2, run_pb2, usage_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck_kit.errors import error_details
from foredeck_orchestrator.adapters.keys import run_id_for
from foredeck_orchestrator.adapters.redis_runs import RedisRuns
from services.orchestrator.tests.service.runtime_support import (
    Api,
    api_server,
    downstreams,
    settings_for,
    wait_for,
    worker_in_process,
)

SUCCEEDED = run_pb2.RUN_STATUS_SUCCEEDED


async def _watch(api: Api, run_id: str, after: str = "") -> list[run_event_pb2.RunEvent]:
    events = []
    call = api.runs.WatchRun(
        pb.WatchRunRequest(run_id=run_id, after_event_id=after), metadata=api.md()
    )
    async with asyncio.timeout(30):
        async for reply in call:
            events.append(reply.event)
    return events


async def test_a_run_goes_from_submit_to_answer_and_watch_resumes_without_loss(
    redis_url: str,
) -> None:
    async with downstreams() as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent()
            submitted = await api.submit()
            assert submitted.created
            assert submitted.run.status == run_pb2.RUN_STATUS_QUEUED
            run_id = submitted.run.run_id
            # Watch from the start while the run has not begun, then stop after three events.
            call = api.runs.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=api.md())
            first: list[run_event_pb2.RunEvent] = []
            async with worker_in_process(settings):
                async with asyncio.timeout(30):
                    async for reply in call:
                        first.append(reply.event)
                        if len(first) == 3:
                            break
                call.cancel()
                rest = await _watch(api, run_id, after=first[-1].event_id)
                run = await api.run(run_id)
            everything = await _watch(api, run_id)

    assert run.status == SUCCEEDED
    assert run.output == "Six times seven is 42."
    assert run.step_count >= 3
    assert run.usage.input_tokens > 0
    ids = [e.event_id for e in first + rest]
    assert ids == [e.event_id for e in everything]
    assert len(set(ids)) == len(ids)
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    kinds = [e.WhichOneof("payload") for e in everything]
    assert kinds[0] == "status_changed"
    assert kinds[-1] == "run_finished"
    assert "tool_call_finished" in kinds
    assert "token_delta" in kinds
    assert everything[-1].run_finished.status == SUCCEEDED
    assert sum(ds.effects.executions.values()) == 1


async def test_fifty_concurrent_submits_of_one_request_id_make_one_run(redis_url: str) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent()
            request_id = uuid.uuid4().hex
            replies = await asyncio.gather(*(api.submit(request_id=request_id) for _ in range(50)))
            queued = await api.host.redis.xlen("fdorch:queue:{normal}")  # type: ignore[union-attr]
            listed = await api.runs.ListRuns(pb.ListRunsRequest(), metadata=api.md())
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await api.submit(request_id=request_id, text="another task")
    assert sum(r.created for r in replies) == 1
    assert len({r.run.run_id for r in replies}) == 1
    assert queued == 1
    assert [r.run_id for r in listed.runs] == [replies[0].run.run_id]
    assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(reused.value).reason == "REQUEST_ID_REUSED"


async def test_bad_input_is_refused_with_typed_errors(redis_url: str) -> None:
    async with downstreams() as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent(budget=usage_pb2.Budget(max_steps=10))

            async def error_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str | None]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                details = error_details(caught.value)
                assert details.domain == "orchestrator.foredeck.dev"
                return caught.value.code(), details.reason

            assert await error_of(api.submit("nobody")) == (
                grpc.StatusCode.NOT_FOUND,
                "AGENT_NOT_FOUND",
            )
            assert await error_of(api.submit(agent_version=7)) == (
                grpc.StatusCode.NOT_FOUND,
                "AGENT_VERSION_NOT_FOUND",
            )
            assert await error_of(api.submit(budget=usage_pb2.Budget(max_steps=-1))) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "BUDGET_INVALID",
            )
            assert await error_of(api.submit(budget=usage_pb2.Budget(max_steps=11))) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "BUDGET_INVALID",
            )
            wall = usage_pb2.Budget(max_wall_time=Duration(seconds=-1))
            assert await error_of(api.submit(budget=wall)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "BUDGET_INVALID",
            )
            assert await error_of(api.submit(text="")) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_REQUEST",
            )
            run_id = (await api.submit()).run.run_id
            other_tenant = api.runs.GetRun(
                pb.GetRunRequest(run_id=run_id), metadata=api.md(tenant_id="tenant-b")
            )
            assert await error_of(other_tenant) == (grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
            other_user = api.runs.GetRun(
                pb.GetRunRequest(run_id=run_id),
                metadata=api.md(user_id="user-b", permissions=("runs:read",)),
            )
            assert await error_of(other_user) == (grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
            bad_event = api.runs.WatchRun(
                pb.WatchRunRequest(run_id=run_id, after_event_id="nope"), metadata=api.md()
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in bad_event:
                    pass
            assert error_details(caught.value).reason == "EVENT_ID_INVALID"
            async with worker_in_process(settings):
                await wait_for(lambda: api.finished(run_id), what="the run to finish")
            finished = api.runs.CancelRun(pb.CancelRunRequest(run_id=run_id), metadata=api.md())
            assert await error_of(finished) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "RUN_ALREADY_FINISHED",
            )
            replay = api.runs.ReplayRun(pb.ReplayRunRequest(run_id=""), metadata=api.md())
            assert await error_of(replay) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
            journal = await api.runs.ListJournalEntries(
                pb.ListJournalEntriesRequest(run_id=run_id), metadata=api.md()
            )
    assert [e.entry_index for e in journal.entries] == list(range(1, len(journal.entries) + 1))
    assert all(not e.HasField("tool_exchange") for e in journal.entries)


async def test_cancelling_a_run_stops_its_downstream_calls(redis_url: str) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent()
            run_id = (await api.submit()).run.run_id
            async with worker_in_process(settings) as worker:
                async with asyncio.timeout(30):
                    await ds.effects.arrived.wait()
                reply = await api.runs.CancelRun(
                    pb.CancelRunRequest(run_id=run_id, reason="changed my mind"),
                    metadata=api.md(),
                )
                assert worker.worker is not None
                held = worker.worker.held
                await wait_for(
                    lambda: asyncio.sleep(0, result=ds.effects.cancelled == 1 and not held),
                    what="the tool call to be cancelled",
                )
                again = await api.runs.CancelRun(
                    pb.CancelRunRequest(run_id=run_id), metadata=api.md()
                )
                calls = sum(ds.effects.calls.values()) + sum(ds.script.counts.values())
            events = await asyncio.wait_for(_watch(api, run_id), 30)
            run = await api.run(run_id)
    assert reply.run.status == run_pb2.RUN_STATUS_CANCELLED
    assert again.run.status == run_pb2.RUN_STATUS_CANCELLED
    assert run.status == run_pb2.RUN_STATUS_CANCELLED
    assert run.error.reason == "RUN_CANCELLED"
    # The plan call and the one tool call, nothing after the cancellation.
    assert calls == 2
    assert events[-1].run_finished.status == run_pb2.RUN_STATUS_CANCELLED
    assert [e.WhichOneof("payload") for e in events].count("run_finished") == 1


async def test_high_priority_goes_first_and_low_priority_is_not_starved(redis_url: str) -> None:
    async with downstreams() as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds, worker_concurrency=1)
        async with api_server(settings) as api:
            await api.create_agent()
            high = [
                (await api.submit(priority=run_pb2.PRIORITY_HIGH)).run.run_id for _ in range(12)
            ]
            low = [(await api.submit(priority=run_pb2.PRIORITY_LOW)).run.run_id for _ in range(3)]
            async with worker_in_process(settings):

                async def all_done() -> bool:
                    return all([await api.finished(r) for r in high + low])

                await wait_for(all_done, within=60, what="every run to finish")
    plans = [key.split(":")[0] for method, key in ds.script.calls if method == "Generate"]
    order = list(dict.fromkeys(plans))
    assert order[0] in high
    positions = [order.index(r) for r in low]
    # Weights 4,2,1 with an empty normal queue: at least one low run in every seven.
    assert min(positions) <= 7
    assert min(positions) < max(order.index(r) for r in high)


async def test_the_first_runs_naming_default_share_one_built_in_agent(redis_url: str) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            replies = await asyncio.gather(*(api.submit("default") for _ in range(10)))
            agent = await api.agents.GetAgent(
                pb.GetAgentRequest(agent_name="default"), metadata=api.md()
            )
            versions = await api.agents.ListAgentVersions(
                pb.ListAgentVersionsRequest(agent_name="default"), metadata=api.md()
            )
            other_tenant = await api.runs.SubmitRun(
                pb.SubmitRunRequest(
                    agent_name="default", input="hello", request_id=uuid.uuid4().hex
                ),
                metadata=api.md(tenant_id="tenant-b"),
            )
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await api.submit("helper")
    assert {r.run.agent_name for r in replies} == {"default"}
    assert {r.run.agent_version for r in replies} == {1}
    assert len(versions.agents) == 1
    assert agent.agent.allowed_tools == ["calculator", "current_time", "python"]
    assert agent.agent.memory_policy.recall_enabled
    assert agent.agent.memory_policy.remember_results
    assert other_tenant.run.agent_version == 1
    # Only `default` is made on demand: any other unknown agent is still NOT_FOUND.
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_run_recorded_by_a_submitter_that_died_before_queueing_it_still_runs(
    redis_url: str, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with downstreams() as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent()
            runs = api.host.runs
            assert runs is not None

            async def dies_here(*args: object, **kwargs: object) -> str:
                raise RedisConnectionError("the submitter stopped between its two writes")

            monkeypatch.setattr(runs, "enqueue", dies_here)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await api.submit(request_id="half-done")
            monkeypatch.undo()
            run_id = run_id_for("tenant-a", "half-done")
            recorded = await api.run(run_id)
            queued = await redis_client.xlen("fdorch:queue:{normal}")
            # The submission's note is old enough for a sweeper to take over.
            await redis_client.zadd("fdorch:submitting:{s}", {run_id: 1})
            async with worker_in_process(settings):
                await wait_for(lambda: api.finished(run_id), what="the swept run to finish")
            run = await api.run(run_id)
            note = await redis_client.zscore("fdorch:submitting:{s}", run_id)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert recorded.status == run_pb2.RUN_STATUS_QUEUED
    assert queued == 0
    assert run.status == SUCCEEDED
    assert note is None


async def test_watch_resumes_right_before_trimmed_events_and_refuses_past_them(
    redis_url: str,
) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds, event_retention=100)
        async with api_server(settings) as api:
            await api.create_agent()
            run_id = (await api.submit()).run.run_id  # no worker: it stays queued
            assert api.host.runs is not None
            runs: RedisRuns = api.host.runs
            claim = await runs.claim(run_id, "test-worker", 60_000, 5)
            # A long run: many more events than the stream keeps.
            published: list[str] = []
            for index in range(300):
                event = run_event_pb2.RunEvent(
                    step_started=run_event_pb2.StepStarted(step_id=f"s{index}")
                )
                published.append(await runs.publish(run_id, claim.token, event.SerializeToString()))
            kept = [e.event_id for e in await runs.events_after(run_id, "0-0")]
            trimmed = await runs.trimmed_through(run_id)

            async def first_events(after: str, count: int) -> list[str]:
                stream = api.runs.WatchRun(
                    pb.WatchRunRequest(run_id=run_id, after_event_id=after), metadata=api.md()
                )
                seen: list[str] = []
                async for reply in stream:
                    seen.append(reply.event.event_id)
                    if len(seen) == count:
                        break
                stream.cancel()
                return seen

            # From the newest trimmed event nothing is lost: it resumes at the oldest kept one.
            resumed = await first_events(trimmed, 3)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await first_events(published[published.index(trimmed) - 1], 1)
    assert len(kept) == 100
    assert published[published.index(trimmed) + 1] == kept[0]
    assert resumed == kept[:3]
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_details(refused.value).reason == "EVENTS_TRIMMED"
    assert dict(error_details(refused.value).metadata)["oldestEventId"] == kept[0]
