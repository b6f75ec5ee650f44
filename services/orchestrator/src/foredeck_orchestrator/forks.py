"""ForkRun: a new run that reuses a finished run's journal up to a step and goes on live.

The fork's record points at its source run and the number of source entries it reuses
(``fork_src``, ``fork_len``, written in the same script as the record); nothing is copied. The
worker reads the prefix through :class:`~foredeck_orchestrator.journals.ForkJournal`, so the
agent loop answers every step before ``from_step_index`` from it and executes the rest live,
under the fork's own run id: its tool calls carry new effect keys (``<fork run id>:<step id>``)
and its model calls new request ids.

Idempotent by request id like SubmitRun: the fork's run id derives from tenant and request id
(in a namespace of its own, so a fork and a submission never share an id).
"""

from __future__ import annotations

import hashlib
import time

import grpc
from opentelemetry import propagate, trace

from foredeck.common.v1 import agent_pb2, run_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck_kit.delegation import RunClaims
from foredeck_kit.errors import ServiceError
from foredeck_kit.principal import Principal
from foredeck_orchestrator.adapters.keys import digest, user_key
from foredeck_orchestrator.adapters.redis_agents import RedisAgents
from foredeck_orchestrator.adapters.redis_runs import (
    RedisRuns,
    RunRecord,
    is_terminal,
    priority_name,
)
from foredeck_orchestrator.journals import JournalPrefixGone, run_journal
from foredeck_orchestrator.validation import (
    MAX_INPUT_BYTES,
    check_budget,
    check_labels,
    check_request_id,
    invalid,
    narrow_budget,
    not_found,
    precondition,
)

__all__ = ["fork_run", "fork_run_id_for"]


def fork_run_id_for(tenant_id: str, request_id: str) -> str:
    """The run id a fork gets from its tenant and request id."""
    return "r_" + digest(tenant_id, "fork", request_id, size=32)


def _request_digest(request: pb.ForkRunRequest, user_id: str) -> str:
    data = request.SerializeToString(deterministic=True)
    return hashlib.sha256(data + b"\x00" + user_id.encode()).hexdigest()[:32]


def _check(request: pb.ForkRunRequest) -> None:
    check_request_id(request.request_id)
    if request.from_step_index < 1:
        raise invalid("from_step_index", "1 or more")
    if request.HasField("input"):
        size = len(request.input.encode())
        if size == 0:
            raise invalid("input", "1 byte or more when set")
        if size > MAX_INPUT_BYTES:
            raise ServiceError.request_too_large("input", MAX_INPUT_BYTES, size)
    if request.agent_version < 0:
        raise invalid("agent_version", "zero or positive")
    if request.priority not in run_pb2.Priority.values():
        raise invalid("priority", "unknown priority")
    check_labels(request.labels, "labels")
    check_budget(request.budget, "budget")


async def fork_run(
    runs: RedisRuns,
    agents: RedisAgents,
    principal: Principal,
    request: pb.ForkRunRequest,
    source: RunRecord,
    *,
    max_queue_length: int,
    tracer: trace.Tracer | None = None,
) -> pb.ForkRunResponse:
    """Fork the run of ``source`` (already checked visible to ``principal``)."""
    _check(request)
    run_id = fork_run_id_for(principal.tenant_id, request.request_id)
    request_digest = _request_digest(request, principal.user_id)
    existing = await runs.get(run_id)
    if existing is not None:
        if existing.digest != request_digest:
            raise ServiceError.request_id_reused(request.request_id)
        return pb.ForkRunResponse(run=existing.run, created=False)
    origin = source.run
    if not is_terminal(origin.status):
        raise precondition(
            "RUN_NOT_FINISHED",
            "the run has not finished",
            runId=origin.run_id,
            status=run_pb2.RunStatus.Name(origin.status),
        )
    try:
        entries = await run_journal(runs, source)
    except JournalPrefixGone:
        entries = []
    if not entries and origin.step_count > 0:
        raise precondition("JOURNAL_EXPIRED", "the run's journal is gone", runId=origin.run_id)
    step_count = max((e.step_index for e in entries), default=0)
    if request.from_step_index > max(step_count, 1):
        raise not_found(
            "STEP_NOT_FOUND",
            "the run has no such step",
            runId=origin.run_id,
            stepIndex=request.from_step_index,
            stepCount=step_count,
        )
    prefix = 0
    for entry in entries:
        if entry.step_index >= request.from_step_index:
            break
        prefix += 1
    version = request.agent_version or origin.agent_version
    agent = await agents.get(principal.tenant_id, origin.agent_name, version)
    if agent is None:
        latest, _ = await agents.latest_number(principal.tenant_id, origin.agent_name)
        raise not_found(
            "AGENT_VERSION_NOT_FOUND",
            "agent version not found",
            agentName=origin.agent_name,
            agentVersion=version,
            latestVersion=latest,
        )
    if agent.state == agent_pb2.AGENT_STATE_ARCHIVED:
        raise precondition("AGENT_ARCHIVED", "the agent is archived", agentName=agent.name)
    budget = narrow_budget(agent.budget, request.budget)
    priority = request.priority or run_pb2.PRIORITY_NORMAL
    queue = priority_name(priority)
    if await runs.queue_length(queue) >= max_queue_length:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "QUEUE_FULL",
            "the queue is full",
            metadata={"priority": queue},
            quota_violations=[(f"queue:{queue}", "queue length limit reached")],
        )
    run = run_pb2.Run(
        run_id=run_id,
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        agent_name=agent.name,
        agent_version=agent.version,
        input=request.input if request.HasField("input") else origin.input,
        status=run_pb2.RUN_STATUS_QUEUED,
        priority=priority,
        labels=dict(request.labels),
        budget=budget,
        request_id=request.request_id,
        forked_from_run_id=origin.run_id,
    )
    with (tracer or trace.get_tracer("foredeck_orchestrator.api")).start_as_current_span(
        "orchestrator.fork",
        attributes={
            "foredeck.run_id": run_id,
            "foredeck.forked_from_run_id": origin.run_id,
            "foredeck.from_step_index": request.from_step_index,
            "foredeck.reused_entries": prefix,
        },
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        users = user_key(principal.tenant_id, principal.user_id)
        now = int(time.time() * 1000)
        run.create_time.FromMilliseconds(now)
        await runs.begin_submit(run_id, now)
        created, stored_digest = await runs.create(
            run,
            digest=request_digest,
            claims=RunClaims.from_principal(principal).to_json(),
            trace=carrier,
            user_key=users,
            extra={"fork_src": origin.run_id, "fork_len": prefix},
        )
        if not created:
            if stored_digest != request_digest:
                raise ServiceError.request_id_reused(request.request_id)
            again = await runs.get(run_id)
            assert again is not None
            return pb.ForkRunResponse(run=again.run, created=False)
        await runs.enqueue(run_id, queue, user_key=users, trace=carrier)
        await runs.index(principal.tenant_id, run_id, now)
        await runs.end_submit(run_id)
    record = await runs.get(run_id)
    return pb.ForkRunResponse(run=record.run if record else run, created=True)
