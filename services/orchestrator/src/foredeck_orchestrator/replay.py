"""ReplayRun: a finished run re-executed from its journal, with no downstream call at all.

The agent loop runs in the API process with ``journal_only`` set, over the run's journal (for a
fork, the source's prefix and the fork's own entries) and the agent version the run was pinned
to. Every step is answered from its recorded entry; a step the journal does not hold fails the
replay with REPLAY_DIVERGED instead of calling out. Nothing is written: the replay's journal
refuses appends and its events stay in memory.

A replay publishes nothing, but it reproduces each reused step's StepStarted and StepFinished
events in memory. It is identical when it reached the recorded status and output, reused every
journal entry, and each step's outcome event matches the one the run published. Otherwise the
first difference is reported as a ``ReplayDivergence`` (or, with
``strict``, as FAILED_PRECONDITION REPLAY_DIVERGED).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from opentelemetry import trace

from foredeck.common.v1 import journal_pb2, run_event_pb2, run_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as llm
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck_orchestrator.adapters.redis_agents import RedisAgents
from foredeck_orchestrator.adapters.redis_runs import RedisRuns, RunRecord, is_terminal
from foredeck_orchestrator.domain.loop import CallOptions, Downstreams, PlanActLoop
from foredeck_orchestrator.domain.ports import RunContext
from foredeck_orchestrator.journals import JournalPrefixGone, run_journal
from foredeck_orchestrator.validation import not_found, precondition

__all__ = ["replay_run"]


class _Refused(RuntimeError):
    """A replay asked for a downstream call (never happens with ``journal_only``)."""


class _NoCalls:
    """Downstreams that refuse every call: a replay makes none."""

    async def generate(
        self, request: llm.GenerateRequest, options: CallOptions
    ) -> llm.GenerateResponse:
        raise _Refused("llmrouter")

    def stream_generate(
        self, request: llm.StreamGenerateRequest, options: CallOptions
    ) -> AsyncIterator[llm.StreamGenerateResponse]:
        raise _Refused("llmrouter")

    async def execute_tool(
        self, request: tools.ExecuteToolRequest, options: CallOptions
    ) -> tools.ExecuteToolResponse:
        raise _Refused("toolrunner")

    async def recall(self, request: mem.RecallRequest, options: CallOptions) -> mem.RecallResponse:
        raise _Refused("memory")

    async def remember(
        self, request: mem.RememberRequest, options: CallOptions
    ) -> mem.RememberResponse:
        raise _Refused("memory")


class _ReadOnlyJournal:
    """The recorded entries; an append would be a write, which a replay never makes."""

    def __init__(self, entries: Sequence[journal_pb2.JournalEntry]) -> None:
        self._entries = list(entries)

    async def entries(self) -> Sequence[journal_pb2.JournalEntry]:
        return list(self._entries)

    async def append(self, entry: journal_pb2.JournalEntry) -> journal_pb2.JournalEntry:
        raise _Refused("journal")


class _CollectedEvents:
    """Events of a replay are kept in memory for the comparison, never published."""

    def __init__(self) -> None:
        self.events: list[run_event_pb2.RunEvent] = []

    async def publish(self, event: run_event_pb2.RunEvent) -> str:
        self.events.append(event)
        return ""


def _step_outcomes(
    events: Sequence[run_event_pb2.RunEvent],
) -> dict[str, tuple[bool, str, str]]:
    """Each step's last StepFinished: success, summary and error reason, by step id."""
    outcomes: dict[str, tuple[bool, str, str]] = {}
    for event in events:
        if event.HasField("step_finished"):
            done = event.step_finished
            outcomes[done.step_id] = (done.success, done.summary, done.error.reason)
    return outcomes


def _event_divergence(
    recorded: Sequence[run_event_pb2.RunEvent],
    replayed: Sequence[run_event_pb2.RunEvent],
    entries: Sequence[journal_pb2.JournalEntry],
) -> journal_pb2.ReplayDivergence | None:
    """The first step whose recorded outcome event differs from the replay's.

    Only steps the recorded stream still holds are compared (a fork's prefix steps published
    their events in the source run, and old events may be trimmed); a step retried or resumed
    after a crash counts by its last StepFinished.
    """
    mine = _step_outcomes(replayed)
    index = {entry.step_id: entry.entry_index for entry in entries}
    for step_id, outcome in _step_outcomes(recorded).items():
        if mine.get(step_id) != outcome:
            return journal_pb2.ReplayDivergence(
                step_id=step_id,
                entry_index=index.get(step_id, 0),
                description="the replay's events for this step differ from the recorded ones",
            )
    return None


def _divergence(
    entries: Sequence[journal_pb2.JournalEntry],
    record: run_pb2.Run,
    status: int,
    output: str,
    error_reason: str,
    error_step: str,
    error_entry: int,
    reused: int,
) -> journal_pb2.ReplayDivergence | None:
    if error_reason == "REPLAY_DIVERGED":
        if error_entry:
            return journal_pb2.ReplayDivergence(
                step_id=error_step,
                entry_index=error_entry,
                description="tool call arguments differ from the recorded call",
            )
        return journal_pb2.ReplayDivergence(
            step_id=error_step,
            entry_index=0,
            description="the replay took a step the journal does not hold",
        )
    if status != record.status:
        return journal_pb2.ReplayDivergence(
            step_id=entries[-1].step_id if entries else "",
            entry_index=entries[-1].entry_index if entries else 0,
            description=(
                f"the replay ended {run_pb2.RunStatus.Name(status)}, the run "  # type: ignore[arg-type]
                f"{run_pb2.RunStatus.Name(record.status)}"
            ),
        )
    if output != record.output:
        return journal_pb2.ReplayDivergence(
            step_id=entries[-1].step_id if entries else "",
            entry_index=entries[-1].entry_index if entries else 0,
            description="the replay's answer differs from the recorded one",
        )
    if reused < len(entries):
        return journal_pb2.ReplayDivergence(
            step_id=entries[reused].step_id,
            entry_index=entries[reused].entry_index,
            description="the journal holds steps the replay did not take",
        )
    return None


async def replay_run(
    runs: RedisRuns,
    agents: RedisAgents,
    record: RunRecord,
    *,
    strict: bool,
    tracer: trace.Tracer | None = None,
) -> pb.ReplayRunResponse:
    """Replay the finished run of ``record`` (already checked visible to the caller)."""
    run = record.run
    if not is_terminal(run.status):
        raise precondition(
            "RUN_NOT_FINISHED",
            "the run has not finished",
            runId=run.run_id,
            status=run_pb2.RunStatus.Name(run.status),
        )
    try:
        entries = await run_journal(runs, record)
    except JournalPrefixGone:
        raise precondition(
            "JOURNAL_EXPIRED", "the journal of the run's source is gone", runId=run.run_id
        ) from None
    if not entries and run.step_count > 0:
        raise precondition("JOURNAL_EXPIRED", "the run's journal is gone", runId=run.run_id)
    agent = await agents.get(run.tenant_id, run.agent_name, run.agent_version)
    if agent is None:
        raise not_found(
            "AGENT_VERSION_NOT_FOUND",
            "the run's agent version is gone",
            agentName=run.agent_name,
            agentVersion=run.agent_version,
        )
    replayed = run_pb2.Run()
    replayed.CopyFrom(run)
    # A replay is not bound by the time that has passed since the run started.
    replayed.budget.ClearField("max_wall_time")
    no_calls = _NoCalls()
    loop = PlanActLoop(
        Downstreams(llm=no_calls, tools=no_calls, memory=no_calls), journal_only=True
    )
    events = _CollectedEvents()
    ctx = RunContext(
        run=replayed,
        agent=agent,
        journal=_ReadOnlyJournal(entries),
        events=events,
        worker_id="replay",
        credentials=lambda: "",
    )
    with (tracer or trace.get_tracer("foredeck_orchestrator.api")).start_as_current_span(
        "orchestrator.replay",
        attributes={
            "foredeck.run_id": run.run_id,
            "foredeck.agent_name": run.agent_name,
            "foredeck.agent_version": run.agent_version,
            "foredeck.journal_entries": len(entries),
        },
    ) as span:
        outcome = await loop.execute(ctx)
        error = outcome.error
        divergence = _divergence(
            entries,
            run,
            outcome.status,
            outcome.output,
            error.reason if error is not None else "",
            error.metadata.get("stepId", "") if error is not None else "",
            int(error.metadata.get("entryIndex", "0") or 0) if error is not None else 0,
            outcome.reused_entries,
        )
        if divergence is None:
            divergence = _event_divergence(
                await runs.events_after(run.run_id, "0-0", count=100_000), events.events, entries
            )
        span.set_attribute("foredeck.replay_identical", divergence is None)
    if divergence is not None and strict:
        raise precondition(
            "REPLAY_DIVERGED",
            "the replay diverged from the journal",
            runId=run.run_id,
            stepId=divergence.step_id,
            entryIndex=str(divergence.entry_index),
        )
    response = pb.ReplayRunResponse(
        run_id=run.run_id,
        status=outcome.status,
        output=outcome.output,
        identical=divergence is None,
        replayed_entry_count=outcome.reused_entries,
        recorded_usage=run.usage,
    )
    if error is not None:
        response.error.CopyFrom(error)
    if divergence is not None:
        response.divergence.CopyFrom(divergence)
    return response
