"""Sub-agent runs over real Redis, real gRPC and a real worker process: the run tree, budgets
drawn from the parent, and a cancelled parent taking its children with it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from foredeck.common.v1 import agent_pb2, journal_pb2, run_event_pb2, run_pb2, usage_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck_orchestrator.config import OrchestratorSettings
from services.orchestrator.tests.loop_support import plan_text, reason_step, tool_step
from services.orchestrator.tests.service.loop_stand_ins import Script
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
CANCELLED = run_pb2.RUN_STATUS_CANCELLED


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; every one is gone when the test ends."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


async def start_worker(
    workers: list[WorkerProcess], settings: OrchestratorSettings, tmp_path: Path, redis: Redis
) -> WorkerProcess:
    """A worker process, once it consumes from the queues."""
    worker = spawn_worker(settings, tmp_path, "w")
    workers.append(worker)

    async def up() -> bool:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker exited: {worker.log()[-2000:]}")
        return await consumer_seen(redis, settings, worker.worker_id)

    await wait_for(up, within=60, what="the worker to consume")
    return worker


def script() -> Script:
    """The parent (recall on, so its plan is s2) hands the task to ``helper`` (plan s1)."""
    delegate = {
        "kind": "sub_agent",
        "description": "ask the helper",
        "agent_name": "helper",
        "input": "What is 6 times 7?",
    }
    return Script(
        plans={
            "s2": plan_text(delegate),
            "s1": plan_text(tool_step("calculator", {"expression": "6*7"})),
        }
    )


async def create_agents(api: Api) -> None:
    await api.create_agent("helper")
    await api.create_agent(
        "boss",
        allowed_sub_agents=["helper"],
        memory_policy=agent_pb2.MemoryPolicy(recall_enabled=True),
        budget=usage_pb2.Budget(max_tokens=1000, max_sub_agent_depth=1, max_sub_agents=2),
    )


async def tree(api: Api, run_id: str) -> list[run_pb2.Run]:
    reply = await api.runs.GetRunTree(pb.GetRunTreeRequest(run_id=run_id), metadata=api.md())
    return list(reply.runs)


async def test_a_sub_agent_runs_within_its_parent_s_budget_and_the_tree_lists_it(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams(script()) as ds:
        ds.effects.gate.set()
        # One run at a time: the parent must give its slot up while its child runs.
        settings = settings_for(redis_url, ds, worker_concurrency=1)
        async with api_server(settings) as api:
            await create_agents(api)
            await start_worker(workers, settings, tmp_path, redis_client)
            parent_id = (await api.submit("boss")).run.run_id
            await wait_for(lambda: api.finished(parent_id), within=60, what="the parent")
            runs = await tree(api, parent_id)
            raws: Any = await redis_client.lrange(f"fdorch:run:{{{parent_id}}}:journal", 0, -1)

    parent, child = runs
    entries = [journal_pb2.JournalEntry.FromString(raw) for raw in raws]
    step = next(e for e in entries if e.kind == run_event_pb2.STEP_KIND_SUB_AGENT)
    assert parent.run_id == parent_id
    assert parent.status == SUCCEEDED
    assert parent.output == "Six times seven is 42."
    assert child.status == SUCCEEDED
    assert child.agent_name == "helper"
    assert child.input == "What is 6 times 7?"
    assert (child.parent_run_id, child.parent_step_id) == (parent_id, "s2.1")
    assert step.step_id == "s2.1"
    assert step.child_run_id == child.run_id
    assert step.sub_agent.status == SUCCEEDED
    assert step.sub_agent.output == child.output
    # The child's caps are what the parent had left when it started it.
    used_before = sum(
        e.usage.input_tokens + e.usage.output_tokens
        for e in entries
        if e.entry_index < step.entry_index
    )
    assert child.budget.max_tokens == 1000 - used_before
    assert child.budget.max_sub_agent_depth == 0
    # What the child consumed is counted in the parent's usage, within the parent's cap.
    child_tokens = child.usage.input_tokens + child.usage.output_tokens
    parent_tokens = parent.usage.input_tokens + parent.usage.output_tokens
    assert step.usage == child.usage
    assert parent_tokens >= used_before + child_tokens
    assert parent_tokens <= 1000


async def test_cancelling_a_parent_leaves_no_child_running(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with downstreams(script()) as ds:
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await create_agents(api)
            await start_worker(workers, settings, tmp_path, redis_client)
            parent_id = (await api.submit("boss")).run.run_id
            # The child's tool call is in flight (the stand-in holds its answer).
            await wait_for(
                lambda: asyncio.sleep(0, result=ds.effects.arrived.is_set()),
                within=60,
                what="the child's tool call",
            )
            parent_key = f"fdorch:run:{{{parent_id}}}"

            async def parent_parked() -> bool:
                waiting: Any = await redis_client.hget(parent_key, "waiting_child")
                return bool(waiting)

            await wait_for(parent_parked, what="the parent to give its worker up")
            parked: Any = await redis_client.hmget(parent_key, ["owner", "lease", "status"])
            await api.runs.CancelRun(pb.CancelRunRequest(run_id=parent_id), metadata=api.md())
            runs = await tree(api, parent_id)
            await wait_for(
                lambda: asyncio.sleep(0, result=ds.effects.cancelled == 1),
                what="the child's tool call to be cancelled",
            )

    # While its child ran, nothing held the parent.
    assert parked == [b"", b"0", str(run_pb2.RUN_STATUS_RUNNING).encode()]
    assert len(runs) == 2
    assert [r.status for r in runs] == [CANCELLED, CANCELLED]
    assert runs[1].parent_run_id == parent_id


async def test_a_failed_child_reaches_its_parent_as_a_step_result_it_replans_on(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    # The helper's plans all name a tool it may not use, then its model has no plan: it fails.
    # The parent (recall s1, plan s2, the sub-agent step) replans at s4 and uses a tool itself.
    broken = script()
    broken.plans["s1"] = plan_text(tool_step("forbidden", {}))
    broken.plans["s4"] = plan_text(tool_step("calculator", {"expression": "6*7"}))
    async with downstreams(broken) as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await create_agents(api)
            await start_worker(workers, settings, tmp_path, redis_client)
            parent_id = (await api.submit("boss")).run.run_id
            await wait_for(lambda: api.finished(parent_id), within=60, what="the parent")
            runs = await tree(api, parent_id)
            raws: Any = await redis_client.lrange(f"fdorch:run:{{{parent_id}}}:journal", 0, -1)

    parent, child = runs
    entries = [journal_pb2.JournalEntry.FromString(raw) for raw in raws]
    step = next(e for e in entries if e.kind == run_event_pb2.STEP_KIND_SUB_AGENT)
    assert child.status == run_pb2.RUN_STATUS_FAILED
    assert step.outcome == journal_pb2.JOURNAL_ENTRY_OUTCOME_FAILED
    assert step.error.reason == "STEP_FAILED"
    assert step.error.metadata["childRunId"] == child.run_id
    assert step.error.metadata["upstreamReason"] == child.error.reason
    assert [e.step_id for e in entries if e.kind == run_event_pb2.STEP_KIND_REPLAN] == ["s4"]
    assert parent.status == SUCCEEDED
    assert ds.effects.executions[f"{parent_id}:s4.1"] == 1


async def test_a_sub_agent_past_the_parent_s_fan_out_is_refused_and_replanned(
    redis_url: str, redis_client: Redis, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    two = script()
    delegate = json.loads(two.plans["s2"])["steps"][0]
    two.plans["s2"] = plan_text(delegate, {**delegate, "description": "ask again"})
    two.plans["s5"] = plan_text(reason_step("sum up"))
    async with downstreams(two) as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds)
        async with api_server(settings) as api:
            await api.create_agent("helper")
            await api.create_agent(
                "boss",
                allowed_sub_agents=["helper"],
                memory_policy=agent_pb2.MemoryPolicy(recall_enabled=True),
                budget=usage_pb2.Budget(max_sub_agent_depth=3, max_sub_agents=1),
            )
            await start_worker(workers, settings, tmp_path, redis_client)
            parent_id = (await api.submit("boss")).run.run_id
            await wait_for(lambda: api.finished(parent_id), within=60, what="the parent")
            runs = await tree(api, parent_id)
            raws: Any = await redis_client.lrange(f"fdorch:run:{{{parent_id}}}:journal", 0, -1)

    entries = [journal_pb2.JournalEntry.FromString(raw) for raw in raws]
    refused = next(e for e in entries if e.step_id == "s2.2")
    assert len(runs) == 2
    assert runs[0].status == SUCCEEDED
    # The one child may start none of its own: the parent's fan-out is spent.
    assert runs[1].budget.max_sub_agent_depth == 0
    assert refused.outcome == journal_pb2.JOURNAL_ENTRY_OUTCOME_FAILED
    assert refused.error.reason == "SUB_AGENT_LIMIT"
    assert refused.error.metadata["budget"] == "max_sub_agents"
    assert [e.step_id for e in entries if e.kind == run_event_pb2.STEP_KIND_REPLAN] == ["s5"]
