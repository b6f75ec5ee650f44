"""Outbound gRPC channels that carry the caller's identity, request id, trace and deadline.

Python gRPC does not propagate deadlines: a service that calls another while serving an RPC
must cap the outbound timeout by what is left of the inbound one. :func:`open_channel` does
that for every call, forwards the verified inbound principal and ``x-request-id``, injects W3C
trace context, and retries idempotent methods on UNAVAILABLE through gRPC's own retry policy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.trace import TracerProvider

from foredeck_kit.context import REQUEST_ID_METADATA_KEY, current_rpc, outbound_principal_token
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY
from foredeck_kit.settings import ServiceSettings

if TYPE_CHECKING:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "PrincipalSource",
    "idempotent_methods",
    "open_channel",
    "outbound_interceptors",
    "retry_service_config",
]

DEFAULT_TIMEOUT_SECONDS = 30.0
"""Timeout of a call that sets none and has no settings to take one from."""

_DEADLINE_MARGIN_RATIO = 0.01
_DEADLINE_MARGIN_SECONDS = 0.001

PrincipalSource: TypeAlias = Callable[[], str | None]
"""Returns a principal token for calls made outside any inbound RPC (e.g. a worker's own)."""

Continuation: TypeAlias = Callable[[grpc.aio.ClientCallDetails, Any], Any]


class _Outbound:
    """Rewrites each call's details: capped timeout, principal and request id metadata."""

    def __init__(self, default_timeout: float | None, principal: PrincipalSource | None) -> None:
        self._default_timeout = default_timeout
        self._principal = principal

    def details(self, call: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = call.timeout if call.timeout is not None else self._default_timeout
        state = current_rpc()
        remaining = state.time_remaining() if state is not None else None
        if remaining is not None:
            # gRPC sends timeouts rounded up (to 10 ms between 1 s and 10 s, 100 ms up to
            # 100 s, ...) and the downstream starts its clock on receipt: keep a margin so
            # the downstream's deadline never ends after the inbound one.
            remaining = remaining * (1 - _DEADLINE_MARGIN_RATIO) - _DEADLINE_MARGIN_SECONDS
            if remaining <= 0:
                # Sending would only waste the downstream's time: the caller has given up.
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="inbound deadline already exceeded; call not sent",
                    debug_error_string=None,
                )
            timeout = remaining if timeout is None else min(timeout, remaining)

        metadata = grpc.aio.Metadata(*tuple(call.metadata or ()))
        if PRINCIPAL_METADATA_KEY not in metadata:
            token = outbound_principal_token()
            if token is None and state is not None:
                token = state.principal_token
            if token is None and self._principal is not None:
                token = self._principal()
            if token is not None:
                metadata.add(PRINCIPAL_METADATA_KEY, token)
        if (
            REQUEST_ID_METADATA_KEY not in metadata
            and state is not None
            and state.request_id is not None
        ):
            metadata.add(REQUEST_ID_METADATA_KEY, state.request_id)
        return grpc.aio.ClientCallDetails(
            call.method, timeout, metadata, call.credentials, call.wait_for_ready
        )


class _UnaryUnaryOutbound(_UnaryUnary):
    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._outbound.details(client_call_details), request)


class _UnaryStreamOutbound(_UnaryStream):
    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._outbound.details(client_call_details), request)


class _StreamUnaryOutbound(_StreamUnary):
    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_stream_unary(
        self, continuation: Continuation, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._outbound.details(client_call_details), request_iterator)


class _StreamStreamOutbound(_StreamStream):
    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_stream_stream(
        self, continuation: Continuation, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._outbound.details(client_call_details), request_iterator)


def outbound_interceptors(
    *,
    default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
    principal: PrincipalSource | None = None,
    tracer_provider: TracerProvider | None = None,
) -> list[Any]:
    """Return the client chain, outermost first: OpenTelemetry, then identity and deadline."""
    outbound = _Outbound(default_timeout, principal)
    # The instrumentation package ships without annotations for this factory.
    tracing: list[Any] = aio_client_interceptors(tracer_provider=tracer_provider)  # type: ignore[no-untyped-call]
    return [
        *tracing,
        _UnaryUnaryOutbound(outbound),
        _UnaryStreamOutbound(outbound),
        _StreamUnaryOutbound(outbound),
        _StreamStreamOutbound(outbound),
    ]


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


_RETRYABLE_LEVELS = frozenset(
    {
        descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
        descriptor_pb2.MethodOptions.IDEMPOTENT,
    }
)


def idempotent_methods(*services: ServiceDescriptor) -> list[tuple[str, str]]:
    """The ``(service, method)`` pairs a contract declares safe to retry.

    Reads each RPC's ``idempotency_level`` option (NO_SIDE_EFFECTS or IDEMPOTENT) from the
    generated descriptors, so a client's retry policy follows the contract instead of a list
    kept by hand. Pass e.g. ``memory_service_pb2.DESCRIPTOR.services_by_name["…"]``.
    """
    return [
        (service.full_name, method.name)
        for service in services
        for method in service.methods
        if method.GetOptions().idempotency_level in _RETRYABLE_LEVELS
    ]


def retry_service_config(
    methods: Sequence[tuple[str, str]],
    *,
    max_attempts: int = 4,
    initial_backoff: float = 0.1,
    max_backoff: float = 2.0,
    backoff_multiplier: float = 2.0,
) -> str:
    """Return a gRPC service config retrying ``methods`` on UNAVAILABLE only.

    ``methods`` are ``(service, method)`` pairs of idempotent RPCs, e.g.
    ``("foredeck.memory.v1.MemoryService", "Recall")``; an empty method name covers every
    method of the service. Only idempotent methods belong here: a retried call may have run.
    """
    if not 2 <= max_attempts <= 5:
        raise ValueError("gRPC allows 2 to 5 attempts")
    if initial_backoff <= 0 or max_backoff < initial_backoff or backoff_multiplier <= 0:
        raise ValueError("backoff must be positive and max_backoff >= initial_backoff")
    names: list[dict[str, str]] = []
    for service, method in methods:
        if not service:
            raise ValueError("retry methods need a service name")
        names.append({"service": service, "method": method} if method else {"service": service})
    config: dict[str, Any] = {"methodConfig": []}
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": _seconds(initial_backoff),
                    "maxBackoff": _seconds(max_backoff),
                    "backoffMultiplier": backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config, separators=(",", ":"))


def open_channel(
    target: str,
    *,
    settings: ServiceSettings | None = None,
    default_timeout: float | None = None,
    retry_methods: Sequence[tuple[str, str]] = (),
    max_attempts: int = 4,
    principal: PrincipalSource | None = None,
    tracer_provider: TracerProvider | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """Open an aio channel to ``target`` with Foredeck's client interceptors and retry policy.

    Each call's timeout is its own, else ``default_timeout``, else the settings' default, and
    never more than the inbound RPC has left; a call made after the inbound deadline fails at
    once with DEADLINE_EXCEEDED. Open channels inside the event loop that will use them.
    """
    timeout = default_timeout
    if timeout is None:
        timeout = (
            settings.default_call_timeout_seconds
            if settings is not None
            else DEFAULT_TIMEOUT_SECONDS
        )
    channel_options: dict[str, Any] = {
        "grpc.enable_retries": 1,
        "grpc.service_config": retry_service_config(retry_methods, max_attempts=max_attempts),
    }
    if settings is not None:
        channel_options.update(
            {
                "grpc.max_send_message_length": settings.max_message_bytes,
                "grpc.max_receive_message_length": settings.max_message_bytes,
                "grpc.keepalive_time_ms": settings.keepalive_time_ms,
                "grpc.keepalive_timeout_ms": settings.keepalive_timeout_ms,
            }
        )
    channel_options.update(options)
    interceptors = outbound_interceptors(
        default_timeout=timeout, principal=principal, tracer_provider=tracer_provider
    )
    if credentials is not None:
        return grpc.aio.secure_channel(
            target, credentials, options=list(channel_options.items()), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(
        target, options=list(channel_options.items()), interceptors=interceptors
    )
