"""Traces, metrics and concurrency limits of the runtime, with an in-process API and worker."""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from foredeck.common.v1 import journal_pb2, run_pb2
from foredeck_kit.telemetry import setup_telemetry
from services.orchestrator.tests.service.runtime_support import (
    api_server,
    downstreams,
    settings_for,
    wait_for,
    worker_in_process,
)


async def test_a_run_s_worker_spans_join_the_submitter_s_trace_and_metrics_follow(
    redis_url: str, redis_client: Redis
) -> None:
    exporter = InMemorySpanExporter()
    async with downstreams() as ds:
        ds.effects.gate.set()
        settings = settings_for(redis_url, ds, trace_sample_ratio=1.0)
        telemetry = setup_telemetry(
            "orchestrator",
            settings,
            environ={},
            span_exporter=exporter,
            set_global=False,
            configure_logs=False,
        )
        try:
            async with api_server(settings, telemetry) as api:
                await api.create_agent()
                run_id = (await api.submit()).run.run_id
                async with worker_in_process(settings, telemetry):
                    await wait_for(lambda: api.finished(run_id), what="the run to finish")
                raws: Any = await redis_client.lrange(f"fdorch:run:{{{run_id}}}:journal", 0, -1)
            metrics = telemetry.metrics.registry
            executions = metrics.get_sample_value(
                "agent_execution_seconds_count", {"task_type": "run", "model": "scripted"}
            )
            concurrent = metrics.get_sample_value(
                "agent_concurrent_executions", {"user_tier": "user"}
            )
        finally:
            telemetry.shutdown()
    spans = exporter.get_finished_spans()
    submit = next(s for s in spans if s.name.endswith("RunService/SubmitRun"))
    run_span = next(s for s in spans if s.name == "orchestrator.run")
    steps = [s for s in spans if s.name.startswith("step ")]
    trace_id = submit.context.trace_id
    assert run_span.context.trace_id == trace_id
    assert run_span.parent is not None
    assert run_span.parent.span_id == submit.context.span_id
    assert steps
    assert {s.context.trace_id for s in steps} == {trace_id}
    entries = [journal_pb2.JournalEntry.FromString(raw) for raw in raws]
    assert {e.trace_id for e in entries} == {format(trace_id, "032x")}
    assert executions == 1.0
    assert concurrent == 0.0


async def test_the_per_user_limit_holds_across_workers(redis_url: str) -> None:
    async with downstreams() as ds:
        settings = settings_for(redis_url, ds, user_concurrency_limit=2, worker_concurrency=4)
        async with api_server(settings) as api:
            await api.create_agent()
            run_ids = [(await api.submit()).run.run_id for _ in range(5)]
            async with worker_in_process(settings), worker_in_process(settings):
                await wait_for(
                    lambda: asyncio.sleep(0, result=len(ds.effects.executions) == 2),
                    what="two runs to reach their tool call",
                )
                statuses = [(await api.run(r)).status for r in run_ids]
                in_flight = len(ds.effects.executions)
                ds.effects.gate.set()

                async def all_done() -> bool:
                    return all([await api.finished(r) for r in run_ids])

                await wait_for(all_done, what="every run to finish")
                final = [(await api.run(r)).status for r in run_ids]
    # Eight worker slots, but only two of this user's runs ever hold an execution slot.
    assert in_flight == 2
    assert statuses.count(run_pb2.RUN_STATUS_RUNNING) == 2
    assert statuses.count(run_pb2.RUN_STATUS_QUEUED) == 3
    assert final == [run_pb2.RUN_STATUS_SUCCEEDED] * 5
