"""The orchestrator as the gateway calls it: its errors mapped to the gateway's catalogue.

The channel (:func:`foredeck_kit.channels.open_channel`) caps every call by the caller's
remaining deadline and sends the principal the gateway minted for the call. An orchestrator
error is never forwarded as it came: a reason the gateway's catalogue shares keeps its name and
code, anything else becomes the closest shared reason, and the orchestrator's reason and domain
travel in ``upstreamReason`` and ``upstreamDomain``.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from foredeck.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from foredeck_gateway.errors import GatewayReason
from foredeck_kit.context import current_rpc
from foredeck_kit.errors import ServiceError, error_details

__all__ = ["Orchestrator", "map_orchestrator_error"]

# Reasons of the orchestrator that the gateway's catalogue has under the same name.
_SAME_NAME = frozenset(
    {
        "RUN_NOT_FOUND",
        "RUN_ALREADY_FINISHED",
        "RUN_NOT_FINISHED",
        "STEP_NOT_FOUND",
        "APPROVAL_NOT_FOUND",
        "APPROVAL_NOT_PENDING",
        "AGENT_NOT_FOUND",
        "AGENT_VERSION_NOT_FOUND",
        "AGENT_ALREADY_EXISTS",
        "AGENT_ARCHIVED",
        "BUDGET_INVALID",
        "CONCURRENCY_LIMITED",
        "QUEUE_FULL",
        "REPLAY_DIVERGED",
        "EVENT_ID_INVALID",
        "EVENTS_TRIMMED",
        "JOURNAL_EXPIRED",
        "ETAG_MISMATCH",
        "REQUEST_ID_REUSED",
        "PAGE_TOKEN_INVALID",
        "INVALID_REQUEST",
        "REQUEST_TOO_LARGE",
    }
)
# Codes whose errors the gateway passes on under the closest shared reason.
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_REQUEST",
    grpc.StatusCode.OUT_OF_RANGE: "INVALID_REQUEST",
}


def map_orchestrator_error(error: grpc.aio.AioRpcError) -> ServiceError:
    """The gateway's error for an orchestrator's failed call."""
    code = error.code()
    details = error_details(error)
    upstream = details.reason
    if code is grpc.StatusCode.UNAVAILABLE or upstream == "CIRCUIT_OPEN":
        return GatewayReason.orchestrator_unavailable(upstream)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        state = current_rpc()
        remaining = state.time_remaining() if state is not None else None
        if remaining is not None and remaining <= 0:
            return ServiceError(code, "DEADLINE_TOO_SHORT", "deadline exceeded")
        return GatewayReason.orchestrator_timeout(upstream)
    if code is grpc.StatusCode.CANCELLED:
        return ServiceError(code, "ORCHESTRATOR_UNAVAILABLE", "orchestrator call cancelled")
    metadata: dict[str, str] = dict(details.metadata)
    if upstream:
        metadata["upstreamReason"] = upstream
    if details.domain:
        metadata["upstreamDomain"] = details.domain
    if upstream in _SAME_NAME:
        reason = upstream
    elif code in _BY_CODE:
        reason = _BY_CODE[code]
    elif upstream == "SUB_AGENT_LIMIT":
        reason = "CONCURRENCY_LIMITED"
    else:
        # Principal and permission failures between gateway and orchestrator, and anything
        # unknown, are the gateway's own fault, not the caller's.
        return ServiceError.internal()
    violations: list[tuple[str, str]] = [(v.field, v.description) for v in details.field_violations]
    if reason in {"INVALID_REQUEST", "BUDGET_INVALID"} and not violations:
        violations = [("request", "refused by the orchestrator")]
    return ServiceError(
        code,
        reason,
        _MESSAGES.get(reason, reason.lower().replace("_", " ")),
        metadata=metadata,
        field_violations=violations,
        retry_after=details.retry_after,
        quota_violations=list(details.quota_violations),
    )


_MESSAGES = {
    "RUN_NOT_FOUND": "run not found",
    "AGENT_NOT_FOUND": "agent not found",
    "APPROVAL_NOT_FOUND": "approval not found",
}


class Orchestrator:
    """Typed access to the orchestrator's RunService and AgentService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.runs: Any = orch_grpc.RunServiceStub(channel)
        self.agents: Any = orch_grpc.AgentServiceStub(channel)

    async def call(self, method: Any, request: Any) -> Any:
        """Make a unary call; raise the gateway's error when it fails."""
        try:
            return await method(request)
        except grpc.aio.AioRpcError as exc:
            raise map_orchestrator_error(exc) from None
