"""Sub-agent runs: started by a parent's SUB_AGENT step, limited by the parent's budget.

A child is an ordinary queued run (any worker drives it) with ``parent_run_id`` and
``parent_step_id`` set, the parent's submitter and claims, and a budget that is the child
agent's narrowed by what the parent has left: tokens and cost (what the parent already used,
its earlier children included, is subtracted), wall time (the parent's remaining), depth (one
less than the parent's ``max_sub_agent_depth``; a run with depth 0 starts none) and fan-out
(the parent's ``max_sub_agents`` caps the children it starts in all). The child's run id is
derived from the parent run and step, so a resumed parent finds the child it started.

A parent does not hold a worker while its child runs: the SUB_AGENT step finds the child
unfinished and raises ``ChildPending``; the worker parks the parent (no owner, no lease, its
queue entry acknowledged, ``waiting_child`` noted) and the child's end (finished, cancelled or
dead-lettered) queues the parent again, which takes the step anew and reads the child's result.

Each run's children are listed in ``fdorch:run:{r_…}:children`` (a sorted set by creation
time, in the parent's slot): GetRunTree walks it, and CancelRun cancels the whole tree below a
run. The child's usage comes back as the SUB_AGENT step's usage, so it counts in the parent's.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import propagate

from foredeck.common.v1 import error_pb2, run_pb2, usage_pb2
from foredeck_orchestrator.adapters.keys import digest
from foredeck_orchestrator.adapters.redis_agents import RedisAgents
from foredeck_orchestrator.adapters.redis_runs import (
    RedisRuns,
    RunRecord,
    is_terminal,
    priority_name,
)
from foredeck_orchestrator.domain.children import ChildPending, ChildRefused, ChildResult
from foredeck_orchestrator.domain.loop.errors import Code, make_error

__all__ = [
    "MAX_TREE",
    "RedisChildren",
    "cancel_tree",
    "child_run_id",
    "children_key",
    "park_for_child",
    "run_tree",
    "wake_parent",
]

MAX_TREE = 1000


def children_key(runs: RedisRuns, run_id: str) -> str:
    """The run's children by creation time (a sorted set in the run's slot)."""
    return f"{runs.keys.prefix}:run:{{{run_id}}}:children"


def child_run_id(parent_run_id: str, step_id: str) -> str:
    """The run id of the child a parent's step starts."""
    return "r_" + digest(parent_run_id, "child", step_id, size=32)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _limit(parent_run_id: str, budget: str, limit: int | str, message: str) -> ChildRefused:
    return ChildRefused(
        make_error(
            Code.RESOURCE_EXHAUSTED,
            "SUB_AGENT_LIMIT",
            message,
            {"parentRunId": parent_run_id, "budget": budget, "limit": str(limit)},
        )
    )


class RedisChildren:
    """The sub-agent runs of one parent run, for the worker driving the parent."""

    def __init__(self, runs: RedisRuns, agents: RedisAgents, parent: RunRecord, user: str) -> None:
        self.runs = runs
        self.agents = agents
        self.parent = parent
        self.user = user

    async def start(self, step_id: str, agent_name: str, task: str) -> tuple[str, int]:
        parent_id = self.parent.run.run_id
        child_id = child_run_id(parent_id, step_id)
        existing = await self.runs.get(child_id)
        if existing is not None:
            return child_id, existing.run.agent_version
        fresh = await self.runs.get(parent_id)
        parent = (fresh or self.parent).run
        cap = parent.budget
        if cap.max_sub_agent_depth <= 0:
            raise _limit(parent_id, "max_sub_agent_depth", 0, "this run may start no sub-agents")
        started = int(await self.runs.redis.zcard(children_key(self.runs, parent_id)))
        if cap.max_sub_agents and started >= cap.max_sub_agents:
            raise _limit(
                parent_id, "max_sub_agents", cap.max_sub_agents, "the run started its sub-agents"
            )
        agent = await self.agents.get(parent.tenant_id, agent_name)
        if agent is None:
            raise ChildRefused(
                make_error(
                    Code.NOT_FOUND,
                    "AGENT_NOT_FOUND",
                    "the sub-agent's agent does not exist",
                    {"agentName": agent_name},
                )
            )
        budget = usage_pb2.Budget()
        budget.CopyFrom(agent.budget)
        used_tokens = parent.usage.input_tokens + parent.usage.output_tokens
        if cap.max_tokens:
            left = cap.max_tokens - used_tokens
            if left <= 0:
                raise _limit(parent_id, "max_tokens", cap.max_tokens, "the run has no tokens left")
            budget.max_tokens = min(budget.max_tokens or left, left)
        if cap.max_cost_usd_micros:
            left = cap.max_cost_usd_micros - parent.usage.cost_usd_micros
            if left <= 0:
                raise _limit(
                    parent_id, "max_cost_usd_micros", cap.max_cost_usd_micros, "no budget left"
                )
            budget.max_cost_usd_micros = min(budget.max_cost_usd_micros or left, left)
        if cap.HasField("max_wall_time") and parent.HasField("start_time"):
            ends = parent.start_time.ToMilliseconds() + cap.max_wall_time.ToMilliseconds()
            left_ms = ends - int(time.time() * 1000)
            if left_ms <= 0:
                raise _limit(parent_id, "max_wall_time", "", "the run has no time left")
            own = budget.max_wall_time.ToMilliseconds() if budget.HasField("max_wall_time") else 0
            budget.max_wall_time.FromMilliseconds(min(own or left_ms, left_ms))
        depth = cap.max_sub_agent_depth - 1
        budget.max_sub_agent_depth = min(budget.max_sub_agent_depth or depth, depth)
        if cap.max_sub_agents:
            fan = cap.max_sub_agents - started - 1
            budget.max_sub_agents = min(budget.max_sub_agents or fan, fan) if fan > 0 else 0
            if fan <= 0:
                budget.max_sub_agent_depth = 0
        child = run_pb2.Run(
            run_id=child_id,
            tenant_id=parent.tenant_id,
            user_id=parent.user_id,
            agent_name=agent.name,
            agent_version=agent.version,
            input=task,
            status=run_pb2.RUN_STATUS_QUEUED,
            priority=parent.priority,
            budget=budget,
            request_id=f"{parent_id}:{step_id}"[:64],
            parent_run_id=parent_id,
            parent_step_id=step_id,
        )
        now = int(time.time() * 1000)
        child.create_time.FromMilliseconds(now)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        # Listed first, so a tree never misses a child (a listed id not yet written is skipped).
        await self.runs.redis.zadd(children_key(self.runs, parent_id), {child_id: now}, nx=True)
        await self.runs.begin_submit(child_id, now)
        created, _ = await self.runs.create(
            child,
            digest="sub-agent",
            claims=self.parent.claims,
            trace=carrier,
            user_key=self.user,
        )
        if created:
            await self.runs.enqueue(
                child_id, priority_name(child.priority), user_key=self.user, trace=carrier
            )
            await self.runs.index(parent.tenant_id, child_id, now)
        await self.runs.end_submit(child_id)
        return child_id, agent.version

    async def wait(self, step_id: str, child_run_id: str) -> ChildResult:
        record = await self.runs.get(child_run_id)
        if record is None:
            return ChildResult(
                child_run_id,
                0,
                run_pb2.RUN_STATUS_FAILED,
                error=make_error(Code.NOT_FOUND, "RUN_NOT_FOUND", "the sub-agent run is gone"),
            )
        run = record.run
        if not is_terminal(run.status):
            # The parent is parked until the child ends (see park_for_child).
            raise ChildPending(step_id, child_run_id)
        return ChildResult(
            child_run_id,
            run.agent_version,
            run.status,
            output=run.output,
            error=run.error if run.HasField("error") else None,
            usage=run.usage,
        )


PARK_FOR_CHILD = """
-- KEYS: run. ARGV: token, child run id.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'owner', '', 'lease', 0, 'deliveries', 0, 'waiting_child', ARGV[2])
return 1
"""


async def park_for_child(runs: RedisRuns, run_id: str, token: int, child_run_id: str) -> bool:
    """Give the parent up while its child runs (no owner, no lease; its entry is then acked).

    False when the lease was lost (nothing written). The child's end queues the parent again
    (:func:`wake_parent`); the caller checks the child once more after parking, so a child
    that ended in between is not missed.
    """
    result = await runs.redis.eval(PARK_FOR_CHILD, 1, runs.keys.run(run_id), token, child_run_id)
    return int(result) > 0


async def wake_parent(runs: RedisRuns, child: run_pb2.Run) -> bool:
    """Queue the parent of a finished child again if it is parked waiting for it."""
    if not child.parent_run_id:
        return False
    key = runs.keys.run(child.parent_run_id)
    waiting, owner, user = await runs.redis.hmget(key, ["waiting_child", "owner", "user"])
    if _text(waiting) != child.run_id or _text(owner):
        return False
    parent = await runs.get(child.parent_run_id)
    if parent is None or is_terminal(parent.run.status):
        return False
    await runs.enqueue(
        parent.run.run_id,
        priority_name(parent.run.priority),
        user_key=_text(user),
        trace=parent.trace,
    )
    return True


async def run_tree(runs: RedisRuns, root: RunRecord) -> tuple[list[run_pb2.Run], bool]:
    """The run and its descendants depth first, children in creation order; (runs, truncated)."""
    out: list[run_pb2.Run] = []
    stack: list[RunRecord] = [root]
    while stack:
        record = stack.pop()
        if len(out) >= MAX_TREE:
            return out, True
        out.append(record.run)
        ids = [
            _text(i) for i in await runs.redis.zrange(children_key(runs, record.run.run_id), 0, -1)
        ]
        kids = [k for k in await runs.get_many(ids) if k is not None]
        kids = [k for k in kids if k.run.tenant_id == root.run.tenant_id]
        stack.extend(reversed(kids))
    return out, False


async def cancel_tree(runs: RedisRuns, run_id: str, error: error_pb2.Error) -> int:
    """Cancel every unfinished run below ``run_id``; how many were cancelled."""
    cancelled = 0
    pending = [run_id]
    seen: set[str] = set()
    while pending and len(seen) < MAX_TREE:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        ids = [_text(i) for i in await runs.redis.zrange(children_key(runs, current), 0, -1)]
        for record in await runs.get_many(ids):
            if record is None:
                continue
            child = record.run
            pending.append(child.run_id)
            for _ in range(5):
                if is_terminal(child.status):
                    break
                outcome, _ = await runs.cancel(child.run_id, child.status, error)
                if outcome == "ok":
                    await runs.announce_cancel(child.run_id)
                    cancelled += 1
                    break
                fresh = await runs.get(child.run_id)
                if fresh is None:
                    break
                child = fresh.run
    return cancelled
