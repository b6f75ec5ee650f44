"""The agent loop against scripted llmrouter, toolrunner and memory servers over real gRPC."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from foredeck.common.v1 import journal_pb2, run_pb2
from foredeck_kit.errors import ServiceError
from foredeck_kit.logs import configure_logging, flush_logging, reset_logging
from foredeck_orchestrator.adapters.breaker import BreakerConfig
from foredeck_orchestrator.clients import ConnectedAgentLoop, DownstreamClients
from foredeck_orchestrator.domain.loop import PlanActLoop
from foredeck_orchestrator.domain.ports import RunOutcome
from services.orchestrator.tests.loop_support import (
    MemoryEvents,
    MemoryJournal,
    make_agent,
    make_context,
    make_run,
    plan_text,
    reason_step,
    tool_step,
)
from services.orchestrator.tests.service.loop_stand_ins import (
    ANSWER,
    Script,
    StandIns,
    stand_ins,
    tool_failure,
    tool_output,
)

FAILED = journal_pb2.JOURNAL_ENTRY_OUTCOME_FAILED


async def no_wait(_: float) -> None:
    return None


async def run_with(
    downstreams: StandIns,
    *,
    entries: list[journal_pb2.JournalEntry] | None = None,
    agent_args: dict[str, object] | None = None,
    run_args: dict[str, object] | None = None,
    deadline: float | None = None,
    tracer_provider: TracerProvider | None = None,
) -> tuple[RunOutcome, MemoryJournal, MemoryEvents]:
    journal = MemoryJournal("run-1", entries or [])
    events = MemoryEvents("run-1")
    ctx = make_context(
        make_run(**(run_args or {})),  # type: ignore[arg-type]
        make_agent(**(agent_args or {})),  # type: ignore[arg-type]
        journal,
        events,
        credentials=downstreams.credentials_for("run-1"),
        deadline=deadline,
    )
    loop = PlanActLoop(
        downstreams.clients.downstreams, tracer_provider=tracer_provider, sleep=no_wait
    )
    return await loop.execute(ctx), journal, events


def calculator_script() -> Script:
    """A plan of a tool call and a reasoning step, written at s1 (no recall) or s2 (recall)."""
    plan = plan_text(
        tool_step("calculator", {"expression": "6*7"}), reason_step("check the product")
    )
    return Script(plans={"s1": plan, "s2": plan}, tool_outcomes={"calculator": tool_output(42)})


async def test_happy_path_over_grpc() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stream = io.StringIO()
    configure_logging("orchestrator", stream=stream)
    try:
        async with stand_ins(calculator_script(), tracer_provider=provider) as downstreams:
            outcome, journal, events = await run_with(
                downstreams,
                agent_args={"recall": True, "remember": True},
                tracer_provider=provider,
            )
        flush_logging()
    finally:
        reset_logging()
    script = downstreams.script

    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert outcome.output == "".join(ANSWER)
    assert dict(script.counts) == {
        "Recall": 1,
        "Generate": 2,
        "ExecuteTool": 1,
        "StreamGenerate": 1,
        "Remember": 1,
    }
    assert [d.text for d in events.of("token_delta")] == list(ANSWER)
    # Every call carried a principal the orchestrator minted for this run.
    assert len(script.principals) == 6
    assert {(p.run_id, p.actor, p.tenant_id) for p in script.principals} == {
        ("run-1", "orchestrator", "tenant-a")
    }
    request = script.tool_requests[0]
    assert (request.idempotency_key, request.run_id, request.step_id) == (
        "run-1:s2.1",
        "run-1",
        "s2.1",
    )
    assert [r.request_id for r in script.generate_requests] == ["run-1:s2:1", "run-1:s2.2:1"]
    remembered = script.remember_requests[0]
    assert (remembered.run_id, remembered.step_id) == ("run-1", "s6")
    assert len(journal.stored) == 6

    # A span per step, and the downstream call's client span inside it.
    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    tool_call = next(
        s for s in spans if s.name == "foredeck.toolrunner.v1.ToolRunnerService/ExecuteTool"
    )
    assert tool_call.parent is not None
    parent = by_id[tool_call.parent.span_id]
    assert parent.name == "step tool_call"
    assert parent.attributes is not None
    assert parent.attributes["foredeck.step_id"] == "s2.1"
    assert parent.attributes["foredeck.tool_name"] == "calculator"
    assert sorted(s.name for s in spans if s.name.startswith("step ")) == [
        "step plan",
        "step reason",
        "step recall",
        "step remember",
        "step synthesize",
        "step tool_call",
    ]

    # One log line per step, with what an operator needs to find it.
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    steps = [line for line in lines if line.get("event") == "step"]
    assert [line["step_index"] for line in steps] == [1, 2, 3, 4, 5, 6]
    tool_line = steps[2]
    assert tool_line["run_id"] == "run-1"
    assert tool_line["step_kind"] == "tool_call"
    assert tool_line["tool"] == "calculator"
    assert tool_line["latency_ms"] >= 0
    assert steps[1]["input_tokens"] == 10
    assert steps[1]["output_tokens"] == 5


async def test_an_invalid_plan_is_replanned_and_the_forbidden_tool_never_called() -> None:
    script = Script(
        plans={
            "s1": plan_text(tool_step("shell", {"cmd": "cat /etc/passwd"})),
            "s2": plan_text(tool_step("calculator", {"expression": "6*7"})),
        },
        # The stand-in would run "shell" if asked: only the loop's validation stops it.
        tool_outcomes={"calculator": tool_output(42), "shell": tool_output("root:x:0:0")},
    )
    async with stand_ins(script) as downstreams:
        outcome, journal, _ = await run_with(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert [r.tool_name for r in script.tool_requests] == ["calculator"]
    assert journal.stored[0].outcome == FAILED
    assert journal.stored[0].error.reason == "TOOL_NOT_ALLOWED"


async def test_a_tool_failure_is_replanned() -> None:
    script = Script(
        plans={
            "s1": plan_text(tool_step("search", {"query": "6*7"})),
            "s3": plan_text(tool_step("calculator", {"expression": "6*7"})),
        },
        tool_outcomes={"search": tool_failure("index offline"), "calculator": tool_output(42)},
    )
    async with stand_ins(script) as downstreams:
        outcome, journal, _ = await run_with(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert [r.tool_name for r in script.tool_requests] == ["search", "calculator"]
    assert [e.step_id for e in journal.stored] == ["s1", "s1.1", "s3", "s3.1", "s5"]
    assert journal.stored[1].error.reason == "STEP_FAILED"
    assert "index offline" in script.generate_requests[1].messages[0].parts[0].text.text


async def test_a_refusal_by_toolrunner_is_mapped_with_its_upstream_reason() -> None:
    script = Script(
        plans={
            "s1": plan_text(tool_step("search", {"query": "x"})),
            "s3": plan_text(),
        },
        tool_outcomes={},  # the stand-in refuses every tool with TOOL_PERMISSION_DENIED
    )
    async with stand_ins(script) as downstreams:
        outcome, journal, _ = await run_with(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    error = journal.stored[1].error
    assert error.reason == "TOOL_NOT_ALLOWED"
    assert error.domain == "orchestrator.foredeck.dev"
    assert error.metadata["upstreamReason"] == "TOOL_PERMISSION_DENIED"
    assert error.metadata["upstreamDomain"] == "toolrunner.foredeck.dev"
    assert "caller may not" not in error.message


async def test_the_budget_stops_the_run_before_the_next_model_call() -> None:
    async with stand_ins(calculator_script()) as downstreams:
        outcome, _, _ = await run_with(
            downstreams, agent_args={"recall": True}, run_args={"max_tokens": 15}
        )
    assert outcome.status == run_pb2.RUN_STATUS_FAILED
    assert outcome.error is not None
    assert outcome.error.reason == "BUDGET_EXCEEDED"
    assert outcome.error.metadata["budget"] == "max_tokens"
    assert dict(downstreams.script.counts) == {"Recall": 1, "Generate": 1}


async def test_cancelling_the_run_cancels_the_tool_call_in_flight() -> None:
    script = calculator_script()
    script.hold_tools = True
    async with stand_ins(script) as downstreams:
        task = asyncio.create_task(run_with(downstreams))
        async with asyncio.timeout(10):
            await script.tool_started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(10):
            await script.tool_cancelled.wait()
    assert script.counts["ExecuteTool"] == 1
    assert script.counts["StreamGenerate"] == 0


async def test_the_run_deadline_bounds_the_tool_call() -> None:
    script = calculator_script()
    script.hold_tools = True
    async with stand_ins(script) as downstreams:
        outcome, journal, _ = await run_with(downstreams, deadline=time.monotonic() + 2.0)
        async with asyncio.timeout(10):
            await script.tool_cancelled.wait()
    assert outcome.error is not None
    assert outcome.error.reason == "BUDGET_EXCEEDED"
    assert outcome.error.metadata["budget"] == "max_wall_time"
    assert journal.stored[-1].step_id == "s1.1"
    assert journal.stored[-1].outcome == FAILED


@pytest.mark.parametrize("committed", [1, 2, 3, 4])
async def test_resume_after_a_partial_journal_makes_no_duplicate_calls(committed: int) -> None:
    async with stand_ins(calculator_script()) as downstreams:
        full, journal, _ = await run_with(downstreams, agent_args={"recall": True})
        first_calls = list(downstreams.script.calls)
        assert len(first_calls) == len(journal.stored) == 5

        downstreams.script.calls.clear()
        outcome, resumed, _ = await run_with(
            downstreams, entries=journal.stored[:committed], agent_args={"recall": True}
        )
    assert downstreams.script.calls == first_calls[committed:]
    assert outcome.output == full.output
    assert len(resumed.stored) == len(journal.stored)


def closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


async def test_an_unreachable_downstream_opens_its_breaker_and_then_fails_fast() -> None:
    script = calculator_script()
    async with stand_ins(
        script,
        breaker=BreakerConfig(failure_threshold=2, failure_window=60.0, cooldown=60.0),
        toolrunner_address=closed_port_address(),
    ) as downstreams:
        outcome, _, events = await run_with(downstreams)
        breaker = downstreams.clients.breakers.get("toolrunner")
        assert breaker.state.value == "open"
        assert downstreams.clients.breakers.get("llmrouter").state.value == "closed"
    assert outcome.error is not None
    assert outcome.error.reason == "CIRCUIT_OPEN"
    assert outcome.error.metadata["downstream"] == "toolrunner"
    warnings = [e.error.reason for e in events.of("error") if not e.fatal]
    assert warnings == ["DOWNSTREAM_UNAVAILABLE", "DOWNSTREAM_UNAVAILABLE"]


async def test_a_timeout_the_downstream_reports_itself_does_not_count_against_its_breaker() -> None:
    script = Script(
        plans={"s1": plan_text(tool_step("search", {"query": "x"})), "s3": plan_text()},
        tool_errors={
            "search": ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "TOOL_TIMEOUT",
                "the tool did not finish in time",
                metadata={"toolName": "search"},
            )
        },
    )
    async with stand_ins(script, breaker=BreakerConfig(failure_threshold=1)) as downstreams:
        outcome, journal, _ = await run_with(downstreams)
        assert downstreams.clients.breakers.get("toolrunner").state.value == "closed"
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    error = journal.stored[1].error
    assert error.reason == "STEP_FAILED"
    assert error.metadata["upstreamReason"] == "TOOL_TIMEOUT"
    assert error.metadata["upstreamCode"] == "DEADLINE_EXCEEDED"


async def test_the_connected_loop_opens_its_channels_on_the_first_run() -> None:
    async with stand_ins(calculator_script()) as downstreams:
        opened: list[DownstreamClients] = []

        def connect() -> DownstreamClients:
            clients = DownstreamClients.open(
                llmrouter_address=downstreams.llmrouter.address,
                toolrunner_address=downstreams.toolrunner.address,
                memory_address=downstreams.memory.address,
            )
            opened.append(clients)
            return clients

        loop = ConnectedAgentLoop(connect)
        assert opened == []
        for run_id in ("run-1", "run-2"):
            ctx = make_context(
                make_run(run_id),
                make_agent(),
                MemoryJournal(run_id),
                MemoryEvents(run_id),
                credentials=downstreams.credentials_for(run_id),
            )
            outcome = await loop.execute(ctx)
            assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
        await loop.close()
    assert len(opened) == 1
    assert downstreams.script.counts["ExecuteTool"] == 2
