"""The API role's gRPC face: AgentService and RunService over Redis.

The tenant and user always come from the verified principal. Runs of another tenant, or of
another user without ``runs:all_users``, are reported as not found.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import TracerProvider
from redis.exceptions import RedisError

from foredeck.common.v1 import agent_pb2, error_pb2, journal_pb2, run_event_pb2, run_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from foredeck_kit.delegation import RunClaims
from foredeck_kit.errors import ServiceError
from foredeck_kit.principal import Principal, current_principal
from foredeck_orchestrator.adapters.keys import digest, run_id_for, user_key
from foredeck_orchestrator.adapters.redis_agents import RedisAgents
from foredeck_orchestrator.adapters.redis_runs import (
    RedisRuns,
    RunRecord,
    is_terminal,
    priority_name,
)
from foredeck_orchestrator.approval_api import list_approvals, resolve_approval
from foredeck_orchestrator.approvals import RedisApprovals
from foredeck_orchestrator.children import cancel_tree, children_key, run_tree, wake_parent
from foredeck_orchestrator.defaults import (
    DEFAULT_AGENT_NAME,
    DEFAULT_AGENT_REQUEST_ID,
    default_agent,
)
from foredeck_orchestrator.forks import fork_run
from foredeck_orchestrator.journals import JournalPrefixGone, run_journal
from foredeck_orchestrator.replay import replay_run
from foredeck_orchestrator.validation import (
    MAX_INPUT_BYTES,
    check_agent,
    check_budget,
    check_labels,
    check_name,
    check_page_size,
    check_request_id,
    check_run_id,
    decode_page_token,
    encode_page_token,
    invalid,
    narrow_budget,
    not_found,
    precondition,
)

__all__ = ["GATEWAY_ONLY_METHODS", "AgentServicer", "RunServicer"]

DOMAIN = "orchestrator.foredeck.dev"
AGENT_SERVICE = "foredeck.orchestrator.v1.AgentService"
RUN_SERVICE = "foredeck.orchestrator.v1.RunService"

GATEWAY_ONLY_METHODS = (
    f"/{AGENT_SERVICE}/CreateAgent",
    f"/{AGENT_SERVICE}/CreateAgentVersion",
    f"/{AGENT_SERVICE}/DeleteAgent",
    f"/{RUN_SERVICE}/CancelRun",
    f"/{RUN_SERVICE}/ResolveApproval",
    f"/{RUN_SERVICE}/ReplayRun",
    f"/{RUN_SERVICE}/ForkRun",
)

T = TypeVar("T")

_EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
_UNENQUEUED_GRACE_MS = 5_000
_SETTABLE = (
    "description",
    "system_prompt",
    "model",
    "temperature",
    "max_output_tokens",
    "allowed_tools",
    "allowed_sub_agents",
    "memory_policy",
    "planner",
    "budget",
    "approval_policy",
    "labels",
)
_NESTED = {
    "memory_policy": agent_pb2.MemoryPolicy,
    "planner": agent_pb2.PlannerSettings,
    "budget": None,
    "approval_policy": agent_pb2.ApprovalPolicy,
}
_EVENT_FIELDS = {
    run_event_pb2.RUN_EVENT_TYPE_STATUS_CHANGED: "status_changed",
    run_event_pb2.RUN_EVENT_TYPE_STEP_STARTED: "step_started",
    run_event_pb2.RUN_EVENT_TYPE_STEP_FINISHED: "step_finished",
    run_event_pb2.RUN_EVENT_TYPE_TOKEN_DELTA: "token_delta",
    run_event_pb2.RUN_EVENT_TYPE_TOOL_CALL_REQUESTED: "tool_call_requested",
    run_event_pb2.RUN_EVENT_TYPE_TOOL_CALL_APPROVED: "tool_call_approved",
    run_event_pb2.RUN_EVENT_TYPE_TOOL_CALL_FINISHED: "tool_call_finished",
    run_event_pb2.RUN_EVENT_TYPE_MEMORY_STORED: "memory_stored",
    run_event_pb2.RUN_EVENT_TYPE_ERROR: "error",
    run_event_pb2.RUN_EVENT_TYPE_RUN_FINISHED: "run_finished",
}


def store_errors(cls: type[T]) -> type[T]:
    """Turn Redis failures in every RPC of ``cls`` into UNAVAILABLE STORE_UNAVAILABLE."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not callable(method):
            continue
        if inspect.isasyncgenfunction(method):
            setattr(cls, name, _guard_stream(method))
        elif inspect.iscoroutinefunction(method):
            setattr(cls, name, _guard_unary(method))
    return cls


def _guard_unary(method: Any) -> Any:
    @functools.wraps(method)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as error:
            raise ServiceError.store_unavailable("redis") from error

    return guarded


def _guard_stream(method: Any) -> Any:
    @functools.wraps(method)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            async for item in method(*args, **kwargs):
                yield item
        except (RedisError, OSError) as error:
            raise ServiceError.store_unavailable("redis") from error

    return guarded


def _now_ms() -> int:
    return int(time.time() * 1000)


def _content_digest(message: Any, *extra: str) -> str:
    data = message.SerializeToString(deterministic=True)
    return hashlib.sha256(data + "\x00".join(extra).encode()).hexdigest()[:32]


def _etag(tenant_id: str, name: str, version: int) -> str:
    return f'"{version}-{digest(tenant_id, name, str(version), size=12)}"'


# --- agents ---------------------------------------------------------------------------------


def _stored_version(principal: Principal, source: agent_pb2.Agent, version: int) -> agent_pb2.Agent:
    """``source`` as version ``version`` of the caller's tenant, output-only fields set."""
    agent = agent_pb2.Agent()
    agent.CopyFrom(source)
    for output_only in ("tenant_id", "state", "create_time", "created_by", "archive_time"):
        agent.ClearField(output_only)
    agent.version = version
    agent.tenant_id = principal.tenant_id
    agent.create_time.FromMilliseconds(_now_ms())
    agent.created_by = principal.user_id
    agent.etag = _etag(principal.tenant_id, agent.name, version)
    return agent


@store_errors
class AgentServicer(pb_grpc.AgentServiceServicer):
    """Versioned agent definitions of the caller's tenant."""

    def __init__(self, agents: RedisAgents) -> None:
        self.agents = agents

    async def CreateAgent(
        self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateAgentResponse:
        """CreateAgent: version 1 of a new agent."""
        principal = current_principal()
        principal.require("agents:write")
        check_request_id(request.request_id)
        check_agent(request.agent)
        content = agent_pb2.Agent()
        content.CopyFrom(request.agent)
        for output_only in ("version", "tenant_id", "state", "create_time", "created_by"):
            content.ClearField(output_only)
        content.ClearField("archive_time")
        content.ClearField("etag")
        stored = _stored_version(principal, content, 1)
        write = await self.agents.create(
            principal.tenant_id, stored, request.request_id, _content_digest(content)
        )
        if write.state == "reused":
            raise ServiceError.request_id_reused(request.request_id)
        if write.state == "exists":
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "AGENT_ALREADY_EXISTS",
                "an agent with this name exists",
                metadata={"agentName": request.agent.name},
            )
        assert write.agent is not None
        return pb.CreateAgentResponse(agent=write.agent)

    def _merge(
        self, latest: agent_pb2.Agent, request: pb.CreateAgentVersionRequest
    ) -> agent_pb2.Agent:
        paths = list(request.update_mask.paths)
        if paths == ["*"]:
            merged = agent_pb2.Agent()
            merged.CopyFrom(request.agent)
            merged.name = latest.name
            return merged
        if not paths:
            paths = [f.name for f, _ in request.agent.ListFields() if f.name in _SETTABLE]
        for i, path in enumerate(paths):
            head, _, tail = path.partition(".")
            ok = head in _SETTABLE and (not tail or head in _NESTED)
            if ok and tail:
                holder = getattr(request.agent, head)
                ok = tail in holder.DESCRIPTOR.fields_by_name
            if not ok:
                raise invalid(f"update_mask.paths[{i}]", "not a settable field of Agent")
        merged = agent_pb2.Agent()
        merged.CopyFrom(latest)
        field_mask_pb2.FieldMask(paths=paths).MergeMessage(
            request.agent, merged, replace_message_field=True, replace_repeated_field=True
        )
        return merged

    async def CreateAgentVersion(
        self, request: pb.CreateAgentVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateAgentVersionResponse:
        """CreateAgentVersion: a new immutable version of an agent."""
        principal = current_principal()
        principal.require("agents:write")
        check_request_id(request.request_id)
        name = request.agent.name
        check_name(name, "agent.name")
        check_budget(request.agent.budget, "agent.budget")
        request_digest = _content_digest(request)
        for _ in range(8):
            latest = await self.agents.get(principal.tenant_id, name)
            if latest is None:
                raise not_found("AGENT_NOT_FOUND", "agent not found", agentName=name)
            merged = self._merge(latest, request)
            check_agent(merged)
            if request.etag and request.etag != latest.etag:
                # The request id is checked first: a retry of a write that succeeded returns it.
                again = await self.agents.create_version(
                    principal.tenant_id, name, merged, request.request_id, request_digest, -1
                )
                if again.state == "again" and again.agent is not None:
                    return pb.CreateAgentVersionResponse(agent=again.agent)
                if again.state == "reused":
                    raise ServiceError.request_id_reused(request.request_id)
                raise ServiceError(
                    grpc.StatusCode.ABORTED,
                    "ETAG_MISMATCH",
                    "the agent changed since the etag was read",
                    metadata={"agentName": name, "latestVersion": latest.version},
                )
            stored = _stored_version(principal, merged, latest.version + 1)
            write = await self.agents.create_version(
                principal.tenant_id,
                name,
                stored,
                request.request_id,
                request_digest,
                latest.version,
            )
            if write.state in ("created", "again"):
                assert write.agent is not None
                return pb.CreateAgentVersionResponse(agent=write.agent)
            if write.state == "reused":
                raise ServiceError.request_id_reused(request.request_id)
            if write.state == "missing":
                raise not_found("AGENT_NOT_FOUND", "agent not found", agentName=name)
            if write.state == "archived":
                raise precondition("AGENT_ARCHIVED", "the agent is archived", agentName=name)
            if request.etag:
                raise ServiceError(
                    grpc.StatusCode.ABORTED,
                    "ETAG_MISMATCH",
                    "the agent changed",
                    metadata={"agentName": name},
                )
        raise ServiceError(grpc.StatusCode.ABORTED, "ETAG_MISMATCH", "the agent kept changing")

    async def GetAgent(
        self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAgentResponse:
        """GetAgent: one version, the latest by default."""
        principal = current_principal()
        principal.require("agents:read")
        check_name(request.agent_name)
        if request.agent_version < 0:
            raise invalid("agent_version", "zero or positive")
        agent = await self._resolve(principal.tenant_id, request.agent_name, request.agent_version)
        return pb.GetAgentResponse(agent=agent)

    async def _resolve(self, tenant_id: str, name: str, version: int) -> agent_pb2.Agent:
        agent = await self.agents.get(tenant_id, name, version)
        if agent is not None:
            return agent
        latest, _ = await self.agents.latest_number(tenant_id, name)
        if not latest:
            raise not_found("AGENT_NOT_FOUND", "agent not found", agentName=name)
        raise not_found(
            "AGENT_VERSION_NOT_FOUND", "agent version not found", agentName=name, version=version
        )

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAgentsResponse:
        """ListAgents: the latest version of each agent, by name."""
        principal = current_principal()
        principal.require("agents:read")
        size = check_page_size(request.page_size, 50, 200)
        check_labels(request.labels, "labels", limit=16)
        query = json.dumps(
            [principal.tenant_id, request.include_archived, sorted(request.labels.items())]
        )
        after = decode_page_token(request.page_token, query) or ""
        out: list[agent_pb2.Agent] = []
        more = False
        while len(out) < size:
            names = await self.agents.names(principal.tenant_id, after, size)
            if not names:
                break
            for name in names:
                if len(out) == size:
                    more = True
                    break
                after = name
                agent = await self.agents.get(principal.tenant_id, name)
                if agent is None:
                    continue
                if agent.state == agent_pb2.AGENT_STATE_ARCHIVED and not request.include_archived:
                    continue
                if any(agent.labels.get(k) != v for k, v in request.labels.items()):
                    continue
                out.append(agent)
            if more:
                break
        if not more and len(out) == size:
            more = bool(await self.agents.names(principal.tenant_id, after, 1))
        token = encode_page_token(query, after) if more else ""
        return pb.ListAgentsResponse(agents=out, next_page_token=token)

    async def ListAgentVersions(
        self, request: pb.ListAgentVersionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAgentVersionsResponse:
        """ListAgentVersions: every version of one agent, newest first."""
        principal = current_principal()
        principal.require("agents:read")
        check_name(request.agent_name)
        size = check_page_size(request.page_size, 50, 200)
        query = json.dumps([principal.tenant_id, request.agent_name])
        latest, _ = await self.agents.latest_number(principal.tenant_id, request.agent_name)
        if not latest:
            raise not_found("AGENT_NOT_FOUND", "agent not found", agentName=request.agent_name)
        start = decode_page_token(request.page_token, query)
        top = int(start) if isinstance(start, int) else latest
        numbers = list(range(top, max(top - size, 0), -1))
        agents = await self.agents.versions(principal.tenant_id, request.agent_name, numbers)
        rest = top - size
        token = encode_page_token(query, rest) if rest >= 1 else ""
        return pb.ListAgentVersionsResponse(agents=agents, next_page_token=token)

    async def DeleteAgent(
        self, request: pb.DeleteAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteAgentResponse:
        """DeleteAgent: archive the agent."""
        principal = current_principal()
        principal.require("agents:write")
        check_name(request.agent_name)
        if not await self.agents.archive(principal.tenant_id, request.agent_name):
            raise not_found("AGENT_NOT_FOUND", "agent not found", agentName=request.agent_name)
        agent = await self.agents.get(principal.tenant_id, request.agent_name)
        assert agent is not None
        return pb.DeleteAgentResponse(agent=agent)


# --- runs -----------------------------------------------------------------------------------


def _visible(principal: Principal, record: RunRecord | None) -> bool:
    if record is None:
        return False
    run = record.run
    if run.tenant_id != principal.tenant_id:
        return False
    return run.user_id == principal.user_id or principal.has("runs:all_users")


@store_errors
class RunServicer(pb_grpc.RunServiceServicer):
    """Submit, read, watch and cancel runs."""

    def __init__(
        self,
        runs: RedisRuns,
        agents: RedisAgents,
        *,
        max_queue_length: int,
        stopping: asyncio.Event | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.runs = runs
        self.agents = agents
        self.max_queue_length = max_queue_length
        self.stopping = stopping or asyncio.Event()
        self.approvals = RedisApprovals(runs)
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer = provider.get_tracer("foredeck_orchestrator.api")

    async def _visible_run(self, principal: Principal, run_id: str) -> RunRecord:
        check_run_id(run_id)
        record = await self.runs.get(run_id)
        if record is None or not _visible(principal, record):
            raise not_found("RUN_NOT_FOUND", "run not found", runId=run_id)
        return record

    async def _create_default_agent(
        self, principal: Principal, version: int
    ) -> agent_pb2.Agent | None:
        """Version 1 of the built-in ``default`` agent for the caller's tenant, made on first use.

        Concurrent first runs race on the same request id and content, so all of them get the
        one agent; a tenant that archived or re-versioned it is left as it is.
        """
        if version > 1:
            return None
        content = default_agent()
        stored = _stored_version(principal, content, 1)
        stored.created_by = "foredeck"
        write = await self.agents.create(
            principal.tenant_id, stored, DEFAULT_AGENT_REQUEST_ID, _content_digest(content)
        )
        if write.agent is not None:
            return write.agent
        return await self.agents.get(principal.tenant_id, DEFAULT_AGENT_NAME, version)

    async def SubmitRun(
        self, request: pb.SubmitRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SubmitRunResponse:
        """SubmitRun: record the run and queue it durably, once per request id."""
        principal = current_principal()
        principal.require("runs:create")
        check_request_id(request.request_id)
        check_name(request.agent_name)
        if request.agent_version < 0:
            raise invalid("agent_version", "zero or positive")
        size = len(request.input.encode())
        if size == 0:
            raise invalid("input", "required")
        if size > MAX_INPUT_BYTES:
            raise ServiceError.request_too_large("input", MAX_INPUT_BYTES, size)
        if request.priority not in run_pb2.Priority.values():
            raise invalid("priority", "unknown priority")
        check_labels(request.labels, "labels")
        check_budget(request.budget, "budget")
        if bool(request.parent_run_id) != principal.delegated:
            # A top-level run comes from the gateway; a sub-agent run from its parent's worker.
            raise ServiceError.delegation_not_allowed()
        if request.parent_run_id:
            principal.require_run(request.parent_run_id, required=True)
            if not request.parent_step_id:
                raise invalid("parent_step_id", "required with parent_run_id")
            parent = await self.runs.get(request.parent_run_id)
            if parent is None or parent.run.tenant_id != principal.tenant_id:
                raise not_found("RUN_NOT_FOUND", "parent run not found")
            if is_terminal(parent.run.status):
                raise precondition("RUN_NOT_ACTIVE", "the parent run has finished")

        run_id = run_id_for(principal.tenant_id, request.request_id)
        request_digest = _content_digest(request, principal.user_id)
        existing = await self.runs.get(run_id)
        if existing is not None:
            return await self._again(existing, request_digest, request.request_id)

        agent = await self.agents.get(
            principal.tenant_id, request.agent_name, request.agent_version
        )
        if agent is None and request.agent_name == DEFAULT_AGENT_NAME:
            agent = await self._create_default_agent(principal, request.agent_version)
        if agent is None:
            await AgentServicer(self.agents)._resolve(
                principal.tenant_id, request.agent_name, request.agent_version
            )
            raise not_found("AGENT_NOT_FOUND", "agent not found")
        if agent.state == agent_pb2.AGENT_STATE_ARCHIVED:
            raise precondition(
                "AGENT_ARCHIVED", "the agent is archived", agentName=request.agent_name
            )
        budget = narrow_budget(agent.budget, request.budget)
        priority = request.priority or run_pb2.PRIORITY_NORMAL
        queue = priority_name(priority)
        if await self.runs.queue_length(queue) >= self.max_queue_length:
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
            input=request.input,
            status=run_pb2.RUN_STATUS_QUEUED,
            priority=priority,
            labels=dict(request.labels),
            budget=budget,
            request_id=request.request_id,
            parent_run_id=request.parent_run_id,
            parent_step_id=request.parent_step_id,
        )
        now = _now_ms()
        run.create_time.FromMilliseconds(now)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        users = user_key(principal.tenant_id, principal.user_id)
        # Noted first: if this process dies after recording the run and before queueing it,
        # a worker's sweeper queues it.
        await self.runs.begin_submit(run_id, now)
        created, stored_digest = await self.runs.create(
            run,
            digest=request_digest,
            claims=RunClaims.from_principal(principal).to_json(),
            trace=carrier,
            user_key=users,
        )
        if not created:
            if stored_digest != request_digest:
                raise ServiceError.request_id_reused(request.request_id)
            record = await self.runs.get(run_id)
            assert record is not None
            return pb.SubmitRunResponse(run=record.run, created=False)
        if request.parent_run_id:
            # Listed under its parent, for GetRunTree and for cancelling the whole tree.
            children = children_key(self.runs, request.parent_run_id)
            await self.runs.redis.zadd(children, {run_id: now}, nx=True)
        await self.runs.enqueue(run_id, queue, user_key=users, trace=carrier)
        await self.runs.index(principal.tenant_id, run_id, now)
        await self.runs.end_submit(run_id)
        record = await self.runs.get(run_id)
        return pb.SubmitRunResponse(run=record.run if record else run, created=True)

    async def _again(
        self, record: RunRecord, request_digest: str, request_id: str
    ) -> pb.SubmitRunResponse:
        if record.digest != request_digest:
            raise ServiceError.request_id_reused(request_id)
        if not record.enqueued and _now_ms() - record.created_ms > _UNENQUEUED_GRACE_MS:
            # The first submission stopped between recording and queueing: finish its work.
            # A duplicate queue entry is harmless: a worker drops entries of runs it cannot take.
            run = record.run
            users = user_key(run.tenant_id, run.user_id)
            await self.runs.enqueue(
                run.run_id, priority_name(run.priority), user_key=users, trace=record.trace
            )
            await self.runs.index(run.tenant_id, run.run_id, record.created_ms)
            await self.runs.end_submit(run.run_id)
        return pb.SubmitRunResponse(run=record.run, created=False)

    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetRunResponse:
        """GetRun: the run's current state."""
        principal = current_principal()
        principal.require("runs:read")
        record = await self._visible_run(principal, request.run_id)
        return pb.GetRunResponse(run=record.run)

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRunsResponse:
        """ListRuns: the tenant's runs, newest first, filtered."""
        principal = current_principal()
        principal.require("runs:read")
        if request.include_all_users:
            principal.require("runs:all_users")
        size = check_page_size(request.page_size, 50, 200)
        statuses = set(request.statuses)
        if len(request.statuses) > 8 or run_pb2.RUN_STATUS_UNSPECIFIED in statuses:
            raise invalid("statuses", "at most 8, none unspecified")
        if request.agent_name:
            check_name(request.agent_name)
        check_labels(request.labels, "labels", limit=16)
        after_ms = (
            request.create_time_after.ToMilliseconds()
            if request.HasField("create_time_after")
            else None
        )
        query = json.dumps(
            [
                principal.tenant_id,
                principal.user_id,
                sorted(statuses),
                request.agent_name,
                sorted(request.labels.items()),
                after_ms,
                request.parent_run_id,
                request.include_all_users,
            ]
        )
        position = decode_page_token(request.page_token, query)
        offset = int(position) if isinstance(position, int) else 0
        out: list[run_pb2.Run] = []
        scanned = 0
        exhausted = False
        while len(out) < size and scanned < 5000:
            ids = await self.runs.tenant_page(principal.tenant_id, offset, 100)
            if not ids:
                exhausted = True
                break
            records = await self.runs.get_many(ids)
            for record in records:
                if len(out) == size:
                    break
                offset += 1
                scanned += 1
                if record is None:
                    continue
                run = record.run
                if not request.include_all_users and run.user_id != principal.user_id:
                    continue
                if statuses and run.status not in statuses:
                    continue
                if request.agent_name and run.agent_name != request.agent_name:
                    continue
                if request.parent_run_id and run.parent_run_id != request.parent_run_id:
                    continue
                if after_ms is not None and run.create_time.ToMilliseconds() <= after_ms:
                    # Newest first: everything further is older still.
                    exhausted = True
                    break
                if any(run.labels.get(k) != v for k, v in request.labels.items()):
                    continue
                out.append(run)
            if exhausted:
                break
        if not exhausted and not await self.runs.tenant_page(principal.tenant_id, offset, 1):
            exhausted = True
        token = "" if exhausted else encode_page_token(query, offset)
        return pb.ListRunsResponse(runs=out, next_page_token=token)

    async def GetRunTree(
        self, request: pb.GetRunTreeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetRunTreeResponse:
        """GetRunTree: the run and its sub-agent runs, depth first."""
        principal = current_principal()
        principal.require("runs:read")
        record = await self._visible_run(principal, request.run_id)
        tree, truncated = await run_tree(self.runs, record)
        return pb.GetRunTreeResponse(runs=tree, truncated=truncated)

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchRunResponse]:
        """WatchRun: the run's events from after ``after_event_id``, live, until it finishes."""
        principal = current_principal()
        principal.require("runs:read")
        if request.after_event_id and not _EVENT_ID.fullmatch(request.after_event_id):
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "EVENT_ID_INVALID",
                "not an event id of this run",
                field_violations=[("after_event_id", "an event id such as 1700000000000-0")],
            )
        if len(request.event_types) > 16:
            raise invalid("event_types", "at most 16")
        wanted: set[str] = set()
        for i, kind in enumerate(request.event_types):
            if kind not in _EVENT_FIELDS:
                raise invalid(f"event_types[{i}]", "unknown or unspecified event type")
            wanted.add(_EVENT_FIELDS[kind])
        await self._visible_run(principal, request.run_id)
        run_id = request.run_id
        cursor = request.after_event_id or "0-0"
        if request.after_event_id:
            # Events after the cursor are lost only when one newer than it was trimmed.
            trimmed = await self.runs.trimmed_through(run_id)
            if trimmed and _older(cursor, trimmed):
                first = await self.runs.first_event(run_id)
                raise ServiceError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "EVENTS_TRIMMED",
                    "events after this id are no longer kept",
                    metadata={"oldestEventId": first.event_id if first is not None else ""},
                )
        while True:
            events = await self.runs.events_after(run_id, cursor)
            if not events:
                if self.stopping.is_set():
                    raise ServiceError.shutting_down()
                events = await self.runs.wait_events(run_id, cursor, 1000)
                if not events:
                    if await self.runs.get(run_id) is None:
                        # The run expired while watched: it is gone for every reader now.
                        raise not_found("RUN_NOT_FOUND", "run not found", runId=run_id)
                    continue
            for event in events:
                cursor = event.event_id
                kind = event.WhichOneof("payload")
                if not wanted or kind in wanted or kind == "run_finished":
                    yield pb.WatchRunResponse(event=event)
                if kind == "run_finished":
                    return

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelRunResponse:
        """CancelRun: stop the run; its worker is told at once."""
        principal = current_principal()
        principal.require("runs:cancel")
        if len(request.reason) > 1024:
            raise invalid("reason", "at most 1,024 characters")
        record = await self._visible_run(principal, request.run_id)
        error = error_pb2.Error(
            code=int(grpc.StatusCode.CANCELLED.value[0]),
            reason="RUN_CANCELLED",
            domain=DOMAIN,
            message="the run was cancelled",
            metadata={"reason": request.reason, "cancelledBy": principal.user_id},
        )
        for _ in range(10):
            status = record.run.status
            if status == run_pb2.RUN_STATUS_CANCELLED:
                return pb.CancelRunResponse(run=record.run)
            if is_terminal(status):
                raise precondition(
                    "RUN_ALREADY_FINISHED",
                    "the run has finished",
                    runId=request.run_id,
                    status=run_pb2.RunStatus.Name(status),
                )
            outcome, _ = await self.runs.cancel(request.run_id, status, error)
            if outcome == "ok":
                await self.runs.announce_cancel(request.run_id)
                # Every sub-agent run below it stops too, and a parent waiting for it goes on.
                await cancel_tree(self.runs, request.run_id, error)
                await wake_parent(self.runs, record.run)
            fresh = await self.runs.get(request.run_id)
            if fresh is None:
                raise not_found("RUN_NOT_FOUND", "run not found", runId=request.run_id)
            record = fresh
        return pb.CancelRunResponse(run=record.run)

    async def ListJournalEntries(
        self, request: pb.ListJournalEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListJournalEntriesResponse:
        """ListJournalEntries: the run's step journal in order."""
        principal = current_principal()
        principal.require("runs:read")
        if request.view not in journal_pb2.JournalView.values():
            raise invalid("view", "unknown view")
        full = request.view == journal_pb2.JOURNAL_VIEW_FULL
        size = check_page_size(request.page_size, 20 if full else 100, 100 if full else 500)
        record = await self._visible_run(principal, request.run_id)
        query = json.dumps([request.run_id, int(request.view)])
        position = decode_page_token(request.page_token, query)
        offset = int(position) if isinstance(position, int) else 0
        if record.fork_source:
            # A fork's journal starts with its source's entries, read where they are.
            try:
                whole = await run_journal(self.runs, record)
            except JournalPrefixGone:
                raise precondition(
                    "JOURNAL_EXPIRED", "the journal of the run's source is gone"
                ) from None
            raws = [e.SerializeToString() for e in whole[offset : offset + size + 1]]
        else:
            raws = await self.runs.journal(request.run_id, offset, offset + size)
        entries = []
        for raw in raws[:size]:
            entry = journal_pb2.JournalEntry.FromString(raw)
            if not full:
                entry.ClearField("record")
            entries.append(entry)
        token = encode_page_token(query, offset + size) if len(raws) > size else ""
        return pb.ListJournalEntriesResponse(entries=entries, next_page_token=token)

    async def ListApprovals(
        self, request: pb.ListApprovalsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListApprovalsResponse:
        """ListApprovals: approvals of one run or of every run the caller may see."""
        principal = current_principal()
        principal.require("runs:read")
        return await list_approvals(self.approvals, principal, request, self._visible_run)

    async def ResolveApproval(
        self, request: pb.ResolveApprovalRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResolveApprovalResponse:
        """ResolveApproval: approve or deny a pending tool call; its run resumes."""
        principal = current_principal()
        return await resolve_approval(self.approvals, self.runs, principal, request, _visible)

    async def ReplayRun(
        self, request: pb.ReplayRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReplayRunResponse:
        """ReplayRun: re-execute a finished run from its journal, calling nothing."""
        principal = current_principal()
        principal.require("runs:read")
        record = await self._visible_run(principal, request.run_id)
        return await replay_run(
            self.runs, self.agents, record, strict=request.strict, tracer=self.tracer
        )

    async def ForkRun(
        self, request: pb.ForkRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ForkRunResponse:
        """ForkRun: a new run reusing a finished run's journal up to a step."""
        principal = current_principal()
        principal.require("runs:create")
        record = await self._visible_run(principal, request.run_id)
        return await fork_run(
            self.runs,
            self.agents,
            principal,
            request,
            record,
            max_queue_length=self.max_queue_length,
            tracer=self.tracer,
        )


def _older(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes strictly before ``b``."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) < (int(bms), int(bseq or 0))
