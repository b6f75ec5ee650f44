"""Spans of replays, forks and sub-agent runs, with an in-process API and worker."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from foredeck.common.v1 import agent_pb2, usage_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck_kit.telemetry import setup_telemetry
from services.orchestrator.tests.loop_support import plan_text, tool_step
from services.orchestrator.tests.service.loop_stand_ins import Script
from services.orchestrator.tests.service.runtime_support import (
    api_server,
    downstreams,
    settings_for,
    wait_for,
    worker_in_process,
)


async def test_children_join_the_parent_s_trace_and_replays_and_forks_have_spans(
    redis_url: str,
) -> None:
    delegate = {
        "kind": "sub_agent",
        "description": "ask the helper",
        "agent_name": "helper",
        "input": "What is 6 times 7?",
    }
    script = Script(
        plans={
            "s2": plan_text(delegate),
            "s1": plan_text(tool_step("calculator", {"expression": "6*7"})),
        }
    )
    exporter = InMemorySpanExporter()
    async with downstreams(script) as ds:
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
                await api.create_agent("helper")
                await api.create_agent(
                    "boss",
                    allowed_sub_agents=["helper"],
                    memory_policy=agent_pb2.MemoryPolicy(recall_enabled=True),
                    budget=usage_pb2.Budget(max_sub_agent_depth=1),
                )
                parent_id = (await api.submit("boss")).run.run_id
                async with worker_in_process(settings, telemetry):
                    await wait_for(lambda: api.finished(parent_id), what="the parent")
                    replay = await api.runs.ReplayRun(
                        pb.ReplayRunRequest(run_id=parent_id), metadata=api.md()
                    )
                    forked = await api.runs.ForkRun(
                        pb.ForkRunRequest(run_id=parent_id, from_step_index=3, request_id="f1"),
                        metadata=api.md(),
                    )
                    fork_id = forked.run.run_id
                    await wait_for(lambda: api.finished(fork_id), what="the fork")
        finally:
            telemetry.shutdown()
    spans = exporter.get_finished_spans()
    runs = {
        str((s.attributes or {}).get("foredeck.run_id")): s
        for s in spans
        if s.name == "orchestrator.run"
    }
    parent = runs.pop(parent_id)
    fork = runs.pop(fork_id)
    # One child for the parent and one for the fork (its sub-agent step ran live).
    assert len(runs) == 2
    sub_agent_steps = {s.context.span_id: s for s in spans if s.name == "step sub_agent"}
    for child in runs.values():
        assert child.parent is not None
        step = sub_agent_steps[child.parent.span_id]
        assert child.context.trace_id == step.context.trace_id
    assert {s.context.trace_id for s in sub_agent_steps.values()} == {
        parent.context.trace_id,
        fork.context.trace_id,
    }
    assert replay.identical
    replay_span = next(s for s in spans if s.name == "orchestrator.replay")
    replay_rpc = next(s for s in spans if s.name.endswith("RunService/ReplayRun"))
    assert replay_span.parent is not None
    assert replay_span.parent.span_id == replay_rpc.context.span_id
    assert (replay_span.attributes or {})["foredeck.replay_identical"] is True
    fork_span = next(s for s in spans if s.name == "orchestrator.fork")
    assert (fork_span.attributes or {})["foredeck.forked_from_run_id"] == parent_id
    # The fork's worker span joins the trace of the ForkRun call.
    assert fork.context.trace_id == fork_span.context.trace_id
