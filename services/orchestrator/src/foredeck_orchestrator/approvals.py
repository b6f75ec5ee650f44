"""Approvals of tool calls in Redis: parking a run, deciding, expiring, listing.

A run that needs a person's approval is parked by its worker in one fenced script: the
Approval is written (``fdorch:run:{r_…}:approvals``, a hash beside the run's other keys), the
run moves to RUN_STATUS_WAITING_APPROVAL with no owner and no lease, and the fencing token
moves so nothing more is written under the old lease; the worker then acknowledges its queue
entry. Nothing holds the run while it waits.

A decision (ResolveApproval, expiry, or the run ending) is one script too: the approval's
status changes only from PENDING, and for approve, deny and expire the decision is appended to
the run's journal, ToolCallApproved and a status change to QUEUED are published and the run is
marked for queueing, all together. The queue entry is added right after (another Cluster
slot); the submission note (``fdorch:submitting:{s}``) written before the script lets a
worker's sweeper queue the run if the deciding process died in between.

Indexes outside the run's slot: ``fdorch:approvals:{t<digest>}`` (a tenant's approvals by
request time, for ListApprovals) and ``fdorch:approvals:due:{e}`` (pending approvals by expiry,
for the sweeper). They are written before the park script, so an index may name an approval
that was never written (skipped by readers), never the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from google.protobuf import timestamp_pb2

from foredeck.common.v1 import (
    agent_pb2,
    approval_pb2,
    error_pb2,
    journal_pb2,
    run_event_pb2,
    run_pb2,
    tool_pb2,
)
from foredeck_orchestrator.adapters import scripts
from foredeck_orchestrator.adapters.keys import digest
from foredeck_orchestrator.adapters.redis_runs import (
    LeaseLostError,
    RedisRuns,
    is_terminal,
    priority_name,
    status_event,
)
from foredeck_orchestrator.domain.loop.errors import Code, make_error
from foredeck_orchestrator.domain.waiting import ApprovalPending, run_id_of_approval

__all__ = ["Decision", "RedisApprovals", "approval_timeout"]

PENDING = approval_pb2.APPROVAL_STATUS_PENDING
APPROVED = approval_pb2.APPROVAL_STATUS_APPROVED
DENIED = approval_pb2.APPROVAL_STATUS_DENIED
EXPIRED = approval_pb2.APPROVAL_STATUS_EXPIRED
CANCELLED = approval_pb2.APPROVAL_STATUS_CANCELLED

_DEFAULT_TIMEOUT = timedelta(hours=24)
_MIN_TIMEOUT = timedelta(minutes=1)
_MAX_TIMEOUT = timedelta(days=7)

PARK = (
    scripts._NOW
    + scripts._EVENT
    + """
-- KEYS: run, events, approvals. ARGV: token, approval id, approval bytes, waiting event,
-- maxlen.
"""
    + scripts._FENCE
    + """
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3], ARGV[2] .. ':st', 1)
end
-- The worker is done with this delivery: a new token refuses any late write of its lease.
redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'status', 3, 'owner', '', 'lease', 0, 'deliveries', 0)
add_event(KEYS[2], KEYS[1], ARGV[4], ARGV[5], now)
return tonumber(redis.call('HGET', KEYS[3], ARGV[2] .. ':st'))
"""
)

DECIDE = (
    scripts._NOW
    + scripts._EVENT
    + """
-- KEYS: run, events, journal, approvals. ARGV: approval id, new status, approval bytes,
-- journal entry bytes ('' to journal nothing: cancelled), position of the entry in the run's
-- own journal, ToolCallApproved event, status event, maxlen.
local st = tonumber(redis.call('HGET', KEYS[4], ARGV[1] .. ':st'))
if not st then return {'missing'} end
if st ~= 1 then return {'decided', st} end
if ARGV[4] == '' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[3], ARGV[1] .. ':st', ARGV[2])
  return {'ok'}
end
local run_st = tonumber(redis.call('HGET', KEYS[1], 'status'))
if not run_st then return {'missing'} end
if run_st >= 4 then return {'finished', run_st} end
if run_st ~= 3 then return {'busy', run_st} end
if redis.call('LLEN', KEYS[3]) + 1 ~= tonumber(ARGV[5]) then return {'moved'} end
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3], ARGV[1] .. ':st', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 1, 'enq', 0)
add_event(KEYS[2], KEYS[1], ARGV[6], ARGV[8], now)
add_event(KEYS[2], KEYS[1], ARGV[7], ARGV[8], now)
return {'ok'}
"""
)


def approval_timeout(agent: agent_pb2.Agent) -> timedelta:
    """How long an approval of the agent's runs stays pending: 24 h unless the policy says."""
    policy = agent.approval_policy
    if not policy.HasField("timeout"):
        return _DEFAULT_TIMEOUT
    timeout = policy.timeout.ToTimedelta()
    if timeout <= timedelta(0):
        return _DEFAULT_TIMEOUT
    return min(max(timeout, _MIN_TIMEOUT), _MAX_TIMEOUT)


def _stamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a decision attempt found: ``ok`` (decided now), ``decided`` (it was already, see
    ``approval``), ``missing``, ``finished`` (the run ended; the approval is now cancelled)."""

    state: str
    approval: approval_pb2.Approval | None = None


class RedisApprovals:
    """Every Redis operation on approvals."""

    def __init__(self, runs: RedisRuns) -> None:
        self.runs = runs
        self.redis = runs.redis
        self.prefix = runs.keys.prefix
        self._park = self.redis.register_script(PARK)
        self._decide = self.redis.register_script(DECIDE)

    # --- keys -------------------------------------------------------------------------------

    def key(self, run_id: str) -> str:
        """The run's approvals (a hash in the run's slot)."""
        return f"{self.prefix}:run:{{{run_id}}}:approvals"

    def tenant_index(self, tenant_id: str) -> str:
        """A tenant's approvals by request time."""
        return f"{self.prefix}:approvals:{{t{digest(tenant_id)}}}"

    @property
    def due_index(self) -> str:
        """Pending approvals by expiry time."""
        return f"{self.prefix}:approvals:due:{{e}}"

    # --- worker: park -----------------------------------------------------------------------

    async def park(
        self, run: run_pb2.Run, agent: agent_pb2.Agent, pending: ApprovalPending, token: int
    ) -> approval_pb2.Approval:
        """Record the approval and park the run; raises ``LeaseLostError`` (nothing written)."""
        now = int(time.time() * 1000)
        expire = now + int(approval_timeout(agent).total_seconds() * 1000)
        approval = approval_pb2.Approval(
            approval_id=pending.approval_id,
            tenant_id=run.tenant_id,
            run_id=run.run_id,
            step_id=pending.step_id,
            agent_name=run.agent_name,
            user_id=run.user_id,
            tool_call=pending.tool_call,
            request_time=_stamp(now),
            expire_time=_stamp(expire),
            status=PENDING,
        )
        await self.redis.zadd(self.tenant_index(run.tenant_id), {pending.approval_id: now}, nx=True)
        await self.redis.zadd(self.due_index, {pending.approval_id: expire}, nx=True)
        result = await self._park(
            keys=[
                self.runs.keys.run(run.run_id),
                self.runs.keys.events(run.run_id),
                self.key(run.run_id),
            ],
            args=[
                token,
                pending.approval_id,
                approval.SerializeToString(),
                status_event(run_pb2.RUN_STATUS_RUNNING, run_pb2.RUN_STATUS_WAITING_APPROVAL),
                self.runs.event_retention,
            ],
        )
        if int(result) < 0:
            raise LeaseLostError(run.run_id)
        return approval

    # --- reads ------------------------------------------------------------------------------

    async def get(self, approval_id: str) -> approval_pb2.Approval | None:
        """The approval, or None."""
        run_id = run_id_of_approval(approval_id)
        if run_id is None:
            return None
        raw = await self.redis.hget(self.key(run_id), approval_id)
        return approval_pb2.Approval.FromString(cast(bytes, raw)) if raw else None

    async def of_run(self, run_id: str) -> list[approval_pb2.Approval]:
        """Every approval of a run, oldest request first."""
        raw: Any = await self.redis.hgetall(self.key(run_id))
        approvals = [
            approval_pb2.Approval.FromString(value)
            for name, value in raw.items()
            if not _text(name).endswith(":st")
        ]
        return sorted(approvals, key=lambda a: (a.request_time.ToMilliseconds(), a.approval_id))

    async def tenant_page(self, tenant_id: str, start: int, count: int) -> list[str]:
        """Approval ids of a tenant, oldest first, from position ``start``."""
        ids = await self.redis.zrange(self.tenant_index(tenant_id), start, start + count - 1)
        return [_text(i) for i in ids]

    async def get_many(self, approval_ids: Sequence[str]) -> list[approval_pb2.Approval | None]:
        """Several approvals in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for approval_id in approval_ids:
            pipe.hget(self.key(run_id_of_approval(approval_id) or "-"), approval_id)
        raws = await pipe.execute()
        return [approval_pb2.Approval.FromString(raw) if raw else None for raw in raws]

    # --- decisions --------------------------------------------------------------------------

    async def decide(
        self,
        approval_id: str,
        status: approval_pb2.ApprovalStatus.ValueType,
        *,
        decided_by: str = "",
        reason: str = "",
    ) -> Decision:
        """Move a pending approval to ``status`` and, unless cancelled, resume its run."""
        for _ in range(8):
            approval = await self.get(approval_id)
            if approval is None:
                return Decision("missing")
            if approval.status != PENDING:
                return Decision("decided", approval)
            run_id = approval.run_id
            record = await self.runs.get(run_id)
            if record is None:
                return Decision("missing")
            if status != CANCELLED and is_terminal(record.run.status):
                # The run ended while it waited: the approval can only be cancelled now.
                status = CANCELLED
                reason = "the run ended before a decision"
                decided_by = ""
            decided = approval_pb2.Approval()
            decided.CopyFrom(approval)
            decided.status = status
            decided.decided_by = decided_by
            decided.reason = reason
            decided.decide_time.CopyFrom(_stamp(int(time.time() * 1000)))
            entry_bytes = b""
            position = 0
            if status != CANCELLED:
                own: Any = await self.redis.llen(self.runs.keys.journal(run_id))
                position = int(own) + 1
                waiting = await self._waiting_entry(run_id, approval_id)
                entry = self._decision_entry(decided, waiting, record.fork_length + position)
                entry.fencing_token = record.token
                entry_bytes = entry.SerializeToString()
                # Noted first: a sweeper queues the run if this process dies before queueing it.
                await self.runs.begin_submit(run_id, int(time.time() * 1000))
            approved_event = run_event_pb2.RunEvent(
                tool_call_approved=run_event_pb2.ToolCallApproved(
                    approval_id=approval_id,
                    tool_call_id=approval.tool_call.tool_call_id,
                    approved=status == APPROVED,
                    reason=reason,
                    decided_by=decided_by,
                )
            ).SerializeToString()
            result = await self._decide(
                keys=[
                    self.runs.keys.run(run_id),
                    self.runs.keys.events(run_id),
                    self.runs.keys.journal(run_id),
                    self.key(run_id),
                ],
                args=[
                    approval_id,
                    int(status),
                    decided.SerializeToString(),
                    entry_bytes,
                    position,
                    approved_event,
                    status_event(run_pb2.RUN_STATUS_WAITING_APPROVAL, run_pb2.RUN_STATUS_QUEUED),
                    self.runs.event_retention,
                ],
            )
            state = _text(result[0])
            if state == "ok":
                await self.redis.zrem(self.due_index, approval_id)
                if status != CANCELLED:
                    run = record.run
                    user = _text(await self.redis.hget(self.runs.keys.run(run_id), "user"))
                    await self.runs.enqueue(
                        run_id, priority_name(run.priority), user_key=user, trace=record.trace
                    )
                    await self.runs.end_submit(run_id)
                return Decision("ok", decided)
            if status != CANCELLED:
                await self.runs.end_submit(run_id)
            if state == "missing":
                return Decision("missing")
            if state == "finished":
                status = CANCELLED
            # 'decided', 'moved', 'busy', 'finished': read again and retry.
        approval = await self.get(approval_id)
        return Decision("decided", approval) if approval is not None else Decision("missing")

    async def _waiting_entry(
        self, run_id: str, approval_id: str
    ) -> journal_pb2.JournalEntry | None:
        raws = await self.runs.journal(run_id)
        for raw in reversed(raws):
            entry = journal_pb2.JournalEntry.FromString(raw)
            if entry.tool_exchange.approval_id == approval_id:
                return entry
        return None

    @staticmethod
    def _decision_entry(
        approval: approval_pb2.Approval,
        waiting: journal_pb2.JournalEntry | None,
        entry_index: int,
    ) -> journal_pb2.JournalEntry:
        entry = journal_pb2.JournalEntry(
            run_id=approval.run_id,
            entry_index=entry_index,
            step_id=approval.step_id,
            kind=run_event_pb2.STEP_KIND_TOOL_CALL,
            start_time=approval.decide_time,
            end_time=approval.decide_time,
        )
        if waiting is not None:
            entry.step_index = waiting.step_index
            entry.attempt = waiting.attempt
            entry.description = waiting.description
            entry.trace_id = waiting.trace_id
            entry.tool_exchange.idempotency_key = waiting.tool_exchange.idempotency_key
        exchange = entry.tool_exchange
        exchange.tool_call.CopyFrom(approval.tool_call)
        exchange.approval_required = True
        exchange.approval_id = approval.approval_id
        exchange.approval_status = approval.status
        if approval.status == APPROVED:
            # The step goes on when the run resumes: this entry only records the decision.
            entry.outcome = journal_pb2.JOURNAL_ENTRY_OUTCOME_WAITING
            return entry
        expired = approval.status == EXPIRED
        error: error_pb2.Error = make_error(
            Code.DEADLINE_EXCEEDED if expired else Code.PERMISSION_DENIED,
            "APPROVAL_EXPIRED" if expired else "APPROVAL_DENIED",
            "nobody approved the tool call in time" if expired else "a person denied the tool call",
            {
                "approvalId": approval.approval_id,
                "toolName": approval.tool_call.tool_name,
                "stepId": approval.step_id,
            },
        )
        content = error.message
        if approval.reason and not expired:
            content = f"{content}: {approval.reason}"
        exchange.result.CopyFrom(
            tool_pb2.ToolResult(
                tool_call_id=approval.tool_call.tool_call_id, content=content, is_error=True
            )
        )
        entry.outcome = journal_pb2.JOURNAL_ENTRY_OUTCOME_FAILED
        entry.error.CopyFrom(error)
        return entry

    # --- expiry -----------------------------------------------------------------------------

    async def expire_due(self, now_ms: int, limit: int = 100) -> int:
        """Deny every pending approval past its expiry (APPROVAL_EXPIRED); how many."""
        due: Any = await self.redis.zrangebyscore(
            self.due_index, "-inf", now_ms, start=0, num=limit
        )
        expired = 0
        for raw in due:
            approval_id = _text(raw)
            decision = await self.decide(
                approval_id, EXPIRED, reason="nobody decided before the approval expired"
            )
            if decision.state == "ok":
                expired += 1
            else:
                await self.redis.zrem(self.due_index, approval_id)
        return expired

    async def settle(self, approval: approval_pb2.Approval) -> approval_pb2.Approval:
        """The approval as it stands now: a pending one past its expiry is expired first, and
        one whose run ended is cancelled."""
        if approval.status != PENDING:
            return approval
        if approval.expire_time.ToMilliseconds() <= int(time.time() * 1000):
            decision = await self.decide(
                approval.approval_id, EXPIRED, reason="nobody decided before the approval expired"
            )
            return decision.approval or approval
        status = await self.redis.hget(self.runs.keys.run(approval.run_id), "status")
        if status is None or is_terminal(int(_text(status) or 0)):
            decision = await self.decide(
                approval.approval_id, CANCELLED, reason="the run ended before a decision"
            )
            return decision.approval or approval
        return approval
