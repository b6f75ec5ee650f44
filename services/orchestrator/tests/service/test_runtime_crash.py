"""Worker processes that die, pause, stop or meet a poison run, over real Redis and gRPC.

Workers run as real processes (``python -m foredeck_orchestrator.worker``) with a 1.5 s
lease; the API runs in the test process, the scripted downstreams too. The toolrunner stand-in
keeps an effect ledger by idempotency key, so a duplicated side effect would show in it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from foredeck.common.v1 import journal_pb2, run_event_pb2, run_pb2
from foredeck_orchestrator.config import OrchestratorSettings
from services.orchestrator.tests.service.runtime_support import (
    Api,
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


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; every one is gone when the test ends."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


async def _start(
    workers: list[WorkerProcess],
    settings: OrchestratorSettings,
    tmp_path: Path,
    name: str,
    redis: Redis,
) -> WorkerProcess:
    worker = spawn_worker(settings, tmp_path, name)
    workers.append(worker)

    async def up() -> bool:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker exited: {worker.log()[-2000:]}")
        return await consumer_seen(redis, settings, worker.worker_id)

    await wait_for(up, within=60, what=f"worker {name} to consume")
    return worker


async def _journal(redis: Redis, run_id: str) -> list[journal_pb2.JournalEntry]:
    raws: Any = await redis.lrange(f"fdorch:run:{{{run_id}}}:journal", 0, -1)
    return [journal_pb2.JournalEntry.FromString(raw) for raw in raws]


async def _events(redis: Redis, run_id: str) -> list[run_event_pb2.RunEvent]:
    entries: Any = await redis.xrange(f"fdorch:run:{{{run_id}}}:events")
    return [run_event_pb2.RunEvent.FromString(fields[b"e"]) for _, fields in entries]


async def _owner(redis: Redis, run_id: str) -> str:
    owner: Any = await redis.hget(f"fdorch:run:{{{run_id}}}", "owner")
    return owner.decode() if owner else ""


async def _all_finished(api: Api, run_ids: list[str]) -> bool:
    return all([await api.finished(r) for r in run_ids])


async def test_a_killed_worker_s_runs_finish_once_with_no_tool_effect_repeated(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds, worker_concurrency=4)
        async with api_server(settings) as api:
            await api.create_agent()
            doomed = await _start(workers, settings, tmp_path, "doomed", redis_client)
            run_ids = [(await api.submit()).run.run_id for _ in range(4)]

            async def all_tools_called() -> bool:
                return len(ds.effects.executions) == 4

            # Every run has made its tool call (the effect happened) and waits for the answer.
            await wait_for(all_tools_called, what="four tool calls in flight")
            owners = {await _owner(redis_client, r) for r in run_ids}
            survivor = await _start(workers, settings, tmp_path, "survivor", redis_client)
            doomed.signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            ds.effects.gate.set()
            await wait_for(lambda: _all_finished(api, run_ids), within=60, what="every run")
            runs = [await api.run(r) for r in run_ids]
            journals = [await _journal(redis_client, r) for r in run_ids]
            events = [await _events(redis_client, r) for r in run_ids]

    assert owners == {doomed.worker_id}
    assert [r.status for r in runs] == [SUCCEEDED] * 4
    assert all(r.output == "Six times seven is 42." for r in runs)
    # Each tool effect happened exactly once, although every call was made twice.
    assert sorted(ds.effects.executions.values()) == [1, 1, 1, 1]
    assert sorted(ds.effects.calls.values()) == [2, 2, 2, 2]
    for journal, run_events in zip(journals, events, strict=True):
        tool_entries = [e for e in journal if e.kind == run_event_pb2.STEP_KIND_TOOL_CALL]
        assert len(tool_entries) == 1
        assert tool_entries[0].worker_id == survivor.worker_id
        finished = [e for e in run_events if e.WhichOneof("payload") == "run_finished"]
        assert len(finished) == 1
        # The plan the killed worker committed was reused, not made again.
        plans = [e for e in journal if e.kind == run_event_pb2.STEP_KIND_PLAN]
        assert len(plans) == 1
        assert plans[0].worker_id == doomed.worker_id


async def test_a_paused_worker_that_wakes_after_losing_its_lease_writes_nothing(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds, worker_concurrency=1)
        async with api_server(settings) as api:
            await api.create_agent()
            sleeper = await _start(workers, settings, tmp_path, "sleeper", redis_client)
            run_id = (await api.submit()).run.run_id
            await wait_for(
                lambda: asyncio.sleep(0, result=bool(ds.effects.executions)),
                what="the tool call",
            )
            sleeper.signal(signal.SIGSTOP)
            other = await _start(workers, settings, tmp_path, "other", redis_client)

            async def taken_over() -> bool:
                return await _owner(redis_client, run_id) == other.worker_id

            await wait_for(taken_over, what="the run to move to the other worker")
            ds.effects.gate.set()
            await wait_for(lambda: api.finished(run_id), what="the run to finish")
            journal_before = await _journal(redis_client, run_id)
            events_before = await _events(redis_client, run_id)
            sleeper.signal(signal.SIGCONT)
            await wait_for(
                lambda: asyncio.sleep(0, result="lease lost" in sleeper.log()),
                what="the paused worker to notice",
            )
            journal_after = await _journal(redis_client, run_id)
            events_after = await _events(redis_client, run_id)
            run = await api.run(run_id)

    assert run.status == SUCCEEDED
    assert journal_after == journal_before
    assert events_after == events_before
    assert sum(ds.effects.executions.values()) == 1
    tokens = {e.worker_id: e.fencing_token for e in journal_after}
    assert tokens[other.worker_id] > tokens.get(sleeper.worker_id, 0)
    assert [e.worker_id for e in journal_after if e.kind == run_event_pb2.STEP_KIND_TOOL_CALL] == [
        other.worker_id
    ]


async def test_a_poison_run_is_dead_lettered_and_the_others_complete(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams() as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds, worker_concurrency=2, max_deliveries=2)
        async with api_server(settings) as api:
            await api.create_agent()
            await api.create_agent("poison")
            poison = (await api.submit("poison")).run.run_id
            # The pinned version no longer decodes: no worker can ever drive this run.
            keys = [k async for k in redis_client.scan_iter("fdorch:agent:*")]
            for key in keys:
                stored: Any = await redis_client.hget(key, "v1")
                if stored and b"poison" in stored:
                    await redis_client.hset(key, "v1", b"\xff\xff not an agent")
            healthy = [(await api.submit()).run.run_id for _ in range(3)]
            await _start(workers, settings, tmp_path, "w", redis_client)
            await wait_for(
                lambda: _all_finished(api, [*healthy, poison]), within=60, what="every run"
            )
            dead = await api.run(poison)
            runs = [await api.run(r) for r in healthy]
            letters: Any = await redis_client.xrange("fdorch:dlq")
            events = await _events(redis_client, poison)
            pending = [
                await redis_client.xpending(q, "workers")
                for q in ("fdorch:queue:{high}", "fdorch:queue:{normal}", "fdorch:queue:{low}")
            ]

    assert dead.status == run_pb2.RUN_STATUS_DEAD_LETTERED
    assert dead.error.reason == "DELIVERY_LIMIT"
    assert [r.status for r in runs] == [SUCCEEDED] * 3
    assert [fields[b"run"].decode() for _, fields in letters] == [poison]
    assert events[-1].run_finished.status == run_pb2.RUN_STATUS_DEAD_LETTERED
    assert all(p["pending"] == 0 for p in pending)


async def test_sigterm_gives_in_flight_runs_back_at_once(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams() as ds:
        # A lease far longer than the test: only a prompt release lets the run move.
        settings = settings_for(redis_url, ds, worker_concurrency=2, lease_seconds=600)
        async with api_server(settings) as api:
            await api.create_agent()
            leaving = await _start(workers, settings, tmp_path, "leaving", redis_client)
            run_id = (await api.submit()).run.run_id
            await wait_for(
                lambda: asyncio.sleep(0, result=bool(ds.effects.executions)),
                what="the tool call",
            )
            staying = await _start(workers, settings, tmp_path, "staying", redis_client)
            leaving.signal(signal.SIGTERM)
            code = await asyncio.to_thread(leaving.process.wait, 30)

            async def moved() -> bool:
                return await _owner(redis_client, run_id) == staying.worker_id

            await wait_for(moved, what="the run to move")
            ds.effects.gate.set()
            await wait_for(lambda: api.finished(run_id), what="the run to finish")
            run = await api.run(run_id)
            deliveries = await redis_client.hget(f"fdorch:run:{{{run_id}}}", "deliveries")

    assert code == 0
    assert run.status == SUCCEEDED
    assert sum(ds.effects.executions.values()) == 1
    # The release on shutdown did not count as a delivery.
    assert deliveries == b"1"
