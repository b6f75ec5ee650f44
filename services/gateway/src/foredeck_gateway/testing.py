"""A scripted orchestrator for the gateway's tests and benchmark: a real grpc.aio server.

It implements ``foredeck.orchestrator.v1.RunService`` and ``AgentService`` in memory and behaves
the way the gateway relies on the real one to: it verifies the gateway's principal (the kit's
verifier, so a principal the gateway mints wrongly is refused), takes tenant and user only from
it, records each principal it received, makes ``SubmitRun`` idempotent per tenant and request
id, reports another tenant's (or, without ``runs:all_users``, another user's) run as
``RUN_NOT_FOUND``, streams events resumable from an event id, and reports the run's usage when
it finishes. Tests drive runs with :meth:`ScriptedOrchestrator.finish` and friends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt

from foredeck.common.v1 import agent_pb2, run_event_pb2, run_pb2, usage_pb2
from foredeck.gateway.v1 import api_key_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as orch
from foredeck.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.credentials import hash_secret, new_api_key_secret
from foredeck_gateway.server import GatewayHost, build_server
from foredeck_kit.errors import ServiceError, domain_for
from foredeck_kit.principal import (
    Principal,
    PrincipalVerifier,
    current_principal,
    format_keys,
    generate_key,
)
from foredeck_kit.server import ServiceHost, build_grpc_server
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import Telemetry

__all__ = [
    "Gateway",
    "ScriptedOrchestrator",
    "SeenCall",
    "bearer",
    "eventually",
    "make_jwt",
    "running_gateway",
]

DOMAIN = domain_for("orchestrator")
SERVICE_NAMES = ("foredeck.orchestrator.v1.RunService", "foredeck.orchestrator.v1.AgentService")
_TERMINAL = {
    run_pb2.RUN_STATUS_SUCCEEDED,
    run_pb2.RUN_STATUS_FAILED,
    run_pb2.RUN_STATUS_CANCELLED,
    run_pb2.RUN_STATUS_DEAD_LETTERED,
}


@dataclass(frozen=True, slots=True)
class SeenCall:
    """One call the orchestrator received: which method, for whom, and with what deadline."""

    method: str
    principal: Principal
    time_remaining: float | None


def _error(code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(code, reason, message, metadata=metadata)


@dataclass
class _Run:
    run: run_pb2.Run
    events: list[run_event_pb2.RunEvent] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


def _more(entry: _Run, position: int) -> Any:
    def ready() -> bool:
        return len(entry.events) > position

    return ready


class ScriptedOrchestrator(orch_grpc.RunServiceServicer, orch_grpc.AgentServiceServicer):
    """In-memory runs and agents behind the orchestrator's real gRPC contract."""

    def __init__(self, principal_keys: Mapping[str, bytes]) -> None:
        self._verifier = PrincipalVerifier(principal_keys)
        self.runs: dict[str, _Run] = {}
        self.requests: dict[tuple[str, str], str] = {}
        self.calls: list[SeenCall] = []
        self.agents: dict[tuple[str, str], agent_pb2.Agent] = {}
        self._ids = itertools.count(1)
        self.break_streams_after: int | None = None
        """When set, every WatchRun stream fails UNAVAILABLE after this many events."""
        self.finish_on_submit: usage_pb2.Usage | None = None
        """When set, every run finishes at once with this usage."""
        self.host: ServiceHost | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> str:
        """Serve on a free port of 127.0.0.1; return ``host:port``."""
        settings = ServiceSettings(port=0, metrics_port=-1, grace_period_seconds=0.5)

        def register(server: grpc.aio.Server) -> None:
            orch_grpc.add_RunServiceServicer_to_server(self, server)
            orch_grpc.add_AgentServiceServicer_to_server(self, server)

        self.host = build_grpc_server(
            settings,
            domain=DOMAIN,
            register=register,
            service_names=SERVICE_NAMES,
            verifier=self._verifier,
            readiness_interval=60.0,
        )
        await self.host.start()
        await self.host.wait_ready()
        return self.host.address

    async def stop(self) -> None:
        if self.host is not None:
            await self.host.stop(0.5)

    # -- script ------------------------------------------------------------------------------

    def _see(self, method: str, context: Any) -> Principal:
        principal = current_principal()
        self.calls.append(SeenCall(method, principal, context.time_remaining()))
        return principal

    def _visible(self, run_id: str, principal: Principal) -> _Run:
        found = self.runs.get(run_id)
        if (
            found is None
            or found.run.tenant_id != principal.tenant_id
            or (found.run.user_id != principal.user_id and not principal.has("runs:all_users"))
        ):
            raise _error(grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", "run not found", runId=run_id)
        return found

    async def publish(self, run_id: str, **payload: Any) -> run_event_pb2.RunEvent:
        """Append an event to a run's stream and wake its watchers."""
        entry = self.runs[run_id]
        sequence = len(entry.events) + 1
        event = run_event_pb2.RunEvent(
            event_id=f"{run_id}-{sequence:08d}", run_id=run_id, sequence=sequence, **payload
        )
        event.event_time.GetCurrentTime()
        entry.events.append(event)
        entry.run.last_event_id = event.event_id
        async with entry.changed:
            entry.changed.notify_all()
        return event

    async def tokens(self, run_id: str, *texts: str) -> None:
        """Publish token deltas of a running run."""
        for text in texts:
            await self.publish(run_id, token_delta=run_event_pb2.TokenDelta(text=text))

    async def finish(
        self,
        run_id: str,
        usage: usage_pb2.Usage | None = None,
        status: int = run_pb2.RUN_STATUS_SUCCEEDED,
        output: str = "done",
    ) -> None:
        """End a run with the given usage: the run records it and RunFinished carries it."""
        entry = self.runs[run_id]
        run = entry.run
        if run.status in _TERMINAL:
            return
        run.usage.CopyFrom(usage or usage_pb2.Usage())
        previous = run.status
        run.status = status  # type: ignore[assignment]
        run.output = output
        run.end_time.GetCurrentTime()
        await self.publish(
            run_id,
            status_changed=run_event_pb2.RunStatusChanged(
                previous_status=previous,
                status=status,  # type: ignore[arg-type]
            ),
        )
        await self.publish(
            run_id,
            run_finished=run_event_pb2.RunFinished(
                status=status,  # type: ignore[arg-type]
                output=output,
                usage=run.usage,
            ),
        )

    # -- RunService --------------------------------------------------------------------------

    async def SubmitRun(self, request: orch.SubmitRunRequest, context: Any) -> Any:
        principal = self._see("SubmitRun", context)
        principal.require("runs:create")
        key = (principal.tenant_id, request.request_id)
        existing = self.requests.get(key)
        if existing is not None:
            return orch.SubmitRunResponse(run=self.runs[existing].run, created=False)
        if request.agent_name == "missing":
            raise _error(
                grpc.StatusCode.NOT_FOUND,
                "AGENT_NOT_FOUND",
                "agent not found",
                agentName=request.agent_name,
            )
        agent = self.agents.get((principal.tenant_id, request.agent_name))
        if agent is not None:
            loosened = [
                f"budget.{name}"
                for name in ("max_tokens", "max_cost_usd_micros", "max_steps")
                if getattr(agent.budget, name) > 0
                and getattr(request.budget, name) > getattr(agent.budget, name)
            ]
            if loosened:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "BUDGET_INVALID",
                    "budget loosens the agent's",
                    field_violations=[(name, "above the agent's cap") for name in loosened],
                )
        run_id = f"run-{next(self._ids):06d}"
        run = run_pb2.Run(
            run_id=run_id,
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            agent_name=request.agent_name,
            agent_version=request.agent_version or 1,
            input=request.input,
            status=run_pb2.RUN_STATUS_QUEUED,
            priority=request.priority,
            budget=request.budget,
            request_id=request.request_id,
        )
        run.labels.update(request.labels)
        run.create_time.GetCurrentTime()
        self.runs[run_id] = _Run(run)
        self.requests[key] = run_id
        await self.publish(
            run_id,
            status_changed=run_event_pb2.RunStatusChanged(status=run_pb2.RUN_STATUS_QUEUED),
        )
        response = orch.SubmitRunResponse(run=run, created=True)
        if self.finish_on_submit is not None:
            await self.finish(run_id, self.finish_on_submit)
        return response

    async def GetRun(self, request: orch.GetRunRequest, context: Any) -> Any:
        principal = self._see("GetRun", context)
        principal.require("runs:read")
        return orch.GetRunResponse(run=self._visible(request.run_id, principal).run)

    async def ListRuns(self, request: orch.ListRunsRequest, context: Any) -> Any:
        principal = self._see("ListRuns", context)
        principal.require("runs:read")
        runs = [
            entry.run
            for entry in reversed(self.runs.values())
            if entry.run.tenant_id == principal.tenant_id
            and (request.include_all_users or entry.run.user_id == principal.user_id)
            and (not request.statuses or entry.run.status in request.statuses)
        ]
        return orch.ListRunsResponse(runs=runs[: request.page_size or 50])

    async def GetRunTree(self, request: orch.GetRunTreeRequest, context: Any) -> Any:
        principal = self._see("GetRunTree", context)
        return orch.GetRunTreeResponse(runs=[self._visible(request.run_id, principal).run])

    async def WatchRun(
        self, request: orch.WatchRunRequest, context: Any
    ) -> AsyncIterator[orch.WatchRunResponse]:
        principal = self._see("WatchRun", context)
        principal.require("runs:read")
        entry = self._visible(request.run_id, principal)
        position = 0
        if request.after_event_id:
            ids = [event.event_id for event in entry.events]
            if request.after_event_id not in ids:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "EVENT_ID_INVALID",
                    "not an event of this run",
                    metadata={"runId": request.run_id},
                    field_violations=[("after_event_id", "not an event of this run")],
                )
            position = ids.index(request.after_event_id) + 1
        # Each RunEventType names the payload field of the same name.
        wanted = {
            run_event_pb2.RunEventType.Name(t).removeprefix("RUN_EVENT_TYPE_").lower()
            for t in request.event_types
        }
        sent = 0
        while True:
            while position < len(entry.events):
                if self.break_streams_after is not None and sent >= self.break_streams_after:
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "stream broken on purpose"
                    )
                event = entry.events[position]
                position += 1
                kind = event.WhichOneof("payload")
                if wanted and kind not in wanted and kind != "run_finished":
                    continue
                sent += 1
                yield orch.WatchRunResponse(event=event)
                if event.WhichOneof("payload") == "run_finished":
                    return
            async with entry.changed:
                await entry.changed.wait_for(_more(entry, position))

    async def CancelRun(self, request: orch.CancelRunRequest, context: Any) -> Any:
        principal = self._see("CancelRun", context)
        principal.require("runs:cancel")
        entry = self._visible(request.run_id, principal)
        if entry.run.status in _TERMINAL and entry.run.status != run_pb2.RUN_STATUS_CANCELLED:
            raise _error(
                grpc.StatusCode.FAILED_PRECONDITION,
                "RUN_ALREADY_FINISHED",
                "run already finished",
                runId=request.run_id,
            )
        await self.finish(request.run_id, entry.run.usage, run_pb2.RUN_STATUS_CANCELLED, "")
        return orch.CancelRunResponse(run=entry.run)

    async def ListApprovals(self, request: orch.ListApprovalsRequest, context: Any) -> Any:
        principal = self._see("ListApprovals", context)
        if request.run_id:
            self._visible(request.run_id, principal)
        return orch.ListApprovalsResponse()

    async def ResolveApproval(self, request: orch.ResolveApprovalRequest, context: Any) -> Any:
        self._see("ResolveApproval", context)
        raise _error(
            grpc.StatusCode.NOT_FOUND,
            "APPROVAL_NOT_FOUND",
            "approval not found",
            approvalId=request.approval_id,
        )

    async def ListJournalEntries(
        self, request: orch.ListJournalEntriesRequest, context: Any
    ) -> Any:
        principal = self._see("ListJournalEntries", context)
        self._visible(request.run_id, principal)
        return orch.ListJournalEntriesResponse()

    async def ReplayRun(self, request: orch.ReplayRunRequest, context: Any) -> Any:
        principal = self._see("ReplayRun", context)
        run = self._visible(request.run_id, principal).run
        if run.status not in _TERMINAL:
            raise _error(
                grpc.StatusCode.FAILED_PRECONDITION,
                "RUN_NOT_FINISHED",
                "run not finished",
                runId=request.run_id,
            )
        return orch.ReplayRunResponse(
            run_id=run.run_id,
            status=run.status,
            output=run.output,
            identical=True,
            recorded_usage=run.usage,
        )

    async def ForkRun(self, request: orch.ForkRunRequest, context: Any) -> Any:
        principal = self._see("ForkRun", context)
        source = self._visible(request.run_id, principal).run
        submit = orch.SubmitRunRequest(
            agent_name=source.agent_name,
            input=request.input if request.HasField("input") else source.input,
            request_id=request.request_id,
            budget=request.budget,
        )
        response = await self.SubmitRun(submit, context)
        response.run.forked_from_run_id = source.run_id
        return orch.ForkRunResponse(run=response.run, created=response.created)

    # -- AgentService ------------------------------------------------------------------------

    async def CreateAgent(self, request: orch.CreateAgentRequest, context: Any) -> Any:
        principal = self._see("CreateAgent", context)
        principal.require("agents:write")
        key = (principal.tenant_id, request.agent.name)
        if key in self.agents:
            raise _error(
                grpc.StatusCode.ALREADY_EXISTS,
                "AGENT_ALREADY_EXISTS",
                "agent exists",
                agentName=request.agent.name,
            )
        agent = agent_pb2.Agent()
        agent.CopyFrom(request.agent)
        agent.version = 1
        agent.tenant_id = principal.tenant_id
        self.agents[key] = agent
        return orch.CreateAgentResponse(agent=agent)

    async def GetAgent(self, request: orch.GetAgentRequest, context: Any) -> Any:
        principal = self._see("GetAgent", context)
        agent = self.agents.get((principal.tenant_id, request.agent_name))
        if agent is None:
            raise _error(
                grpc.StatusCode.NOT_FOUND,
                "AGENT_NOT_FOUND",
                "agent not found",
                agentName=request.agent_name,
            )
        return orch.GetAgentResponse(agent=agent)

    async def CreateAgentVersion(
        self, request: orch.CreateAgentVersionRequest, context: Any
    ) -> Any:
        principal = self._see("CreateAgentVersion", context)
        key = (principal.tenant_id, request.agent.name)
        current = self.agents.get(key)
        if current is None:
            raise _error(
                grpc.StatusCode.NOT_FOUND,
                "AGENT_NOT_FOUND",
                "agent not found",
                agentName=request.agent.name,
            )
        agent = agent_pb2.Agent()
        agent.CopyFrom(current)
        agent.MergeFrom(request.agent)
        agent.version = current.version + 1
        self.agents[key] = agent
        return orch.CreateAgentVersionResponse(agent=agent)

    async def ListAgentVersions(self, request: orch.ListAgentVersionsRequest, context: Any) -> Any:
        principal = self._see("ListAgentVersions", context)
        agent = self.agents.get((principal.tenant_id, request.agent_name))
        return orch.ListAgentVersionsResponse(agents=[agent] if agent is not None else [])

    async def DeleteAgent(self, request: orch.DeleteAgentRequest, context: Any) -> Any:
        principal = self._see("DeleteAgent", context)
        agent = self.agents.get((principal.tenant_id, request.agent_name))
        if agent is None:
            raise _error(
                grpc.StatusCode.NOT_FOUND,
                "AGENT_NOT_FOUND",
                "agent not found",
                agentName=request.agent_name,
            )
        agent.archive_time.GetCurrentTime()
        return orch.DeleteAgentResponse(agent=agent)

    async def ListAgents(self, request: orch.ListAgentsRequest, context: Any) -> Any:
        principal = self._see("ListAgents", context)
        return orch.ListAgentsResponse(
            agents=[a for (t, _), a in sorted(self.agents.items()) if t == principal.tenant_id]
        )


# -- a gateway in front of the scripted orchestrator, for tests and the benchmark -----------------

JWT_SECRET = "j" * 40
JWT_ISSUER = "https://idp.test"
JWT_AUDIENCE = "foredeck"
ALL_USER_PERMISSIONS = (
    "agents:read",
    "agents:write",
    "runs:create",
    "runs:read",
    "runs:cancel",
    "approvals:resolve",
)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``secret`` as the credential."""
    return (("authorization", f"Bearer {secret}"),)


def make_jwt(
    tenant: str = "acme",
    user: str = "jo",
    scope: str = "runs:read runs:create",
    *,
    key: str = JWT_SECRET,
    algorithm: str = "HS256",
    lifetime: int = 300,
    **claims: Any,
) -> str:
    """An identity provider's token as the gateway is configured to accept it."""

    now = int(time.time())
    body: dict[str, Any] = {
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "sub": user,
        "tid": tenant,
        "scope": scope,
        "iat": now,
        "exp": now + lifetime,
    }
    body.update(claims)
    return jwt.encode(body, key, algorithm=algorithm, headers={"kid": "idp"})


@dataclass
class Gateway:
    """A running gateway with stubs, its admin credential and the orchestrator behind it."""

    host: GatewayHost
    channel: grpc.aio.Channel
    api: Any
    admin: Any
    admin_md: tuple[tuple[str, str], ...]
    orchestrator: ScriptedOrchestrator
    settings: GatewaySettings

    async def new_key(
        self,
        tenant: str = "acme",
        user: str = "jo",
        permissions: Sequence[str] = ALL_USER_PERMISSIONS,
        **fields: Any,
    ) -> tuple[str, api_key_pb2.ApiKey]:
        """Create a key through the admin API; return its secret and record."""
        response = await self.admin.CreateApiKey(
            gw.CreateApiKeyRequest(
                tenant_id=tenant,
                user_id=user,
                display_name="test key",
                permissions=list(permissions),
                request_id=uuid.uuid4().hex,
                **fields,
            ),
            metadata=self.admin_md,
            timeout=5,
        )
        return response.secret, response.api_key


def gateway_settings(
    redis_url: str, orchestrator_address: str, principal_keys: str, **overrides: Any
) -> GatewaySettings:
    admin_secret = overrides.pop("admin_secret")
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "orchestrator_address": orchestrator_address,
        "principal_keys": principal_keys,
        "admin_key_hashes": hash_secret(admin_secret),
        "jwt_hs256_secrets": f"idp:{JWT_SECRET}",
        "jwt_issuer": JWT_ISSUER,
        "jwt_audience": JWT_AUDIENCE,
        "metrics_port": -1,
        "grace_period_seconds": 0.5,
        "settle_interval_seconds": 0.2,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@contextlib.asynccontextmanager
async def running_gateway(
    redis_url: str, *, telemetry: Telemetry | None = None, **overrides: Any
) -> AsyncIterator[Gateway]:
    """A gateway on a free port in front of a fresh scripted orchestrator, with an admin key."""
    keys = {"gw-test": generate_key()}
    orchestrator = ScriptedOrchestrator(keys)
    address = await orchestrator.start()
    admin_secret = new_api_key_secret()
    settings = gateway_settings(
        redis_url, address, format_keys(keys), admin_secret=admin_secret, **overrides
    )
    host = build_server(settings, telemetry=telemetry)
    await host.start()
    channel = grpc.aio.insecure_channel(host.address)
    try:
        await host.wait_ready()
        yield Gateway(
            host,
            channel,
            gw_grpc.GatewayServiceStub(channel),
            gw_grpc.AdminServiceStub(channel),
            bearer(admin_secret),
            orchestrator,
            settings,
        )
    finally:
        await channel.close(None)
        await host.stop(0.5)
        await orchestrator.stop()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Wait until ``check`` passes, polling state that has no notification (Redis records)."""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.02) + 1):
        if await check():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {within} s")
