"""``GatewayService`` and ``AdminService``: admit each call, then forward it or serve it.

Thin by design: admission lives in :mod:`foredeck_gateway.admission`, Redis in
:mod:`foredeck_gateway.store`, the orchestrator's errors in :mod:`foredeck_gateway.clients`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf import timestamp_pb2

from foredeck.common.v1 import principal_pb2, usage_pb2
from foredeck.gateway.v1 import api_key_pb2, budget_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as orch
from foredeck_gateway import validation as val
from foredeck_gateway.admission import Caller, Gate, RunAdmission
from foredeck_gateway.clients import Orchestrator, map_orchestrator_error
from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.credentials import (
    API_KEY_PREFIX,
    hash_secret,
    new_api_key_secret,
    parse_authorization,
)
from foredeck_gateway.errors import GatewayReason
from foredeck_gateway.settlement import Settler
from foredeck_gateway.store import Budget, KeyRecord, RedisState, StoreDown
from foredeck_kit.context import current_rpc, outbound_principal
from foredeck_kit.errors import ServiceError

__all__ = ["AdminServicer", "GatewayServicer", "convert"]

_WATCH_TIMEOUT = 7 * 86_400.0
_KINDS = {
    principal_pb2.PRINCIPAL_KIND_UNSPECIFIED: "user",
    principal_pb2.PRINCIPAL_KIND_USER: "user",
    principal_pb2.PRINCIPAL_KIND_SERVICE: "service",
    principal_pb2.PRINCIPAL_KIND_ADMIN: "admin",
}
_KIND_ENUM = {
    "user": principal_pb2.PRINCIPAL_KIND_USER,
    "service": principal_pb2.PRINCIPAL_KIND_SERVICE,
    "admin": principal_pb2.PRINCIPAL_KIND_ADMIN,
}
_PERIODS = {
    budget_pb2.BUDGET_PERIOD_UNSPECIFIED: "lifetime",
    budget_pb2.BUDGET_PERIOD_LIFETIME: "lifetime",
    budget_pb2.BUDGET_PERIOD_DAILY: "daily",
    budget_pb2.BUDGET_PERIOD_MONTHLY: "monthly",
}
_PERIOD_ENUM = {
    "lifetime": budget_pb2.BUDGET_PERIOD_LIFETIME,
    "daily": budget_pb2.BUDGET_PERIOD_DAILY,
    "monthly": budget_pb2.BUDGET_PERIOD_MONTHLY,
}
_SCOPES = {
    budget_pb2.BUDGET_SCOPE_TENANT: "tenant",
    budget_pb2.BUDGET_SCOPE_USER: "user",
    budget_pb2.BUDGET_SCOPE_API_KEY: "key",
}
_SCOPE_ENUM = {v: k for k, v in _SCOPES.items()}


def convert(source: pb_message.Message, target_cls: type[Any]) -> Any:
    """Copy the fields ``target_cls`` has by name: the gateway's messages mirror the
    orchestrator's by name, not by field number."""
    target = target_cls()
    fields = target.DESCRIPTOR.fields_by_name
    for descriptor, value in source.ListFields():
        field = fields.get(descriptor.name)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(target, descriptor.name).update(value)
        elif field.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif field.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)
    return target


def _note(**fields: str) -> None:
    state = current_rpc()
    if state is not None:
        merged = state.log_fields or {}
        merged.update({k: v for k, v in fields.items() if v})
        state.log_fields = merged


def _ts(ms: int) -> timestamp_pb2.Timestamp | None:
    if ms <= 0:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fingerprint(request: pb_message.Message) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()[:32]


def _tightened(request: usage_pb2.Budget, key: tuple[int, ...], tokens: int, cost: int) -> Any:
    """The run's caps: the tighter of the request's and the key's, tokens and cost as reserved."""
    steps, _, _, wall_ms, depth, subs = key
    budget = usage_pb2.Budget()
    budget.CopyFrom(request)

    def tight(current: int, cap: int) -> int:
        if current > 0 and cap > 0:
            return min(current, cap)
        return max(current, cap)

    budget.max_steps = tight(budget.max_steps, steps)
    budget.max_sub_agent_depth = tight(budget.max_sub_agent_depth, depth)
    budget.max_sub_agents = tight(budget.max_sub_agents, subs)
    requested_wall = int(request.max_wall_time.ToMilliseconds())
    wall = tight(requested_wall, wall_ms)
    if wall > 0:
        budget.max_wall_time.FromMilliseconds(wall)
    if tokens > 0:
        budget.max_tokens = tokens
    if cost > 0:
        budget.max_cost_usd_micros = cost
    return budget


def _loosened(request: usage_pb2.Budget, key: tuple[int, ...]) -> list[tuple[str, str]]:
    steps, tokens, cost, wall_ms, depth, subs = key
    checks = (
        ("max_steps", request.max_steps, steps),
        ("max_tokens", request.max_tokens, tokens),
        ("max_cost_usd_micros", request.max_cost_usd_micros, cost),
        ("max_wall_time", int(request.max_wall_time.ToMilliseconds()), wall_ms),
        ("max_sub_agent_depth", request.max_sub_agent_depth, depth),
        ("max_sub_agents", request.max_sub_agents, subs),
    )
    return [
        (f"budget.{name}", "larger than the key's cap")
        for name, asked, cap in checks
        if asked > 0 and cap > 0 and asked > cap
    ]


class GatewayServicer(gw_grpc.GatewayServiceServicer):
    """The public API: admission, then the orchestrator."""

    def __init__(
        self,
        settings: GatewaySettings,
        gate: Gate,
        state: RedisState,
        orchestrator: Orchestrator,
        settler: Settler,
    ) -> None:
        self._s = settings
        self._gate = gate
        self._state = state
        self._orch = orchestrator
        self._settler = settler

    async def _admit(self, context: Any, route: str, permission: str, **kw: Any) -> Caller:
        return await self._gate.admit(context.invocation_metadata(), route, permission, **kw)

    async def _forward(self, caller: Caller, method: Any, request: Any) -> Any:
        with outbound_principal(caller.principal_token):
            return await self._orch.call(method, request)

    # -- agents ------------------------------------------------------------------------------

    async def CreateAgent(self, request: gw.CreateAgentRequest, context: Any) -> Any:
        caller = await self._admit(context, "CreateAgent", "agents:write")
        v = val.Violations()
        val.check_id(v, request.agent.name, "agent.name", val.AGENT_NAME)
        val.check_request_id(v, request.request_id)
        v.raise_if_any()
        val.check_budget(request.agent.budget, "agent.budget")
        response = await self._forward(
            caller, self._orch.agents.CreateAgent, convert(request, orch.CreateAgentRequest)
        )
        return convert(response, gw.CreateAgentResponse)

    async def CreateAgentVersion(self, request: gw.CreateAgentVersionRequest, context: Any) -> Any:
        caller = await self._admit(context, "CreateAgentVersion", "agents:write")
        v = val.Violations()
        val.check_id(v, request.agent.name, "agent.name", val.AGENT_NAME)
        val.check_request_id(v, request.request_id)
        v.raise_if_any()
        val.check_budget(request.agent.budget, "agent.budget")
        response = await self._forward(
            caller,
            self._orch.agents.CreateAgentVersion,
            convert(request, orch.CreateAgentVersionRequest),
        )
        return convert(response, gw.CreateAgentVersionResponse)

    async def GetAgent(self, request: gw.GetAgentRequest, context: Any) -> Any:
        caller = await self._admit(context, "GetAgent", "agents:read")
        v = val.Violations()
        val.check_id(v, request.agent_name, "agent_name", val.AGENT_NAME)
        if request.agent_version < 0:
            v.add("agent_version", "must be zero or positive")
        v.raise_if_any()
        response = await self._forward(
            caller, self._orch.agents.GetAgent, convert(request, orch.GetAgentRequest)
        )
        return convert(response, gw.GetAgentResponse)

    async def ListAgents(self, request: gw.ListAgentsRequest, context: Any) -> Any:
        caller = await self._admit(context, "ListAgents", "agents:read")
        v = val.Violations()
        val.check_page(v, request.page_size, 50, 200)
        val.check_labels(v, request.labels, 16)
        v.raise_if_any()
        response = await self._forward(
            caller, self._orch.agents.ListAgents, convert(request, orch.ListAgentsRequest)
        )
        return convert(response, gw.ListAgentsResponse)

    async def ListAgentVersions(self, request: gw.ListAgentVersionsRequest, context: Any) -> Any:
        caller = await self._admit(context, "ListAgentVersions", "agents:read")
        v = val.Violations()
        val.check_id(v, request.agent_name, "agent_name", val.AGENT_NAME)
        val.check_page(v, request.page_size, 50, 200)
        v.raise_if_any()
        response = await self._forward(
            caller,
            self._orch.agents.ListAgentVersions,
            convert(request, orch.ListAgentVersionsRequest),
        )
        return convert(response, gw.ListAgentVersionsResponse)

    async def DeleteAgent(self, request: gw.DeleteAgentRequest, context: Any) -> Any:
        caller = await self._admit(context, "DeleteAgent", "agents:write")
        v = val.Violations()
        val.check_id(v, request.agent_name, "agent_name", val.AGENT_NAME)
        v.raise_if_any()
        response = await self._forward(
            caller, self._orch.agents.DeleteAgent, convert(request, orch.DeleteAgentRequest)
        )
        return convert(response, gw.DeleteAgentResponse)

    # -- runs --------------------------------------------------------------------------------

    async def CreateRun(self, request: gw.CreateRunRequest, context: Any) -> Any:
        v = val.Violations()
        if request.agent_name:
            val.check_id(v, request.agent_name, "agent_name", val.AGENT_NAME)
        if request.agent_version < 0:
            v.add("agent_version", "must be zero or positive")
        val.check_input(v, request.input)
        val.check_labels(v, request.labels, 32)
        val.check_request_id(v, request.request_id)
        submit = orch.SubmitRunRequest(
            agent_name=request.agent_name or "default",
            agent_version=request.agent_version,
            input=request.input,
            priority=request.priority,
            request_id=request.request_id,
        )
        submit.labels.update(request.labels)
        return await self._start(
            context, "CreateRun", request, request.budget, v, submit, gw.CreateRunResponse
        )

    async def ForkRun(self, request: gw.ForkRunRequest, context: Any) -> Any:
        v = val.Violations()
        val.check_id(v, request.run_id, "run_id", val.RUN_ID)
        if request.from_step_index < 1:
            v.add("from_step_index", "must be 1 or more")
        if request.HasField("input"):
            val.check_input(v, request.input)
        if request.agent_version < 0:
            v.add("agent_version", "must be zero or positive")
        val.check_labels(v, request.labels, 32)
        val.check_request_id(v, request.request_id)
        fork = convert(request, orch.ForkRunRequest)
        fork.ClearField("budget")
        return await self._start(
            context, "ForkRun", request, request.budget, v, fork, gw.ForkRunResponse
        )

    async def _start(
        self,
        context: Any,
        route: str,
        request: Any,
        budget: usage_pb2.Budget,
        v: val.Violations,
        submit: Any,
        response_cls: type[Any],
    ) -> Any:
        """Admit (concurrency, budgets), submit, record the run and watch it to settle."""
        metadata = context.invocation_metadata()
        parse_authorization(metadata)
        v.raise_if_any()
        val.check_budget(budget)
        run = RunAdmission(
            reservation_id=secrets.token_urlsafe(12),
            request_id=request.request_id,
            fingerprint=f"{route}:{_fingerprint(request)}",
            tokens=budget.max_tokens,
            cost=budget.max_cost_usd_micros,
        )
        caller = await self._gate.admit(metadata, route, "runs:create", run=run)
        a = caller.admission
        loosened = _loosened(budget, a.run_budget)
        reserved = a.reservation == "new"
        if loosened:
            if reserved:
                await self._undo(a.reservation_id, a.tenant_id, request.request_id)
            raise GatewayReason.budget_invalid(loosened)
        tokens, cost = a.reserved_tokens, a.reserved_cost
        defaulted = (tokens > 0 and budget.max_tokens == 0 and a.run_budget[1] == 0) or (
            cost > 0 and budget.max_cost_usd_micros == 0 and a.run_budget[2] == 0
        )
        if defaulted:
            # The default reservation stands in for a cap nobody set; the run's own caps (the
            # agent's) may be tighter, and a cap above them would be refused as a loosening.
            tokens, cost = await self._own_caps(caller, route, submit, tokens, cost)
        submit.budget.CopyFrom(_tightened(budget, a.run_budget, tokens, cost))
        method = self._orch.runs.SubmitRun if route == "CreateRun" else self._orch.runs.ForkRun
        try:
            with outbound_principal(caller.principal_token):
                response = await method(submit)
        except grpc.aio.AioRpcError as exc:
            error = map_orchestrator_error(exc)
            uncertain = exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
            )
            if reserved and not uncertain:
                await self._undo(a.reservation_id, a.tenant_id, request.request_id)
            raise error from None
        run_id = response.run.run_id
        _note(run_id=run_id)
        if a.reservation_id:
            try:
                held = await self._state.record_run(
                    a.reservation_id, run_id, self._s.reservation_lease_seconds * 1000
                )
            except StoreDown:
                held = True  # the sweeper finds it by its lease
            if held:
                self._settler.watch(a.reservation_id, run_id, a.tenant_id, a.user_id, a.kind)
        return convert(response, response_cls)

    async def _own_caps(
        self, caller: Caller, route: str, submit: Any, tokens: int, cost: int
    ) -> tuple[int, int]:
        """Lower reserved-by-default caps to the agent's (CreateRun) or the source run's
        (ForkRun) caps; the reservation itself stays, which only over-reserves."""
        try:
            with outbound_principal(caller.principal_token):
                if route == "CreateRun":
                    found = await self._orch.agents.GetAgent(
                        orch.GetAgentRequest(
                            agent_name=submit.agent_name, agent_version=submit.agent_version
                        )
                    )
                    own = found.agent.budget
                else:
                    found = await self._orch.runs.GetRun(orch.GetRunRequest(run_id=submit.run_id))
                    own = found.run.budget
        except grpc.aio.AioRpcError:
            return tokens, cost  # the submission itself gives the definitive answer
        if own.max_tokens > 0 and (tokens == 0 or own.max_tokens < tokens):
            tokens = own.max_tokens if tokens > 0 else 0
        if own.max_cost_usd_micros > 0 and (cost == 0 or own.max_cost_usd_micros < cost):
            cost = own.max_cost_usd_micros if cost > 0 else 0
        return tokens, cost

    async def _undo(self, reservation_id: str, tenant_id: str, request_id: str) -> None:
        try:
            await self._state.release(reservation_id)
            await self._state.forget_request(tenant_id, request_id)
        except StoreDown:
            pass  # the sweeper releases it once its grace is over

    async def GetRun(self, request: gw.GetRunRequest, context: Any) -> Any:
        caller = await self._admit(context, "GetRun", "runs:read")
        self._run_id(request.run_id)
        response = await self._forward(
            caller, self._orch.runs.GetRun, convert(request, orch.GetRunRequest)
        )
        return convert(response, gw.GetRunResponse)

    def _run_id(self, run_id: str, field: str = "run_id") -> None:
        v = val.Violations()
        val.check_id(v, run_id, field, val.RUN_ID)
        v.raise_if_any()
        _note(run_id=run_id)

    async def ListRuns(self, request: gw.ListRunsRequest, context: Any) -> Any:
        caller = await self._admit(context, "ListRuns", "runs:read")
        v = val.Violations()
        val.check_page(v, request.page_size, 50, 200)
        if len(request.statuses) > 8:
            v.add("statuses", "at most 8")
        val.check_labels(v, request.labels, 16)
        if request.parent_run_id:
            val.check_id(v, request.parent_run_id, "parent_run_id", val.RUN_ID)
        v.raise_if_any()
        if request.include_all_users and not caller.has("runs:all_users"):
            raise ServiceError.permission_missing("runs:all_users")
        response = await self._forward(
            caller, self._orch.runs.ListRuns, convert(request, orch.ListRunsRequest)
        )
        return convert(response, gw.ListRunsResponse)

    async def GetRunTree(self, request: gw.GetRunTreeRequest, context: Any) -> Any:
        caller = await self._admit(context, "GetRunTree", "runs:read")
        self._run_id(request.run_id)
        response = await self._forward(
            caller, self._orch.runs.GetRunTree, convert(request, orch.GetRunTreeRequest)
        )
        return convert(response, gw.GetRunTreeResponse)

    async def WatchRun(self, request: gw.WatchRunRequest, context: Any) -> AsyncIterator[Any]:
        caller = await self._admit(context, "WatchRun", "runs:read")
        self._run_id(request.run_id)
        v = val.Violations()
        if len(request.after_event_id) > 128:
            v.add("after_event_id", "at most 128 characters")
        if len(request.event_types) > 16:
            v.add("event_types", "at most 16")
        if any(t == 0 for t in request.event_types):
            v.add("event_types", "must not be unspecified")
        v.raise_if_any()
        with outbound_principal(caller.principal_token):
            stream = self._orch.runs.WatchRun(
                convert(request, orch.WatchRunRequest), timeout=_WATCH_TIMEOUT
            )
            try:
                async for message in stream:
                    yield gw.WatchRunResponse(event=message.event)
            except grpc.aio.AioRpcError as exc:
                raise map_orchestrator_error(exc) from None
            finally:
                stream.cancel()

    async def CancelRun(self, request: gw.CancelRunRequest, context: Any) -> Any:
        caller = await self._admit(context, "CancelRun", "runs:cancel")
        self._run_id(request.run_id)
        v = val.Violations()
        val.check_text(v, request.reason, "reason")
        v.raise_if_any()
        response = await self._forward(
            caller, self._orch.runs.CancelRun, convert(request, orch.CancelRunRequest)
        )
        return convert(response, gw.CancelRunResponse)

    async def ListApprovals(self, request: gw.ListApprovalsRequest, context: Any) -> Any:
        caller = await self._admit(context, "ListApprovals", "runs:read")
        v = val.Violations()
        if request.run_id:
            val.check_id(v, request.run_id, "run_id", val.RUN_ID)
        if len(request.statuses) > 5:
            v.add("statuses", "at most 5")
        val.check_page(v, request.page_size, 50, 200)
        v.raise_if_any()
        if request.include_all_users and not caller.has("runs:all_users"):
            raise ServiceError.permission_missing("runs:all_users")
        response = await self._forward(
            caller, self._orch.runs.ListApprovals, convert(request, orch.ListApprovalsRequest)
        )
        return convert(response, gw.ListApprovalsResponse)

    async def ResolveApproval(self, request: gw.ResolveApprovalRequest, context: Any) -> Any:
        caller = await self._admit(context, "ResolveApproval", "approvals:resolve")
        v = val.Violations()
        val.check_id(v, request.approval_id, "approval_id")
        if request.decision == 0:
            v.add("decision", "required")
        val.check_text(v, request.reason, "reason")
        v.raise_if_any()
        response = await self._forward(
            caller, self._orch.runs.ResolveApproval, convert(request, orch.ResolveApprovalRequest)
        )
        return convert(response, gw.ResolveApprovalResponse)

    async def GetRunJournal(self, request: gw.GetRunJournalRequest, context: Any) -> Any:
        caller = await self._admit(context, "GetRunJournal", "runs:read")
        self._run_id(request.run_id)
        v = val.Violations()
        val.check_page(v, request.page_size, 100, 500)
        v.raise_if_any()
        with outbound_principal(caller.principal_token):
            run = await self._orch.call(
                self._orch.runs.GetRun, orch.GetRunRequest(run_id=request.run_id)
            )
            entries = await self._orch.call(
                self._orch.runs.ListJournalEntries, convert(request, orch.ListJournalEntriesRequest)
            )
        return gw.GetRunJournalResponse(
            run=run.run, entries=entries.entries, next_page_token=entries.next_page_token
        )

    async def ReplayRun(self, request: gw.ReplayRunRequest, context: Any) -> Any:
        caller = await self._admit(context, "ReplayRun", "runs:read")
        self._run_id(request.run_id)
        response = await self._forward(
            caller, self._orch.runs.ReplayRun, convert(request, orch.ReplayRunRequest)
        )
        return convert(response, gw.ReplayRunResponse)

    async def WhoAmI(self, request: gw.WhoAmIRequest, context: Any) -> Any:
        caller = await self._admit(context, "WhoAmI", "")
        a = caller.admission
        p = caller.principal
        principal = principal_pb2.Principal(
            tenant_id=p.tenant_id,
            user_id=p.user_id,
            permissions=sorted(p.permissions),
            budget_ids=list(p.budget_ids),
            kind=_KIND_ENUM.get(p.kind.value, principal_pb2.PRINCIPAL_KIND_USER),
        )
        principal.expire_time.FromDatetime(p.expires_at)
        response = gw.WhoAmIResponse(
            principal=principal,
            credential_kind=api_key_pb2.CREDENTIAL_KIND_API_KEY
            if caller.credential_kind == "api_key"
            else api_key_pb2.CREDENTIAL_KIND_JWT,
            api_key_id=a.api_key_id,
            rate_limits=api_key_pb2.RateLimits(
                key_requests_per_minute=a.key_rpm,
                user_requests_per_minute=a.user_rpm,
                tenant_requests_per_minute=a.tenant_rpm,
                max_concurrent_runs=a.max_concurrent_runs,
            ),
        )
        steps, tokens, cost, wall, depth, subs = a.run_budget
        response.run_budget.CopyFrom(
            usage_pb2.Budget(
                max_steps=steps,
                max_tokens=tokens,
                max_cost_usd_micros=cost,
                max_sub_agent_depth=depth,
                max_sub_agents=subs,
            )
        )
        if wall > 0:
            response.run_budget.max_wall_time.FromMilliseconds(wall)
        try:
            response.active_run_count = await self._state.active_runs(a.tenant_id, a.user_id)
            for budget_id in a.budget_ids:
                budget = await self._state.get_budget(a.tenant_id, budget_id)
                if budget is not None:
                    response.budgets.append(budget_message(budget))
        except StoreDown:
            if caller.checked:
                raise GatewayReason.store_unavailable() from None
        return response


def budget_message(b: Budget) -> budget_pb2.BudgetAccount:
    """The wire form of a stored budget."""
    message = budget_pb2.BudgetAccount(
        budget_id=b.budget_id,
        scope=_SCOPE_ENUM.get(b.scope, budget_pb2.BUDGET_SCOPE_UNSPECIFIED),
        tenant_id=b.tenant_id,
        user_id=b.user_id,
        api_key_id=b.api_key_id,
        token_limit=b.token_limit,
        cost_limit_usd_micros=b.cost_limit,
        period=_PERIOD_ENUM.get(b.period, budget_pb2.BUDGET_PERIOD_LIFETIME),
        spent_tokens=b.spent_tokens,
        spent_cost_usd_micros=b.spent_cost,
        reserved_tokens=b.reserved_tokens,
        reserved_cost_usd_micros=b.reserved_cost,
        reservation_count=b.reservation_count,
        updated_by=b.updated_by,
        etag=b.etag,
    )
    message.period_start_time.FromMilliseconds(b.period_start_ms)
    from foredeck_gateway.store import period_bounds

    end = period_bounds(b.period)[1]
    if end > 0:
        message.period_end_time.FromMilliseconds(end)
    for name, ms in (("update_time", b.update_ms), ("reset_time", b.reset_ms)):
        stamp = _ts(ms)
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    return message


def key_message(record: KeyRecord, now_ms: int) -> api_key_pb2.ApiKey:
    """The wire form of a stored API key, never with its secret."""
    state = api_key_pb2.API_KEY_STATE_ACTIVE
    if record.state == "revoked":
        state = api_key_pb2.API_KEY_STATE_REVOKED
    elif record.expire_ms and record.expire_ms <= now_ms:
        state = api_key_pb2.API_KEY_STATE_EXPIRED
    steps, tokens, cost, wall, depth, subs = record.run_budget
    message = api_key_pb2.ApiKey(
        api_key_id=record.api_key_id,
        prefix=record.prefix,
        display_name=record.display_name,
        tenant_id=record.tenant_id,
        user_id=record.user_id,
        kind=_KIND_ENUM.get(record.kind, principal_pb2.PRINCIPAL_KIND_USER),
        permissions=record.permissions,
        rate_limits=api_key_pb2.RateLimits(
            key_requests_per_minute=record.key_rpm,
            user_requests_per_minute=record.user_rpm,
            tenant_requests_per_minute=record.tenant_rpm,
            max_concurrent_runs=record.max_concurrent_runs,
        ),
        run_budget=usage_pb2.Budget(
            max_steps=steps,
            max_tokens=tokens,
            max_cost_usd_micros=cost,
            max_sub_agent_depth=depth,
            max_sub_agents=subs,
        ),
        state=state,
        created_by=record.created_by,
        revoked_by=record.revoked_by,
        revoke_reason=record.revoke_reason,
    )
    if wall > 0:
        message.run_budget.max_wall_time.FromMilliseconds(wall)
    for name, ms in (
        ("create_time", record.create_ms),
        ("expire_time", record.expire_ms),
        ("revoke_time", record.revoke_ms),
        ("last_use_time", record.last_use_ms),
    ):
        stamp = _ts(ms)
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    return message


def _page_token(offset: int, fingerprint: str) -> str:
    return base64.urlsafe_b64encode(f"{offset}:{fingerprint}".encode()).decode().rstrip("=")


def _read_page_token(token: str, fingerprint: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        offset, _, seen = raw.partition(":")
        if seen != fingerprint or int(offset) < 0:
            raise ValueError
        return int(offset)
    except (ValueError, UnicodeDecodeError):
        raise ServiceError.page_token_invalid() from None


class AdminServicer(gw_grpc.AdminServiceServicer):
    """API keys and budgets, for callers with an admin credential."""

    def __init__(self, settings: GatewaySettings, gate: Gate, state: RedisState) -> None:
        self._s = settings
        self._gate = gate
        self._state = state

    async def _admin(self, context: Any, route: str) -> Caller:
        return await self._gate.admit(context.invocation_metadata(), route, "", admin=True)

    async def _store(self, call: Any) -> Any:
        try:
            return await call
        except StoreDown:
            raise GatewayReason.store_unavailable() from None

    async def CreateApiKey(self, request: gw.CreateApiKeyRequest, context: Any) -> Any:
        caller = await self._admin(context, "CreateApiKey")
        now = _now_ms()
        v = val.Violations()
        val.check_id(v, request.tenant_id, "tenant_id", val.TENANT)
        val.check_id(v, request.user_id, "user_id", val.USER)
        if not 1 <= len(request.display_name) <= 128:
            v.add("display_name", "required: 1-128 characters")
        val.check_permissions(v, request.permissions)
        limits = request.rate_limits
        for name in ("key_requests_per_minute", "user_requests_per_minute"):
            if not 0 <= getattr(limits, name) <= 1_000_000:
                v.add(f"rate_limits.{name}", "0 to 1,000,000")
        if not 0 <= limits.tenant_requests_per_minute <= 1_000_000:
            v.add("rate_limits.tenant_requests_per_minute", "0 to 1,000,000")
        if not 0 <= limits.max_concurrent_runs <= 10_000:
            v.add("rate_limits.max_concurrent_runs", "0 to 10,000")
        if request.HasField("expire_time") and request.expire_time.ToMilliseconds() <= now:
            v.add("expire_time", "must be in the future")
        val.check_request_id(v, request.request_id)
        v.raise_if_any()
        val.check_budget(request.run_budget, "run_budget")
        bad = [
            (name, "0 to 10^15")
            for name in ("token_limit", "cost_limit_usd_micros")
            if not 0 <= getattr(request, name) <= 10**15
        ]
        if bad:
            raise GatewayReason.budget_invalid(bad)
        _note(tenant_id=request.tenant_id)
        scope = f"admin:{caller.user_id}:CreateApiKey"
        fingerprint = _fingerprint(request)
        seen = await self._store(self._state.remembered(scope, request.request_id))
        if seen is None:
            key_id = "key_" + secrets.token_hex(8)
            if not await self._store(
                self._state.remember(scope, request.request_id, fingerprint, key_id)
            ):
                # A concurrent call with this request id got there first.
                seen = await self._store(self._state.remembered(scope, request.request_id))
        if seen is not None:
            if seen[0] != fingerprint:
                raise ServiceError.request_id_reused(request.request_id)
            record = await self._store(self._state.get_key(seen[1]))
            if record is not None:
                return gw.CreateApiKeyResponse(
                    api_key=key_message(record, now), secret_withheld=True
                )
            # Recorded but never written (the first call failed half way): write it now,
            # under the id the request id already names.
            key_id = seen[1]
        secret = new_api_key_secret()
        run_budget = request.run_budget
        record = KeyRecord(
            api_key_id=key_id,
            prefix=secret[:12],
            display_name=request.display_name,
            tenant_id=request.tenant_id,
            user_id=request.user_id,
            kind=_KINDS.get(request.kind, "user"),
            permissions=list(request.permissions),
            key_rpm=limits.key_requests_per_minute,
            user_rpm=limits.user_requests_per_minute,
            tenant_rpm=limits.tenant_requests_per_minute,
            max_concurrent_runs=limits.max_concurrent_runs,
            run_budget=[
                run_budget.max_steps,
                run_budget.max_tokens,
                run_budget.max_cost_usd_micros,
                int(run_budget.max_wall_time.ToMilliseconds()),
                run_budget.max_sub_agent_depth,
                run_budget.max_sub_agents,
            ],
            create_ms=now,
            created_by=caller.user_id,
            expire_ms=request.expire_time.ToMilliseconds()
            if request.HasField("expire_time")
            else 0,
        )
        if not await self._store(self._state.create_key(record, hash_secret(secret))):
            # Another call with the same request id wrote the key a moment ago.
            written = await self._store(self._state.get_key(key_id))
            assert written is not None
            return gw.CreateApiKeyResponse(api_key=key_message(written, now), secret_withheld=True)
        if request.token_limit or request.cost_limit_usd_micros:
            await self._store(
                self._state.set_budget(
                    tenant_id=record.tenant_id,
                    budget_id=f"key:{key_id}",
                    scope="key",
                    user_id="",
                    api_key_id=key_id,
                    fields="tcp",
                    token_limit=request.token_limit,
                    cost_limit=request.cost_limit_usd_micros,
                    period=_PERIODS.get(request.budget_period, "lifetime"),
                    etag="",
                    by=caller.user_id,
                    now_ms=now,
                )
            )
        _note(api_key_id=key_id)
        assert secret.startswith(API_KEY_PREFIX)
        return gw.CreateApiKeyResponse(api_key=key_message(record, now), secret=secret)

    async def ListApiKeys(self, request: gw.ListApiKeysRequest, context: Any) -> Any:
        await self._admin(context, "ListApiKeys")
        v = val.Violations()
        size = val.check_page(v, request.page_size, 50, 200)
        if request.user_id and not request.tenant_id:
            v.add("user_id", "needs tenant_id")
        if len(request.states) > 3:
            v.add("states", "at most 3")
        v.raise_if_any()
        states = set(request.states) or {api_key_pb2.API_KEY_STATE_ACTIVE}
        fingerprint = _fingerprint(
            gw.ListApiKeysRequest(
                tenant_id=request.tenant_id, user_id=request.user_id, states=request.states
            )
        )[:12]
        offset = _read_page_token(request.page_token, fingerprint)
        now = _now_ms()
        keys: list[api_key_pb2.ApiKey] = []
        cursor = offset
        while len(keys) < size:
            ids = await self._store(self._state.list_key_ids(request.tenant_id, cursor, size))
            if not ids:
                cursor = -1
                break
            for index, key_id in enumerate(ids):
                record = await self._store(self._state.get_key(key_id))
                if record is None or (request.user_id and record.user_id != request.user_id):
                    continue
                message = key_message(record, now)
                if message.state in states:
                    keys.append(message)
                    if len(keys) == size:
                        cursor = cursor + index + 1
                        break
            else:
                cursor += len(ids)
        token = _page_token(cursor, fingerprint) if cursor >= 0 and len(keys) == size else ""
        return gw.ListApiKeysResponse(api_keys=keys, next_page_token=token)

    async def GetApiKey(self, request: gw.GetApiKeyRequest, context: Any) -> Any:
        await self._admin(context, "GetApiKey")
        v = val.Violations()
        val.check_id(v, request.api_key_id, "api_key_id")
        v.raise_if_any()
        record = await self._store(self._state.get_key(request.api_key_id))
        if record is None:
            raise GatewayReason.api_key_not_found(request.api_key_id)
        return gw.GetApiKeyResponse(api_key=key_message(record, _now_ms()))

    async def RevokeApiKey(self, request: gw.RevokeApiKeyRequest, context: Any) -> Any:
        caller = await self._admin(context, "RevokeApiKey")
        v = val.Violations()
        val.check_id(v, request.api_key_id, "api_key_id")
        val.check_text(v, request.reason, "reason")
        v.raise_if_any()
        _note(api_key_id=request.api_key_id)
        record = await self._store(self._state.get_key(request.api_key_id))
        if record is None:
            raise GatewayReason.api_key_not_found(request.api_key_id)
        now = _now_ms()
        if record.state != "revoked":
            await self._store(
                self._state.revoke_key(request.api_key_id, caller.user_id, request.reason, now)
            )
            record = await self._store(self._state.get_key(request.api_key_id))
            assert record is not None
        return gw.RevokeApiKeyResponse(api_key=key_message(record, now))

    def _budget_ref(self, request: Any) -> tuple[str, str, str, str]:
        """Check tenant, scope and subject; return (tenant, budget id, user, key)."""
        v = val.Violations()
        val.check_id(v, request.tenant_id, "tenant_id", val.TENANT)
        scope = _SCOPES.get(request.scope)
        if scope is None:
            v.add("scope", "required")
        if scope == "user":
            val.check_id(v, request.user_id, "user_id", val.USER)
        elif request.user_id:
            v.add("user_id", "only with BUDGET_SCOPE_USER")
        if scope == "key":
            val.check_id(v, request.api_key_id, "api_key_id")
        elif request.api_key_id:
            v.add("api_key_id", "only with BUDGET_SCOPE_API_KEY")
        v.raise_if_any()
        budget_id = {"tenant": "tenant", "user": f"user:{request.user_id}"}.get(
            scope or "", f"key:{request.api_key_id}"
        )
        _note(tenant_id=request.tenant_id)
        return request.tenant_id, budget_id, request.user_id, request.api_key_id

    async def SetBudget(self, request: gw.SetBudgetRequest, context: Any) -> Any:
        caller = await self._admin(context, "SetBudget")
        tenant, budget_id, user, key = self._budget_ref(request)
        v = val.Violations()
        if request.request_id:
            val.check_request_id(v, request.request_id)
        paths = list(request.update_mask.paths)
        allowed = {"token_limit": "t", "cost_limit_usd_micros": "c", "period": "p"}
        for path in paths:
            if path != "*" and path not in allowed:
                v.add("update_mask", f"unknown path {path[:64]}")
        v.raise_if_any()
        bad = [
            (name, "0 to 10^15")
            for name in ("token_limit", "cost_limit_usd_micros")
            if not 0 <= getattr(request, name) <= 10**15
        ]
        if bad:
            raise GatewayReason.budget_invalid(bad)
        if "*" in paths:
            fields = "tcp"
        elif paths:
            fields = "".join(allowed[p] for p in paths)
        else:
            fields = "".join(
                code
                for name, code in allowed.items()
                if (getattr(request, name) if name != "period" else request.period)
            )
        scope_key = f"admin:{caller.user_id}:SetBudget"
        fingerprint = _fingerprint(request)
        if request.request_id:
            seen = await self._store(self._state.remembered(scope_key, request.request_id))
            if seen is not None:
                if seen[0] != fingerprint:
                    raise ServiceError.request_id_reused(request.request_id)
                stored = await self._store(self._state.get_budget(tenant, budget_id))
                if stored is not None:
                    return gw.SetBudgetResponse(budget=budget_message(stored))
        if key:
            record = await self._store(self._state.get_key(key))
            if record is None or record.tenant_id != tenant:
                raise GatewayReason.api_key_not_found(key)
        written = await self._store(
            self._state.set_budget(
                tenant_id=tenant,
                budget_id=budget_id,
                scope=_SCOPES[request.scope],
                user_id=user,
                api_key_id=key,
                fields=fields,
                token_limit=request.token_limit,
                cost_limit=request.cost_limit_usd_micros,
                period=_PERIODS.get(request.period, "lifetime"),
                etag=request.etag,
                by=caller.user_id,
                now_ms=_now_ms(),
            )
        )
        if not written:
            raise GatewayReason.etag_mismatch(budget_id)
        if request.request_id:
            await self._store(
                self._state.overwrite_remembered(scope_key, request.request_id, fingerprint, "")
            )
        stored = await self._store(self._state.get_budget(tenant, budget_id))
        assert stored is not None
        return gw.SetBudgetResponse(budget=budget_message(stored))

    async def ResetBudgetSpend(self, request: gw.ResetBudgetSpendRequest, context: Any) -> Any:
        caller = await self._admin(context, "ResetBudgetSpend")
        tenant, budget_id, _, _ = self._budget_ref(request)
        v = val.Violations()
        val.check_request_id(v, request.request_id)
        v.raise_if_any()
        scope_key = f"admin:{caller.user_id}:ResetBudgetSpend"
        fingerprint = _fingerprint(request)
        seen = await self._store(self._state.remembered(scope_key, request.request_id))
        if seen is not None:
            if seen[0] != fingerprint:
                raise ServiceError.request_id_reused(request.request_id)
            tokens, _, cost = seen[1].partition(",")
            stored = await self._store(self._state.get_budget(tenant, budget_id))
            if stored is None:
                raise GatewayReason.budget_not_found(budget_id)
            return gw.ResetBudgetSpendResponse(
                budget=budget_message(stored),
                reset_tokens=int(tokens or 0),
                reset_cost_usd_micros=int(cost or 0),
                replayed=True,
            )
        if await self._store(self._state.get_budget(tenant, budget_id)) is None:
            raise GatewayReason.budget_not_found(budget_id)
        reset = await self._store(
            self._state.reset_budget(tenant, budget_id, request.etag, _now_ms())
        )
        if reset is None:
            raise GatewayReason.etag_mismatch(budget_id)
        await self._store(
            self._state.overwrite_remembered(
                scope_key, request.request_id, fingerprint, f"{reset[0]},{reset[1]}"
            )
        )
        stored = await self._store(self._state.get_budget(tenant, budget_id))
        assert stored is not None
        return gw.ResetBudgetSpendResponse(
            budget=budget_message(stored), reset_tokens=reset[0], reset_cost_usd_micros=reset[1]
        )

    async def GetBudget(self, request: gw.GetBudgetRequest, context: Any) -> Any:
        await self._admin(context, "GetBudget")
        tenant, budget_id, _, _ = self._budget_ref(request)
        stored = await self._store(self._state.get_budget(tenant, budget_id))
        if stored is None:
            raise GatewayReason.budget_not_found(budget_id)
        return gw.GetBudgetResponse(budget=budget_message(stored))

    async def ListBudgets(self, request: gw.ListBudgetsRequest, context: Any) -> Any:
        await self._admin(context, "ListBudgets")
        v = val.Violations()
        size = val.check_page(v, request.page_size, 50, 200)
        if request.tenant_id:
            val.check_id(v, request.tenant_id, "tenant_id", val.TENANT)
        v.raise_if_any()
        fingerprint = _fingerprint(
            gw.ListBudgetsRequest(tenant_id=request.tenant_id, scope=request.scope)
        )[:12]
        after = ""
        if request.page_token:
            try:
                raw = base64.urlsafe_b64decode(
                    request.page_token + "=" * (-len(request.page_token) % 4)
                ).decode()
                seen, _, after = raw.partition(":")
                if seen != fingerprint or not after:
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                raise ServiceError.page_token_invalid() from None
        wanted = _SCOPES.get(request.scope)
        budgets: list[budget_pb2.BudgetAccount] = []
        last = after
        while len(budgets) < size:
            refs = await self._store(self._state.list_budget_refs(request.tenant_id, last, size))
            if not refs:
                last = ""
                break
            for tenant, budget_id in refs:
                last = f"{tenant}\n{budget_id}"
                stored = await self._store(self._state.get_budget(tenant, budget_id))
                if stored is None or (wanted and stored.scope != wanted):
                    continue
                budgets.append(budget_message(stored))
                if len(budgets) == size:
                    break
        token = ""
        if last and len(budgets) == size:
            token = base64.urlsafe_b64encode(f"{fingerprint}:{last}".encode()).decode().rstrip("=")
        return gw.ListBudgetsResponse(budgets=budgets, next_page_token=token)


def expire_after(seconds: float) -> datetime:
    """A moment ``seconds`` from now, for tests and the bootstrap."""
    return datetime.now(UTC) + timedelta(seconds=seconds)
