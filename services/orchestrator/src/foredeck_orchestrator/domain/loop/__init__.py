"""The agent loop: recall, plan, act, observe, replan, synthesise, remember.

:class:`PlanActLoop` implements :class:`~foredeck_orchestrator.domain.ports.AgentLoop` over the
downstream ports in :mod:`.ports` (``foredeck_orchestrator.clients`` implements them over gRPC);
:mod:`.plan` holds the plan schema and its validation, :mod:`.budget` the budget accounting and
:mod:`.prompts` the text sent to models.

A run goes: RECALL (when the agent's memory policy recalls) -> PLAN -> the plan's TOOL_CALL,
REASON and SUB_AGENT steps -> REPLAN when a step failed in a way a new plan may fix, or asked
to see its result first (``replan_after``) -> SYNTHESIZE, streamed as token deltas ->
REMEMBER (when the policy remembers), with the run and step as provenance. Every step is
journaled before the next begins, and a step the journal already holds is answered from it,
never executed again.

Step ids are ``s<index>`` for recall, plan, replan, synthesis and remember, and
``<plan step id>.<n>`` for a plan's steps (``s2.1``), so a resumed run sends the same tool
effect keys (``<run_id>:<step_id>``) and llmrouter request ids (``<run_id>:<step_id>:<attempt>``).

How a run fails (``RunOutcome.error``, domain ``orchestrator.foredeck.dev``):

- ``BUDGET_EXCEEDED``: a cap of ``Run.budget`` (steps, tokens, cost, wall time) was reached;
  checked before every step that calls a model or a tool.
- ``PLAN_INVALID`` / ``TOOL_NOT_ALLOWED``: the last plan allowed was not valid; an invalid plan
  never runs, it is journaled as a failed PLAN/REPLAN entry and replanned.
- ``REPLAN_LIMIT``: more plan revisions were needed than ``planner.max_replans`` allows.
- ``STEP_FAILED``: a downstream refused a call for a reason retrying cannot fix (its reason and
  domain in metadata ``upstreamReason`` / ``upstreamDomain``), or a tool failed while
  replanning is disabled.
- ``DOWNSTREAM_UNAVAILABLE`` / ``CIRCUIT_OPEN``: a downstream stayed unavailable through the
  retries, or its breaker stayed open.
- ``REPLAY_DIVERGED``: with ``journal_only``, the run needed a step the journal does not hold.

A TOOL_CALL step that needs a person's approval (the agent's approval policy, or toolrunner's
APPROVAL_REQUIRED) and finds none in the journal is journaled as WAITING and the loop raises
``ApprovalPending`` (``domain.waiting``): the runtime parks the run until a decision is
journaled. An approved call carries an approval token (``RunContext.approve``); a denied or
expired one is a failed step (APPROVAL_DENIED / APPROVAL_EXPIRED) the run replans on. A
SUB_AGENT step starts a child run through ``RunContext.children``; while the child runs the
loop stops with ``ChildPending`` (``domain.children``) and the runtime parks the run until the
child ends; a child that fails is a failed step (STEP_FAILED) the run replans on.

Recall and remember failures do not fail a run; they are reported as non-fatal errors.
Cancellation (``asyncio.CancelledError``) and ``LeaseLost`` propagate untouched.
"""

from foredeck_orchestrator.domain.loop.engine import LoopSettings, PlanActLoop
from foredeck_orchestrator.domain.loop.errors import (
    CircuitOpenError,
    DownstreamError,
    RunFailed,
)
from foredeck_orchestrator.domain.loop.ports import (
    CallOptions,
    Downstreams,
    LlmRouter,
    Memory,
    ToolRunner,
)

__all__ = [
    "CallOptions",
    "CircuitOpenError",
    "DownstreamError",
    "Downstreams",
    "LlmRouter",
    "LoopSettings",
    "Memory",
    "PlanActLoop",
    "RunFailed",
    "ToolRunner",
]
