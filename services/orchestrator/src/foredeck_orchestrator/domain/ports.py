"""The boundary between the run runtime and the agent loop.

The runtime (queue, leases, fencing, Redis state) hands the loop a :class:`RunContext` for a run
it holds; the loop (recall, plan, act, replan, synthesise, remember) drives the run's steps
through it and returns a :class:`RunOutcome`. The loop never touches Redis keys or the queue;
the runtime never decides what a step does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from foredeck.common.v1 import agent_pb2, error_pb2, journal_pb2, run_event_pb2, run_pb2, usage_pb2

__all__ = [
    "AgentLoop",
    "LeaseLost",
    "RunContext",
    "RunEvents",
    "RunJournal",
    "RunOutcome",
]


class LeaseLost(Exception):
    """This worker no longer holds the run: its lease expired and the run's fencing token moved.

    Whoever sees it stops at once and writes nothing more for the run; the worker that now holds
    the run carries on from the journal.
    """


class RunJournal(Protocol):
    """The run's step journal: the durable record a run is rebuilt from."""

    async def entries(self) -> Sequence[journal_pb2.JournalEntry]:
        """Every committed entry of the run, in ``entry_index`` order (empty for a new run)."""
        ...

    async def append(self, entry: journal_pb2.JournalEntry) -> journal_pb2.JournalEntry:
        """Commit ``entry`` and return it as stored.

        Atomic: the entry is written only while this worker's fencing token is the run's
        current one (else :class:`LeaseLost`, nothing written). The runtime sets ``run_id``,
        ``entry_index``, ``worker_id``, ``fencing_token`` and ``trace_id``, and adds the entry's
        ``usage`` to the run's usage and its step count in the same write.
        """
        ...


class RunEvents(Protocol):
    """The run's event stream (what WatchRun serves)."""

    async def publish(self, event: run_event_pb2.RunEvent) -> str:
        """Append ``event`` and return its event id.

        The runtime sets ``event_id``, ``run_id``, ``sequence`` and ``event_time``; the caller
        sets only the payload. Raises :class:`LeaseLost` when the run is no longer held.
        """
        ...


@dataclass(slots=True)
class RunContext:
    """What the agent loop gets for one run held by this worker.

    ``run`` carries the effective budget (the agent's, narrowed by the submitter's);
    ``agent`` is the version the run is pinned to. ``credentials`` returns a fresh delegated
    principal for the run's next downstream call (a short-lived token minted by the
    orchestrator for this run; never the submitter's own token). ``deadline`` is a
    ``time.monotonic()`` instant from the run's wall-time budget, or None. Cancellation
    arrives as ``asyncio.CancelledError`` in the task running :meth:`AgentLoop.execute`.
    """

    run: run_pb2.Run
    agent: agent_pb2.Agent
    journal: RunJournal
    events: RunEvents
    worker_id: str
    credentials: Callable[[], str]
    deadline: float | None = None
    trace_id: str = ""
    approve: Callable[[str, str, str], str] | None = None
    """Mints the approval token of an approved call: (step id, tool name, arguments JSON)."""
    children: Any = None
    """Starts and awaits sub-agent runs (a ``domain.children.SubAgents``); None: none may run."""


@dataclass(slots=True)
class RunOutcome:
    """How a run ended, as the loop saw it; the runtime records it and publishes RunFinished."""

    status: run_pb2.RunStatus.ValueType
    output: str = ""
    error: error_pb2.Error | None = None
    usage: usage_pb2.Usage = field(default_factory=usage_pb2.Usage)
    reused_entries: int = 0
    """How many journal entries answered steps instead of downstream calls."""


class AgentLoop(Protocol):
    """Drives one run from its journal to an outcome."""

    async def execute(self, ctx: RunContext) -> RunOutcome:
        """Run (or resume) ``ctx.run``: steps already in the journal are not executed again."""
        ...
