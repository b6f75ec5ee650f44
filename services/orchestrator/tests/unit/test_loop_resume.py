"""Resuming from the journal: every committed step is answered from it, nothing runs twice."""

from __future__ import annotations

import pytest

from foredeck.common.v1 import journal_pb2, run_event_pb2, run_pb2
from foredeck_orchestrator.domain.loop import PlanActLoop
from foredeck_orchestrator.domain.ports import RunOutcome
from services.orchestrator.tests.loop_support import (
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

# recall (s1), plan (s2: calculator, reason, search), search fails -> replan (s6: calculator),
# synthesis (s8), remember (s9).
PLANS = {
    "s2": plan_text(
        tool_step("calculator", {"expression": "6*7"}),
        reason_step("check the product"),
        tool_step("search", {"query": "6*7"}),
    ),
    "s6": plan_text(tool_step("calculator", {"expression": "7*6"})),
}


def scripted() -> Scripted:
    return Scripted(
        PLANS,
        tool_outcomes={"calculator": tool_output(42), "search": tool_failure("search is down")},
        memories=["the user likes short answers"],
    )


async def run_once(
    entries: list[journal_pb2.JournalEntry], downstreams: Scripted, *, journal_only: bool = False
) -> tuple[RunOutcome, MemoryJournal, MemoryEvents]:
    journal = MemoryJournal("run-1", entries)
    events = MemoryEvents("run-1")
    agent = make_agent(recall=True, remember=True)
    ctx = make_context(make_run(), agent, journal, events)
    outcome = await PlanActLoop(downstreams.ports, journal_only=journal_only).execute(ctx)
    return outcome, journal, events


async def test_a_fresh_run_journals_one_entry_per_downstream_call() -> None:
    downstreams = scripted()
    outcome, journal, _ = await run_once([], downstreams)
    assert outcome.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert outcome.output == "The answer is 42."
    assert [(e.step_id, e.step_index) for e in journal.stored] == [
        ("s1", 1),
        ("s2", 2),
        ("s2.1", 3),
        ("s2.2", 4),
        ("s2.3", 5),
        ("s6", 6),
        ("s6.1", 7),
        ("s8", 8),
        ("s9", 9),
    ]
    assert [kind for kind, _ in downstreams.calls] == [
        "recall",
        "generate",
        "tool",
        "generate",
        "tool",
        "generate",
        "tool",
        "stream",
        "remember",
    ]
    assert len(journal.stored) == len(downstreams.calls)


@pytest.mark.parametrize("committed", range(10))
async def test_resume_after_k_entries_makes_exactly_the_remaining_calls(committed: int) -> None:
    first = scripted()
    full, journal, _ = await run_once([], first)
    prefix = journal.stored[:committed]

    again = scripted()
    outcome, resumed, _ = await run_once(prefix, again)

    assert again.calls == first.calls[committed:]
    assert outcome.status == full.status
    assert outcome.output == full.output
    assert outcome.usage == full.usage
    assert [(e.step_id, e.step_index, e.outcome) for e in resumed.stored] == [
        (e.step_id, e.step_index, e.outcome) for e in journal.stored
    ]
    # Same ids on the wire: the effect keys and request ids of the remaining calls match.
    assert [r.idempotency_key for r in again.tool_requests] == [
        key for kind, key in first.calls[committed:] if kind == "tool"
    ]


async def test_replay_of_a_finished_run_calls_nothing() -> None:
    first = scripted()
    full, journal, live = await run_once([], first)
    again = scripted()
    outcome, replayed, events = await run_once(journal.stored, again, journal_only=True)
    assert again.calls == []
    assert again.principals == []
    assert outcome.output == full.output
    assert outcome.usage == full.usage
    assert replayed.appends == 0

    # The replay tells its steps as the live run did: the same starts and outcomes, in order.
    def steps(stream: list[run_event_pb2.RunEvent]) -> list[tuple[str, str, bool, str]]:
        return [
            ("started", e.step_started.step_id, True, e.step_started.description)
            if e.HasField("step_started")
            else (
                "finished",
                e.step_finished.step_id,
                e.step_finished.success,
                e.step_finished.summary,
            )
            for e in stream
            if e.HasField("step_started") or e.HasField("step_finished")
        ]

    assert steps(events.events) == steps(live.events)
    assert {e.WhichOneof("payload") for e in events.events} == {"step_started", "step_finished"}


async def test_replay_of_a_cut_journal_diverges_instead_of_calling() -> None:
    first = scripted()
    _, journal, _ = await run_once([], first)
    again = scripted()
    outcome, _, _ = await run_once(journal.stored[:4], again, journal_only=True)
    assert again.calls == []
    assert outcome.status == run_pb2.RUN_STATUS_FAILED
    assert outcome.error is not None
    assert outcome.error.reason == "REPLAY_DIVERGED"
    assert outcome.error.metadata["stepId"] == "s2.3"


async def test_replay_of_a_journal_whose_tool_call_differs_diverges_at_that_entry() -> None:
    _, journal, _ = await run_once([], scripted())
    entries = list(journal.stored)
    tool_entry = next(e for e in entries if e.step_id == "s2.1")
    tool_entry.tool_exchange.tool_call.arguments_json = '{"expression":"1+1"}'
    again = scripted()
    outcome, _, _ = await run_once(entries, again, journal_only=True)
    assert again.calls == []
    assert outcome.error is not None
    assert outcome.error.reason == "REPLAY_DIVERGED"
    assert outcome.error.metadata["stepId"] == "s2.1"
    assert outcome.error.metadata["entryIndex"] == str(tool_entry.entry_index)
