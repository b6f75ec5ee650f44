"""The ExecuteTool use case: checks in the contract's order, the ledger, limits and caps."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from opentelemetry import trace

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck_kit.approval import arguments_json_digest
from foredeck_kit.idempotency import tool_effect_key
from foredeck_kit.principal import Principal
from foredeck_toolrunner.domain import permissions
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.ports import (
    CallContext,
    EffectLedger,
    RateLimiter,
    RunResult,
    ToolRuntime,
)
from foredeck_toolrunner.domain.registry import ToolRegistry
from foredeck_toolrunner.domain.validation import (
    MAX_ARGUMENTS_BYTES,
    check_name,
    load_arguments,
    validate_arguments,
)

__all__ = [
    "ApprovalVerifier",
    "ExecutionObserver",
    "Executor",
    "cap_output",
    "tool_error",
]

IDEMPOTENCY_KEY = re.compile(r"^[a-zA-Z0-9_.:-]{1,512}$")
RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 1024 * 1024
MINIMUM_DEADLINE = timedelta(milliseconds=10)
_LEASE_MARGIN = timedelta(seconds=30)


class ApprovalVerifier(Protocol):
    """Checks that an approval token was issued for exactly this call (the kit's verifier)."""

    def verify(
        self,
        token: str,
        *,
        tool_name: str,
        arguments_digest: str,
        run_id: str,
        step_id: str,
        principal: Principal | None = None,
    ) -> object:
        """Return if the token allows this call; raise APPROVAL_INVALID otherwise."""
        ...


class ExecutionObserver(Protocol):
    """Records what happened to each call: span attributes, metrics and kill causes."""

    def finished(
        self,
        tool: tool_pb2.Tool | None,
        tool_name: str,
        outcome: str,
        seconds: float,
        kill_cause: str | None,
    ) -> None:
        """One call ended with ``outcome`` (``success``, a tool error kind, or an RPC reason)."""
        ...


def tool_error(
    kind: execution_pb2.ToolErrorKind.ValueType,
    message: str,
    *,
    details: Mapping[str, Any] | None = None,
    retryable: bool = False,
) -> execution_pb2.ToolOutcome:
    """An outcome holding a tool failure written for the agent."""
    error = execution_pb2.ToolError(kind=kind, message=message[:4096], retryable=retryable)
    if details:
        error.details_json = json.dumps(details, separators=(",", ":"))[: 64 * 1024]
    return execution_pb2.ToolOutcome(error=error)


def _duration_seconds(value: Any, default: float) -> float:
    seconds = value.seconds + value.nanos / 1e9
    return seconds if seconds > 0 else default


def cap_output(outcome: execution_pb2.ToolOutcome, policy: tool_pb2.ToolPolicy) -> None:
    """Apply the policy's output cap: cut the output to a JSON string, or fail the call."""
    if outcome.WhichOneof("outcome") != "output":
        return
    cap = policy.max_output_bytes or DEFAULT_MAX_OUTPUT
    text = outcome.output.output_json
    size = len(text.encode())
    outcome.output.output_bytes = max(outcome.output.output_bytes, size)
    if size <= cap:
        return
    if policy.output_overflow == tool_pb2.OUTPUT_OVERFLOW_FAIL:
        outcome.CopyFrom(
            tool_error(
                execution_pb2.TOOL_ERROR_KIND_OUTPUT_TOO_LARGE,
                f"the output ({size} bytes) is over the tool's limit of {cap} bytes",
                details={"outputBytes": size, "limitBytes": cap},
            )
        )
        return
    raw = text.encode()
    budget = cap - 2
    while True:
        prefix = raw[: max(budget, 0)].decode("utf-8", errors="ignore")
        cut = json.dumps(prefix, ensure_ascii=False)
        if len(cut.encode()) <= cap:
            break
        budget -= max(len(cut.encode()) - cap, 1)
    outcome.output.output_json = cut
    outcome.output.truncated = True


def _outcome_label(outcome: execution_pb2.ToolOutcome) -> str:
    if outcome.WhichOneof("outcome") == "output":
        return "success"
    return (
        execution_pb2.ToolErrorKind.Name(outcome.error.kind)
        .removeprefix("TOOL_ERROR_KIND_")
        .lower()
    )


class Executor:
    """Runs tool calls: permissions, ledger, arguments, approval, rate limit, then the tool."""

    def __init__(
        self,
        registry: ToolRegistry,
        ledger: EffectLedger,
        limiter: RateLimiter,
        runtimes: Callable[[tool_pb2.Tool], ToolRuntime],
        *,
        ledger_ttl: timedelta,
        observer: ExecutionObserver,
        approval_verifier: ApprovalVerifier | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._tracer = tracer or trace.get_tracer("foredeck.toolrunner")
        self._registry = registry
        self._ledger = ledger
        self._limiter = limiter
        self._runtimes = runtimes
        self._ledger_ttl = ledger_ttl
        self._observer = observer
        self._approvals = approval_verifier

    @staticmethod
    def _check_request(request: svc.ExecuteToolRequest) -> None:
        size = len(request.arguments_json.encode())
        if size > MAX_ARGUMENTS_BYTES:
            raise ToolRunnerError.request_too_large("arguments_json", MAX_ARGUMENTS_BYTES, size)
        bad = check_name(request.tool_name, "tool_name")
        if not IDEMPOTENCY_KEY.fullmatch(request.idempotency_key):
            bad.append(("idempotency_key", "required: 1-512 characters of [a-zA-Z0-9_.:-]"))
        if request.run_id or request.step_id:
            for field in ("run_id", "step_id"):
                if not RUN_ID.fullmatch(getattr(request, field)):
                    bad.append((field, "1-128 characters of [A-Za-z0-9_.-], both or neither"))
            if not bad and request.idempotency_key != tool_effect_key(
                request.run_id, request.step_id
            ):
                bad.append(("idempotency_key", "inside a run it must be <run_id>:<step_id>"))
        if len(request.tool_call_id) > 256:
            bad.append(("tool_call_id", "at most 256 characters"))
        if request.tool_version < 0:
            bad.append(("tool_version", "must be 0 or a version"))
        if len(request.approval_token) > 8192:
            bad.append(("approval_token", "at most 8 KiB"))
        if bad:
            raise ToolRunnerError.invalid_request(bad)

    @staticmethod
    def fingerprint(request: svc.ExecuteToolRequest) -> str:
        """What a repeated key must match: tool, requested version and arguments."""
        digest = hashlib.sha256()
        for part in (request.tool_name, str(request.tool_version), request.arguments_json):
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    async def execute(
        self,
        principal: Principal,
        request: svc.ExecuteToolRequest,
        *,
        time_remaining: Callable[[], float | None],
        principal_token: str | None = None,
    ) -> svc.ExecuteToolResponse:
        """Run one call and return its outcome (see ToolRunnerService.ExecuteTool)."""
        started = time.monotonic()
        tool: tool_pb2.Tool | None = None
        kill_cause: str | None = None
        label = "internal"
        with self._tracer.start_as_current_span("toolrunner.execute_tool") as span:
            span.set_attribute("tool.name", request.tool_name)
            span.set_attribute("tool.idempotency_key", request.idempotency_key)
            if request.run_id:
                span.set_attribute("foredeck.run_id", request.run_id)
            try:
                response, tool, kill_cause = await self._execute(
                    principal, request, time_remaining, principal_token
                )
                label = "replayed" if response.replayed else _outcome_label(response.outcome)
                span.set_attribute("tool.version", response.tool_version)
                span.set_attribute("tool.execution_id", response.execution_id)
                if tool.policy.safe_to_log:
                    span.set_attribute("tool.arguments", request.arguments_json[:4096])
                    if response.outcome.WhichOneof("outcome") == "output":
                        span.set_attribute(
                            "tool.output", response.outcome.output.output_json[:4096]
                        )
                return response
            except ToolRunnerError as error:
                label = error.reason.lower()
                raise
            except asyncio.CancelledError:
                label = "cancelled"
                raise
            finally:
                span.set_attribute("tool.outcome", label)
                if kill_cause:
                    span.set_attribute("tool.sandbox_kill_cause", kill_cause)
                self._observer.finished(
                    tool, request.tool_name, label, time.monotonic() - started, kill_cause
                )

    async def _execute(
        self,
        principal: Principal,
        request: svc.ExecuteToolRequest,
        time_remaining: Callable[[], float | None],
        principal_token: str | None,
    ) -> tuple[svc.ExecuteToolResponse, tool_pb2.Tool, str | None]:
        self._check_request(request)
        if principal.delegated:
            principal.require_run(request.run_id, required=True)
        left = time_remaining()
        if left is not None and left < MINIMUM_DEADLINE.total_seconds():
            raise ToolRunnerError.deadline_too_short(MINIMUM_DEADLINE)
        name = request.tool_name
        tool = await self._registry.lookup(principal, name, request.tool_version)
        missing = permissions.missing_tool_permission(principal, tool)
        if missing is not None:
            raise ToolRunnerError.tool_permission_denied(name, missing)

        timeout = _duration_seconds(tool.policy.timeout, DEFAULT_TIMEOUT)
        tenant, key = principal.tenant_id, request.idempotency_key
        fingerprint = self.fingerprint(request)
        lease = timedelta(seconds=timeout) + _LEASE_MARGIN
        while True:
            claim = await self._ledger.claim(tenant, key, fingerprint, name, lease)
            if claim.state == "claimed":
                break
            if claim.fingerprint != fingerprint:
                raise ToolRunnerError.idempotency_key_reused(key, claim.tool_name)
            if claim.state == "done":
                replay = svc.ExecuteToolResponse.FromString(claim.response)
                replay.replayed = True
                replay.tool_call_id = request.tool_call_id
                return replay, tool, None
            left = time_remaining()
            # Give up slightly before the caller's deadline so the typed answer still reaches it.
            wait = 5.0 if left is None else min(5.0, left - min(0.05, max(left * 0.02, 0.005)))
            if wait <= 0:
                raise ToolRunnerError.tool_timeout(name, waiting=True)
            await self._ledger.wait_change(tenant, key, wait)

        try:
            response, kill_cause = await self._run_claimed(
                tool, request, time_remaining, principal, principal_token, timeout
            )
        except BaseException:
            await asyncio.shield(self._ledger.release(tenant, key))
            raise
        await self._ledger.complete(tenant, key, response.SerializeToString(), self._ledger_ttl)
        return response, tool, kill_cause

    async def _run_claimed(
        self,
        tool: tool_pb2.Tool,
        request: svc.ExecuteToolRequest,
        time_remaining: Callable[[], float | None],
        principal: Principal,
        principal_token: str | None,
        tool_timeout: float,
    ) -> tuple[svc.ExecuteToolResponse, str | None]:
        name = request.tool_name
        arguments = load_arguments(name, request.arguments_json)
        validate_arguments(name, tool.definition.parameters_json_schema, arguments)
        if tool.policy.requires_approval:
            self._check_approval(tool, request, principal)
        if tool.policy.HasField("rate_limit"):
            rate = tool.policy.rate_limit
            window = timedelta(seconds=_duration_seconds(rate.window, 1.0))
            wait = await self._limiter.acquire(principal.tenant_id, name, rate.max_calls, window)
            if wait is not None:
                raise ToolRunnerError.rate_limited(
                    name, rate.max_calls, window.total_seconds(), wait
                )

        left = time_remaining()
        caller_bound = False
        timeout = tool_timeout
        effective = timeout
        if left is not None:
            # Stop slightly before the caller's deadline so the answer still reaches it.
            budget = left - min(0.05, max(left * 0.02, 0.005))
            if budget <= 0:
                raise ToolRunnerError.tool_timeout(name, waiting=False)
            if budget < timeout:
                effective, caller_bound = budget, True
        call = CallContext(
            tool=tool,
            arguments=arguments,
            arguments_json=request.arguments_json or "{}",
            timeout=effective,
            idempotency_key=request.idempotency_key,
            run_id=request.run_id,
            step_id=request.step_id,
            tool_call_id=request.tool_call_id,
            principal_token=principal_token,
        )
        runtime = self._runtimes(tool)
        start_wall = datetime.now(UTC)
        start = time.monotonic()
        try:
            # The runtime enforces the timeout itself; this is the backstop if it does not.
            async with asyncio.timeout(effective + 2.0):
                result = await runtime.run(call)
        except TimeoutError:
            result = RunResult(
                outcome=tool_error(
                    execution_pb2.TOOL_ERROR_KIND_TIMEOUT,
                    f"the tool did not finish within {effective:.3g} s and was stopped",
                    retryable=True,
                ),
                kill_cause="timeout",
            )
        elapsed = time.monotonic() - start
        timed_out = (
            result.outcome.WhichOneof("outcome") == "error"
            and result.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_TIMEOUT
        )
        if timed_out and caller_bound:
            raise ToolRunnerError.tool_timeout(name, waiting=False)
        cap_output(result.outcome, tool.policy)
        self._check_output_schema(tool, result.outcome)
        response = svc.ExecuteToolResponse(
            execution_id=uuid.uuid4().hex,
            tool_name=name,
            tool_version=tool.version,
            tool_call_id=request.tool_call_id,
            outcome=result.outcome,
        )
        response.start_time.FromDatetime(start_wall)
        response.duration.FromTimedelta(timedelta(seconds=elapsed))
        if result.sandbox is not None:
            response.sandbox.CopyFrom(result.sandbox)
        return response, result.kill_cause

    def _check_approval(
        self, tool: tool_pb2.Tool, request: svc.ExecuteToolRequest, principal: Principal
    ) -> None:
        name = tool.definition.name
        if not request.approval_token:
            raise ToolRunnerError.approval_required(name)
        if self._approvals is None:
            # Without the orchestrator's keys no token can be checked: refuse them all.
            raise ToolRunnerError.approval_invalid(name)
        self._approvals.verify(
            request.approval_token,
            tool_name=name,
            arguments_digest=arguments_json_digest(request.arguments_json or "{}"),
            run_id=request.run_id,
            step_id=request.step_id,
            principal=principal,
        )

    @staticmethod
    def _check_output_schema(tool: tool_pb2.Tool, outcome: execution_pb2.ToolOutcome) -> None:
        if outcome.WhichOneof("outcome") != "output" or outcome.output.truncated:
            return
        try:
            value = json.loads(outcome.output.output_json)
        except ValueError:
            outcome.CopyFrom(
                tool_error(execution_pb2.TOOL_ERROR_KIND_INVALID_OUTPUT, "the output is not JSON")
            )
            return
        if not tool.output_json_schema:
            return
        validator = Draft202012Validator(json.loads(tool.output_json_schema))
        error = next(iter(validator.iter_errors(value)), None)
        if error is not None:
            outcome.CopyFrom(
                tool_error(
                    execution_pb2.TOOL_ERROR_KIND_INVALID_OUTPUT,
                    "the output does not satisfy the tool's output schema: " + error.message[:512],
                )
            )
