"""What the agent loop needs to run a SUB_AGENT step: start a child run and wait for it.

The runtime implements :class:`SubAgents` (``foredeck_orchestrator.children``); the loop only
asks. A child's run id is derived from the parent run and step, so a parent resumed after a
crash finds the child it already started instead of starting another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from foredeck.common.v1 import error_pb2, run_pb2, usage_pb2

__all__ = ["ChildPending", "ChildRefused", "ChildResult", "SubAgents"]


class ChildRefused(Exception):
    """The child could not be started (a sub-agent limit, an unknown agent); ``error`` says why."""

    def __init__(self, error: error_pb2.Error) -> None:
        super().__init__(error.message)
        self.error = error


class ChildPending(Exception):
    """The step's child has not finished: the run stops here and is queued again when it does.

    Nothing of the step is journaled; the resumed run takes the step again, finds the child it
    started (same id) and, once the child has finished, its result.
    """

    def __init__(self, step_id: str, child_run_id: str) -> None:
        super().__init__(child_run_id)
        self.step_id = step_id
        self.child_run_id = child_run_id


@dataclass(slots=True)
class ChildResult:
    """How a child run ended."""

    run_id: str
    agent_version: int
    status: run_pb2.RunStatus.ValueType
    output: str = ""
    error: error_pb2.Error | None = None
    usage: usage_pb2.Usage = field(default_factory=usage_pb2.Usage)


class SubAgents(Protocol):
    """Child runs of the run being driven."""

    async def start(self, step_id: str, agent_name: str, task: str) -> tuple[str, int]:
        """Start (or find, when already started) the step's child; its run id and version.

        Raises :class:`ChildRefused` when limits or the agent forbid it."""
        ...

    async def wait(self, step_id: str, child_run_id: str) -> ChildResult:
        """The child's result once it finished; :class:`ChildPending` while it has not."""
        ...
