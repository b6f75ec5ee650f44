"""The loop's decisions: validation before execution, replanning, budgets, retries, events."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from foredeck.common.v1 import journal_pb2, run_event_pb2, run_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck_kit.metrics import Metrics
from foredeck_orchestrator.domain.loop import CircuitOpenError, DownstreamError, PlanActLoop
from foredeck_orchestrator.domain.loop.engine import LoopSettings
from foredeck_orchestrator.domain.loop.errors import Code
from foredeck_orchestrator.domain.loop.ports import CallOptions
from foredeck_orchestrator.domain.ports import LeaseLost, RunOutcome
from foredeck_orchestrator.domain.waiting import ApprovalPending
from services.orchestrator.tests.loop_support import (
    ANSWER_CHUNKS,
    MemoryEvents,
    MemoryJournal,
    Scripted,
    make_agent,
    make_context,
    make_run,
    plan_text,
    reason_step,
    tool_failure,
    tool_output,
    tool_step,
)

FAILED = journal_pb2.JOURNAL_ENTRY_OUTCOME_FAILED


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def execute(
    downstreams: Scripted,
    *,
    agent_args: dict[str, object] | None = None,
    run_args: dict[str, object] | None = None,
    deadline: float | None = None,
    sleep: Sleeps | None = None,
    credentials: object = None,
) -> tuple[RunOutcome, MemoryJournal, MemoryEvents]:
    journal = MemoryJournal("run-1")
    events = MemoryEvents("run-1")
    agent = make_agent(**(agent_args or {}))  # type: ignore[arg-type]
    run = make_run(**(run_args or {}))  # type: ignore[arg-type]
    ctx = make_context(run, agent, journal, events, deadline=deadline)
    if credentials is not None:
        ctx.credentials = credentials  # type: ignore[assignment]
    loop = PlanActLoop(downstreams.ports, sleep=sleep or Sleeps())
    return await loop.execute(ctx), journal, events


def kinds(events: MemoryEvents) -> list[str]:
    return [str(e.WhichOneof("payload")) for e in events.events]


async def test_happy_path_events_and_journal() -> None:
    downstreams = Scripted(
        {"s1": plan_text(tool_step("calculator", {"expression": "6*7"}), reason_step("explain"))}
    )
    outcome, journal, events = await execute(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert outcome.output == "".join(ANSWER_CHUNKS)
    assert outcome.usage.input_tokens == 30  # plan, reason and synthesis at 10 each
    assert kinds(events) == [
        "step_started",
        "step_finished",  # s1 plan
        "step_started",
        "tool_call_requested",
        "tool_call_finished",
        "step_finished",  # s1.1 tool
        "step_started",
        "step_finished",  # s1.2 reason
        "step_started",
        "token_delta",
        "token_delta",
        "token_delta",
        "step_finished",  # s4 synthesis
    ]
    assert [d.text for d in events.of("token_delta")] == list(ANSWER_CHUNKS)
    assert {d.step_id for d in events.of("token_delta")} == {"s4"}
    started = events.of("step_started")
    assert [(s.step_id, s.step_index, s.kind, s.attempt) for s in started] == [
        ("s1", 1, run_event_pb2.STEP_KIND_PLAN, 1),
        ("s1.1", 2, run_event_pb2.STEP_KIND_TOOL_CALL, 1),
        ("s1.2", 3, run_event_pb2.STEP_KIND_REASON, 1),
        ("s4", 4, run_event_pb2.STEP_KIND_SYNTHESIZE, 1),
    ]
    plan_entry, tool_entry, _, synth_entry = journal.stored
    assert [s.step_id for s in plan_entry.plan.steps] == ["s1.1", "s1.2"]
    assert plan_entry.llm_exchange.response_json_schema
    assert plan_entry.llm_exchange.idempotency_key == "run-1:s1:1"
    assert plan_entry.llm_exchange.messages[0].parts[0].text.text.startswith("You are a careful")
    assert tool_entry.tool_exchange.idempotency_key == "run-1:s1.1"
    assert tool_entry.tool_exchange.result.content == "42"
    assert synth_entry.llm_exchange.response.parts[0].text.text == outcome.output
    assert synth_entry.llm_exchange.finish_reason == "STOP"
    request = downstreams.tool_requests[0]
    assert (request.run_id, request.step_id, request.idempotency_key) == (
        "run-1",
        "s1.1",
        "run-1:s1.1",
    )
    assert [r.request_id for r in downstreams.generate_requests] == ["run-1:s1:1", "run-1:s1.2:1"]
    assert downstreams.generate_requests[0].metadata.run_id == "run-1"
    assert downstreams.stream_requests[0].request_id == "run-1:s4:1"


async def test_every_call_carries_a_freshly_minted_principal() -> None:
    counter = itertools.count(1)
    downstreams = Scripted({"s1": plan_text(tool_step("calculator", {}))})
    await execute(downstreams, credentials=lambda: f"token-{next(counter)}")
    assert downstreams.principals == ["token-1", "token-2", "token-3"]


async def test_a_plan_naming_a_forbidden_tool_is_never_executed_and_replanned() -> None:
    downstreams = Scripted(
        {
            "s1": plan_text(tool_step("calculator", {}), tool_step("shell", {"cmd": "rm -rf /"})),
            "s2": plan_text(tool_step("calculator", {"expression": "1+1"})),
        }
    )
    outcome, journal, events = await execute(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert [r.tool_name for r in downstreams.tool_requests] == ["calculator"]
    assert downstreams.tool_requests[0].step_id == "s2.1"
    rejected = journal.stored[0]
    assert rejected.outcome == FAILED
    assert rejected.error.reason == "TOOL_NOT_ALLOWED"
    assert rejected.error.metadata["toolName"] == "shell"
    assert [s.tool_name for s in rejected.plan.steps] == ["calculator", "shell"]
    assert journal.stored[1].kind == run_event_pb2.STEP_KIND_REPLAN
    replan_prompt = downstreams.generate_requests[1].messages[0].parts[0].text.text
    assert "TOOL_NOT_ALLOWED" in replan_prompt
    assert events.of("step_finished")[0].success is False


async def test_an_invalid_plan_fails_the_run_when_replanning_is_disabled() -> None:
    downstreams = Scripted({"s1": plan_text(tool_step("shell", {}))})
    outcome, _, events = await execute(downstreams, agent_args={"replanning_disabled": True})
    assert outcome.status == run_pb2.RUN_STATUS_FAILED
    assert outcome.error is not None
    assert outcome.error.reason == "TOOL_NOT_ALLOWED"
    assert downstreams.tool_requests == []
    fatal = events.of("error")
    assert [e.fatal for e in fatal] == [True]


async def test_invalid_plans_past_the_replan_budget_fail_the_run() -> None:
    downstreams = Scripted({"s1": "not json", "s2": "still not json"})
    outcome, journal, _ = await execute(downstreams, agent_args={"max_replans": 1})
    assert outcome.error is not None
    assert outcome.error.reason == "PLAN_INVALID"
    assert [e.outcome for e in journal.stored] == [FAILED, FAILED]


async def test_a_failed_tool_leads_to_a_replan_with_the_failure_observed() -> None:
    downstreams = Scripted(
        {
            "s1": plan_text(tool_step("search", {"query": "x"}), reason_step("never reached")),
            "s3": plan_text(tool_step("calculator", {})),
        },
        tool_outcomes={"search": tool_failure("index offline"), "calculator": tool_output(1)},
    )
    outcome, journal, _ = await execute(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert [r.tool_name for r in downstreams.tool_requests] == ["search", "calculator"]
    failed = journal.stored[1]
    assert failed.outcome == FAILED
    assert failed.error.reason == "STEP_FAILED"
    assert failed.error.metadata["toolErrorKind"] == "TOOL_FAILED"
    assert failed.tool_exchange.result.is_error
    replan_prompt = downstreams.generate_requests[1].messages[0].parts[0].text.text
    assert "FAILED: index offline" in replan_prompt
    # The reasoning step of the abandoned plan never ran.
    assert len(downstreams.generate_requests) == 2


async def test_a_failed_tool_fails_the_run_when_replanning_is_disabled() -> None:
    downstreams = Scripted(
        {"s1": plan_text(tool_step("search", {}))},
        tool_outcomes={"search": tool_failure("index offline")},
    )
    outcome, _, _ = await execute(downstreams, agent_args={"replanning_disabled": True})
    assert outcome.error is not None
    assert outcome.error.reason == "STEP_FAILED"
    assert outcome.error.metadata["toolName"] == "search"


async def test_replanning_stops_at_the_limit() -> None:
    downstreams = Scripted(
        {"s1": plan_text(tool_step("search", {})), "s3": plan_text(tool_step("search", {}))},
        tool_outcomes={"search": tool_failure("index offline")},
    )
    outcome, _, _ = await execute(downstreams, agent_args={"max_replans": 1})
    assert outcome.error is not None
    assert outcome.error.reason == "REPLAN_LIMIT"
    assert dict(outcome.error.metadata) == {"limit": "1", "lastReason": "STEP_FAILED"}
    assert len(downstreams.tool_requests) == 2


async def test_a_step_that_asks_for_it_triggers_a_replan() -> None:
    downstreams = Scripted(
        {
            "s1": plan_text(tool_step("calculator", {}, replan_after=True), reason_step("later")),
            "s3": plan_text(reason_step("use the result")),
        }
    )
    outcome, journal, _ = await execute(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert [e.step_id for e in journal.stored] == ["s1", "s1.1", "s3", "s3.1", "s5"]


async def test_the_token_budget_stops_the_run_before_the_next_call() -> None:
    downstreams = Scripted({"s1": plan_text(tool_step("calculator", {}))})
    outcome, journal, events = await execute(downstreams, run_args={"max_tokens": 15})
    assert outcome.status == run_pb2.RUN_STATUS_FAILED
    assert outcome.error is not None
    assert (outcome.error.reason, outcome.error.code) == (
        "BUDGET_EXCEEDED",
        Code.RESOURCE_EXHAUSTED,
    )
    assert outcome.error.metadata["budget"] == "max_tokens"
    assert outcome.error.metadata["stepId"] == "s1.1"
    assert downstreams.tool_requests == []
    assert len(journal.stored) == 1
    assert outcome.usage.input_tokens + outcome.usage.output_tokens == 15
    assert events.of("error")[-1].fatal


async def test_the_step_budget_stops_the_run() -> None:
    downstreams = Scripted({"s1": plan_text(tool_step("calculator", {}))})
    outcome, _, _ = await execute(downstreams, run_args={"max_steps": 2})
    assert outcome.error is not None
    assert outcome.error.metadata["budget"] == "max_steps"
    assert [kind for kind, _ in downstreams.calls] == ["generate", "tool"]


async def test_a_spent_deadline_stops_the_run_before_any_call() -> None:
    downstreams = Scripted({"s1": plan_text()})
    outcome, journal, _ = await execute(
        downstreams, run_args={"max_wall_seconds": 30}, deadline=0.0
    )
    assert outcome.error is not None
    assert outcome.error.metadata["budget"] == "max_wall_time"
    assert downstreams.calls == []
    assert journal.stored == []


async def test_a_transient_failure_is_retried_with_backoff() -> None:
    downstreams = Scripted({"s1": plan_text()})
    downstreams.fail_next = [
        DownstreamError("llmrouter", Code.UNAVAILABLE, "UNAVAILABLE", reason="PROVIDER_UNAVAILABLE")
    ]
    sleeps = Sleeps()
    outcome, _, events = await execute(downstreams, sleep=sleeps)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert sleeps.delays == [pytest.approx(0.2)]
    warning = events.of("error")[0]
    assert not warning.fatal
    assert warning.error.reason == "DOWNSTREAM_UNAVAILABLE"
    assert warning.error.metadata["upstreamReason"] == "PROVIDER_UNAVAILABLE"


async def test_retry_info_sets_the_wait() -> None:
    downstreams = Scripted({"s1": plan_text()})
    downstreams.fail_next = [
        DownstreamError(
            "llmrouter",
            Code.RESOURCE_EXHAUSTED,
            "RESOURCE_EXHAUSTED",
            reason="PROVIDER_RATE_LIMITED",
            retry_after=0.7,
        )
    ]
    sleeps = Sleeps()
    outcome, _, _ = await execute(downstreams, sleep=sleeps)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert sleeps.delays == [pytest.approx(0.7)]


async def test_a_downstream_that_stays_down_fails_the_run_after_the_attempts() -> None:
    downstreams = Scripted({"s1": plan_text()})
    downstreams.fail_next = [
        DownstreamError("llmrouter", Code.UNAVAILABLE, "UNAVAILABLE") for _ in range(3)
    ]
    sleeps = Sleeps()
    outcome, journal, _ = await execute(downstreams, sleep=sleeps)
    assert outcome.error is not None
    assert outcome.error.reason == "DOWNSTREAM_UNAVAILABLE"
    assert outcome.error.metadata["downstream"] == "llmrouter"
    assert len(sleeps.delays) == LoopSettings().max_call_attempts - 1
    assert journal.stored[0].outcome == FAILED


async def test_an_open_circuit_ends_as_circuit_open() -> None:
    downstreams = Scripted({"s1": plan_text()})
    downstreams.fail_next = [CircuitOpenError("llmrouter", 0.5) for _ in range(3)]
    outcome, _, _ = await execute(downstreams)
    assert outcome.error is not None
    assert (outcome.error.reason, outcome.error.code) == ("CIRCUIT_OPEN", Code.UNAVAILABLE)
    assert outcome.error.retry_delay.ToTimedelta().total_seconds() == pytest.approx(0.5)


async def test_a_refused_model_call_is_not_retried_and_keeps_the_upstream_reason() -> None:
    downstreams = Scripted({"s1": plan_text()})
    downstreams.fail_next = [
        DownstreamError(
            "llmrouter",
            Code.NOT_FOUND,
            "NOT_FOUND",
            reason="MODEL_NOT_FOUND",
            domain="llmrouter.foredeck.dev",
        )
    ]
    sleeps = Sleeps()
    outcome, _, _ = await execute(downstreams, sleep=sleeps)
    assert outcome.error is not None
    assert outcome.error.reason == "STEP_FAILED"
    assert outcome.error.metadata["upstreamReason"] == "MODEL_NOT_FOUND"
    assert outcome.error.metadata["upstreamDomain"] == "llmrouter.foredeck.dev"
    assert sleeps.delays == []


async def test_a_tool_the_principal_may_not_run_is_replanned_around() -> None:
    downstreams = Scripted(
        {"s1": plan_text(tool_step("search", {})), "s3": plan_text(tool_step("calculator", {}))}
    )

    original = downstreams.execute_tool

    async def refuse_search(
        request: tools.ExecuteToolRequest, options: CallOptions
    ) -> tools.ExecuteToolResponse:
        if request.tool_name == "search":
            raise DownstreamError(
                "toolrunner",
                Code.PERMISSION_DENIED,
                "PERMISSION_DENIED",
                reason="TOOL_PERMISSION_DENIED",
                domain="toolrunner.foredeck.dev",
            )
        return await original(request, options)

    downstreams.execute_tool = refuse_search  # type: ignore[method-assign]
    outcome, journal, _ = await execute(downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert journal.stored[1].error.reason == "TOOL_NOT_ALLOWED"
    assert journal.stored[1].error.metadata["toolName"] == "search"


async def test_recall_and_remember_with_provenance() -> None:
    downstreams = Scripted({"s2": plan_text()}, memories=["prefers metric units"])
    outcome, journal, events = await execute(
        downstreams, agent_args={"recall": True, "remember": True}
    )
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    recall, _, _, remember = journal.stored
    assert recall.kind == run_event_pb2.STEP_KIND_RECALL
    assert [m.memory.content for m in recall.memory_operation.recalled_memories] == [
        "prefers metric units"
    ]
    assert "prefers metric units" in downstreams.generate_requests[0].messages[0].parts[0].text.text
    request = downstreams.remember_requests[0]
    assert (request.run_id, request.step_id, request.request_id) == ("run-1", "s4", "run-1:s4")
    assert outcome.output in request.content
    assert list(remember.memory_operation.memory_ids) == ["m-new"]
    assert events.of("memory_stored")[0].memory_id == "m-new"


async def test_memory_being_down_does_not_fail_the_run() -> None:
    downstreams = Scripted({"s2": plan_text()})
    downstreams.fail_next = [
        DownstreamError("memory", Code.UNAVAILABLE, "UNAVAILABLE") for _ in range(3)
    ]
    outcome, journal, events = await execute(downstreams, agent_args={"recall": True})
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert journal.stored[0].outcome == FAILED
    assert [e.fatal for e in events.of("error")] == [False, False, False]


async def test_lease_lost_propagates_untouched() -> None:
    downstreams = Scripted({"s1": plan_text()})
    journal = MemoryJournal("run-1")
    journal.lease_lost = True
    ctx = make_context(make_run(), make_agent(), journal, MemoryEvents("run-1"))
    with pytest.raises(LeaseLost):
        await PlanActLoop(downstreams.ports).execute(ctx)


async def test_cancellation_propagates_and_journals_nothing_for_the_step() -> None:
    downstreams = Scripted({"s1": plan_text(tool_step("calculator", {}))})
    entered = asyncio.Event()

    async def hang(
        request: tools.ExecuteToolRequest, options: CallOptions
    ) -> tools.ExecuteToolResponse:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    downstreams.execute_tool = hang  # type: ignore[method-assign]
    journal = MemoryJournal("run-1")
    ctx = make_context(make_run(), make_agent(), journal, MemoryEvents("run-1"))
    task = asyncio.create_task(PlanActLoop(downstreams.ports).execute(ctx))
    async with asyncio.timeout(5):
        await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [e.step_id for e in journal.stored] == ["s1"]


async def test_a_stream_failing_after_output_is_not_generated_twice() -> None:
    downstreams = Scripted({"s1": plan_text()})

    async def broken(request: object, options: CallOptions) -> AsyncIterator[object]:
        from foredeck.common.v1 import error_pb2
        from foredeck.llmrouter.v1 import generation_pb2
        from foredeck.llmrouter.v1 import llmrouter_service_pb2 as llm

        downstreams.calls.append(("stream", ""))
        yield llm.StreamGenerateResponse(text_delta=generation_pb2.TextDelta(text="The ans"))
        yield llm.StreamGenerateResponse(
            failed=generation_pb2.GenerationFailed(
                error=error_pb2.Error(
                    code=Code.UNAVAILABLE,
                    reason="STREAM_INTERRUPTED",
                    domain="llmrouter.foredeck.dev",
                )
            )
        )

    downstreams.stream_generate = broken  # type: ignore[assignment]
    outcome, _, events = await execute(downstreams)
    assert outcome.error is not None
    assert outcome.error.reason == "DOWNSTREAM_UNAVAILABLE"
    assert outcome.error.metadata["upstreamReason"] == "STREAM_INTERRUPTED"
    assert [kind for kind, _ in downstreams.calls] == ["generate", "stream"]
    assert [d.text for d in events.of("token_delta")] == ["The ans"]


async def test_a_tool_that_needs_approval_is_never_called_without_it() -> None:
    downstreams = Scripted(
        {"s1": plan_text(tool_step("search", {})), "s3": plan_text(tool_step("calculator", {}))}
    )
    journal = MemoryJournal("run-1")
    agent = make_agent()
    agent.approval_policy.tool_names.append("search")
    ctx = make_context(make_run(), agent, journal, MemoryEvents("run-1"))
    with pytest.raises(ApprovalPending) as pending:
        await PlanActLoop(downstreams.ports).execute(ctx)
    assert downstreams.tool_requests == []
    waiting = journal.stored[1]
    assert waiting.outcome == journal_pb2.JOURNAL_ENTRY_OUTCOME_WAITING
    assert waiting.tool_exchange.approval_required
    assert waiting.tool_exchange.approval_id == pending.value.approval_id


async def test_tool_calls_and_tokens_are_counted_in_the_metrics() -> None:
    metrics = Metrics()
    downstreams = Scripted({"s1": plan_text(tool_step("calculator", {}))})
    ctx = make_context(make_run(), make_agent(), MemoryJournal("run-1"), MemoryEvents("run-1"))
    await PlanActLoop(downstreams.ports, metrics=metrics).execute(ctx)
    registry = metrics.registry
    calls = registry.get_sample_value(
        "agent_tool_calls_total", {"tool_name": "calculator", "success": "true"}
    )
    assert calls == 1.0
    output = registry.get_sample_value(
        "agent_llm_tokens_total", {"model": "gpt-4o-mini", "direction": "output"}
    )
    assert output == 10.0


async def test_a_requested_revision_past_the_limit_lets_the_plan_go_on() -> None:
    downstreams = Scripted(
        {
            "s1": plan_text(tool_step("calculator", {}, replan_after=True), reason_step("a")),
            "s3": plan_text(tool_step("calculator", {}, replan_after=True), reason_step("b")),
        }
    )
    outcome, journal, _ = await execute(downstreams, agent_args={"max_replans": 1})
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert [e.step_id for e in journal.stored] == ["s1", "s1.1", "s3", "s3.1", "s3.2", "s6"]
