"""How the agent loop says a run must wait for a person before a tool call.

When a step's tool needs approval (the agent's approval policy names it, or toolrunner refused
the call with APPROVAL_REQUIRED) and the journal holds no approval for that step, the loop
journals the step as waiting and raises :class:`ApprovalPending`. The worker then records the
approval and parks the run (RUN_STATUS_WAITING_APPROVAL, no lease, no queue entry) until
ResolveApproval, or expiry, journals the decision and queues it again.
"""

from __future__ import annotations

import hashlib

from foredeck.common.v1 import tool_pb2

__all__ = ["ApprovalPending", "approval_id_for", "run_id_of_approval"]

_MAX_ID = 64


def approval_id_for(run_id: str, step_id: str) -> str:
    """The approval id of a run's step: ``a_<run hex>.<step id>`` (the step's digest if long).

    One step of a run has at most one approval; the run id can be read back from the id.
    """
    body = run_id.removeprefix("r_")
    approval_id = f"a_{body}.{step_id}"
    if len(approval_id) > _MAX_ID:
        approval_id = f"a_{body}.{hashlib.sha256(step_id.encode()).hexdigest()[:16]}"
    return approval_id


def run_id_of_approval(approval_id: str) -> str | None:
    """The run an approval id belongs to, or None for an id the orchestrator never makes."""
    if not approval_id.startswith("a_") or len(approval_id) > _MAX_ID:
        return None
    body, dot, step = approval_id[2:].partition(".")
    if not dot or not step or len(body) != 32:
        return None
    if any(c not in "0123456789abcdef" for c in body):
        return None
    return f"r_{body}"


class ApprovalPending(Exception):
    """The run stops here until a person decides on ``tool_call`` of ``step_id``."""

    def __init__(self, step_id: str, tool_call: tool_pb2.ToolCall, approval_id: str) -> None:
        super().__init__(approval_id)
        self.step_id = step_id
        self.tool_call = tool_call
        self.approval_id = approval_id
