"""Outbound gRPC channels that carry the caller's identity, request id, trace and deadline.

Python gRPC does not propagate deadlines: a service that calls another while serving an RPC
must cap the outbound timeout by what is left of the inbound one. :func:`open_channel` returns
a channel that does that for every call, forwards the verified inbound principal and
``x-request-id``, starts a client span and injects its W3C trace context, and retries
idempotent methods on UNAVAILABLE through gRPC's own retry policy.

The channel wraps each call directly instead of using ``grpc.aio`` client interceptors, whose
per-call machinery (an extra task and call object per interceptor) costs more than the work
itself. Generated stubs take it like any channel: ``MemoryServiceStub(open_channel(...))``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from foredeck_kit.context import REQUEST_ID_METADATA_KEY, outbound_principal_token
from foredeck_kit.context import _rpc as _rpc_var
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY
from foredeck_kit.settings import ServiceSettings

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "DownstreamCall",
    "PrincipalSource",
    "downstream_call",
    "idempotent_methods",
    "open_channel",
    "retry_service_config",
]

DEFAULT_TIMEOUT_SECONDS = 30.0
"""Timeout of a call that sets none and has no settings to take one from."""

_DEADLINE_MARGIN_RATIO = 0.01
_DEADLINE_MARGIN_SECONDS = 0.001
_INSTRUMENTATION = "foredeck_kit.channels"
_DOWNSTREAM_ATTRIBUTE = "_foredeck_downstream_call"

PrincipalSource: TypeAlias = Callable[[], str | None]
"""Returns a principal token for calls made outside any inbound RPC (e.g. a worker's own)."""

Metadata: TypeAlias = "grpc.aio.Metadata | Sequence[tuple[str, str | bytes]] | None"


@dataclass(frozen=True, slots=True)
class DownstreamCall:
    """What a failed outbound call tells the server's error mapping about the downstream."""

    name: str
    """The channel's name, else the called service, e.g. ``foredeck.memory.v1.MemoryService``."""
    method: str
    """The full method called, ``/package.Service/Method``."""
    inbound_deadline: bool
    """Whether the call's timeout was the inbound RPC's remaining time (it ran out first)."""


def downstream_call(error: BaseException) -> DownstreamCall | None:
    """Return what the kit's channel recorded on ``error``, None for other errors."""
    found = getattr(error, _DOWNSTREAM_ATTRIBUTE, None)
    return found if isinstance(found, DownstreamCall) else None


class _PairSetter(Setter[list[tuple[str, str]]]):
    """Lets the propagator append trace headers straight to the outgoing metadata pairs."""

    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key, value))


_SETTER = _PairSetter()
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class _Method:
    """What a channel computes once per method rather than once per call."""

    full: str
    span_name: str
    attributes: dict[str, str]
    downstream: str


class _Outbound:
    """Per-channel policy: default timeout, principal source, tracing and naming."""

    def __init__(
        self,
        *,
        default_timeout: float | None,
        principal: PrincipalSource | None,
        tracer_provider: TracerProvider | None,
        name: str | None,
    ) -> None:
        self._default_timeout = default_timeout
        self._principal = principal
        self._name = name
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer: trace.Tracer | None = (
            None
            if isinstance(provider, trace.NoOpTracerProvider)
            else provider.get_tracer(_INSTRUMENTATION)
        )

    def method(self, full_method: str) -> _Method:
        service, _, method = full_method.lstrip("/").partition("/")
        return _Method(
            full=full_method,
            span_name=f"{service}/{method}",
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            downstream=self._name or service,
        )

    def prepare(
        self, method: _Method, timeout: float | None, metadata: Metadata
    ) -> tuple[float | None, list[tuple[str, Any]], trace.Span | None, bool]:
        """Return the call's timeout, metadata and span, and whether the inbound deadline set
        the timeout; raise DEADLINE_EXCEEDED when the inbound deadline has already passed."""
        if timeout is None:
            timeout = self._default_timeout
        state = _rpc_var.get()
        inbound = False
        if state is not None and state.deadline is not None:
            # gRPC sends timeouts rounded up (to 10 ms between 1 s and 10 s, 100 ms up to
            # 100 s, ...) and the downstream starts its clock on receipt: keep a margin so
            # the downstream's deadline never ends after the inbound one.
            remaining = (state.deadline - time.monotonic()) * (
                1 - _DEADLINE_MARGIN_RATIO
            ) - _DEADLINE_MARGIN_SECONDS
            if remaining <= 0:
                # Sending would only waste the downstream's time: the caller has given up.
                error = grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="inbound deadline already exceeded; call not sent",
                    debug_error_string=None,
                )
                setattr(
                    error,
                    _DOWNSTREAM_ATTRIBUTE,
                    DownstreamCall(method.downstream, method.full, True),
                )
                raise error
            if timeout is None or remaining < timeout:
                timeout = remaining
                inbound = True

        pairs: list[tuple[str, Any]]
        has_principal = has_request_id = False
        if metadata:
            pairs = list(metadata)
            for key, _ in pairs:
                if key == PRINCIPAL_METADATA_KEY:
                    has_principal = True
                elif key == REQUEST_ID_METADATA_KEY:
                    has_request_id = True
        else:
            pairs = []
        if not has_principal:
            token = outbound_principal_token()
            if token is None and state is not None:
                token = state.principal_token
            if token is None and self._principal is not None:
                token = self._principal()
            if token is not None:
                pairs.append((PRINCIPAL_METADATA_KEY, token))
        if not has_request_id and state is not None and state.request_id is not None:
            pairs.append((REQUEST_ID_METADATA_KEY, state.request_id))

        span: trace.Span | None = None
        if self.tracer is not None:
            span = self.tracer.start_span(
                method.span_name, kind=SpanKind.CLIENT, attributes=method.attributes
            )
            propagate.inject(pairs, context=trace.set_span_in_context(span), setter=_SETTER)
        else:
            # No spans of our own, but an inbound trace still reaches the downstream.
            propagate.inject(pairs, setter=_SETTER)
        return timeout, pairs, span, inbound


def _end_span(span: trace.Span, code: grpc.StatusCode, end_time: int) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end(end_time=end_time)


class _Tracked:
    """Delegates a call's accessors and ends its span, recording the downstream on errors."""

    __slots__ = ("_call", "_inbound_deadline", "_method", "_span")

    def __init__(
        self, call: Any, span: trace.Span | None, method: _Method, inbound_deadline: bool
    ) -> None:
        self._call = call
        self._span = span
        self._method = method
        self._inbound_deadline = inbound_deadline

    def _end(self, code: grpc.StatusCode, error: BaseException | None = None) -> None:
        if error is not None:
            setattr(
                error,
                _DOWNSTREAM_ATTRIBUTE,
                DownstreamCall(self._method.downstream, self._method.full, self._inbound_deadline),
            )
        span = self._span
        if span is None:
            return
        self._span = None
        end_time = time.time_ns()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _end_span(span, code, end_time)
        else:
            # Ending the span is bookkeeping: the caller gets its answer first.
            loop.call_soon(_end_span, span, code, end_time)

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, grpc.aio.AioRpcError):
            self._end(error.code(), error)
        elif isinstance(error, asyncio.CancelledError):
            self._end(grpc.StatusCode.CANCELLED)
        else:
            self._end(grpc.StatusCode.UNKNOWN)

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def cancelled(self) -> bool:
        return bool(self._call.cancelled())

    def done(self) -> bool:
        return bool(self._call.done())

    def time_remaining(self) -> float | None:
        remaining: float | None = self._call.time_remaining()
        return remaining

    def add_done_callback(self, callback: Any) -> None:
        self._call.add_done_callback(callback)

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        return code

    async def details(self) -> str:
        details: str = await self._call.details()
        return details

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()


class _UnaryResponse(_Tracked):
    def __await__(self) -> Generator[Any, None, Any]:
        try:
            response = yield from self._call.__await__()
        except BaseException as error:
            self._failed(error)
            raise
        self._end(grpc.StatusCode.OK)
        return response


class _StreamResponse(_Tracked):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            async for item in self._call:
                yield item
        except BaseException as error:
            self._failed(error)
            raise
        self._end(grpc.StatusCode.OK)

    async def read(self) -> Any:
        try:
            item = await self._call.read()
        except BaseException as error:
            self._failed(error)
            raise
        if item is _EOF:
            self._end(grpc.StatusCode.OK)
        return item


class _Writes:
    __slots__ = ()
    _call: Any

    async def write(self, request: Any) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()


class _UnaryUnaryCall(_UnaryResponse, grpc.aio.UnaryUnaryCall):  # type: ignore[type-arg]
    pass


class _UnaryStreamCall(_StreamResponse, grpc.aio.UnaryStreamCall):  # type: ignore[type-arg]
    pass


class _StreamUnaryCall(_Writes, _UnaryResponse, grpc.aio.StreamUnaryCall):  # type: ignore[type-arg]
    pass


class _StreamStreamCall(_Writes, _StreamResponse, grpc.aio.StreamStreamCall):  # type: ignore[type-arg]
    pass


class _Refused:
    """A call refused before it was sent: awaiting or iterating it raises ``error``."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self._error = error

    def __await__(self) -> Generator[Any, None, Any]:
        raise self._error
        yield  # pragma: no cover - makes this a generator

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        raise self._error
        yield  # pragma: no cover - makes this an async generator

    async def read(self) -> Any:
        raise self._error

    async def write(self, request: Any) -> None:
        raise self._error

    async def done_writing(self) -> None:
        raise self._error

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return 0.0

    def add_done_callback(self, callback: Any) -> None:
        callback(self)

    async def initial_metadata(self) -> Any:
        return self._error.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return self._error.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return self._error.code()

    async def details(self) -> str | None:
        return self._error.details()

    async def wait_for_connection(self) -> None:
        raise self._error


class _MultiCallable:
    """Shared by the four call shapes: prepares each call and tracks what it returns."""

    _tracked: type[_Tracked]

    def __init__(self, inner: Any, outbound: _Outbound, method: str) -> None:
        self._inner = inner
        self._outbound = outbound
        self._method = outbound.method(method)

    def _invoke(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        try:
            timeout, pairs, span, inbound = self._outbound.prepare(self._method, timeout, metadata)
        except grpc.aio.AioRpcError as error:
            return _Refused(error)
        try:
            call = self._inner(
                request,
                timeout=timeout,
                metadata=pairs,
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        except BaseException:
            if span is not None:
                span.end()
            raise
        return self._tracked(call, span, self._method, inbound)


class _UnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    _tracked = _UnaryUnaryCall

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    _tracked = _UnaryStreamCall

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_MultiCallable, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[type-arg]
    _tracked = _StreamUnaryCall

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Metadata = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _StreamStream(_MultiCallable, grpc.aio.StreamStreamMultiCallable):  # type: ignore[type-arg]
    _tracked = _StreamStreamCall

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Metadata = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _Channel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` whose multicallables add Foredeck's per-call behaviour."""

    def __init__(self, inner: grpc.aio.Channel, outbound: _Outbound) -> None:
        self._inner = inner
        self._outbound = outbound

    async def __aenter__(self) -> _Channel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self._inner.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._inner.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()

    # The keyword ``_registered_method`` is what generated stubs pass; grpc-stubs lacks it.
    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        inner = self._inner.unary_unary(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryUnary(inner, self._outbound, method)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        inner = self._inner.unary_stream(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryStream(inner, self._outbound, method)

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        inner = self._inner.stream_unary(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )
        return _StreamUnary(inner, self._outbound, method)

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        inner = self._inner.stream_stream(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )
        return _StreamStream(inner, self._outbound, method)


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
    name: str | None = None,
) -> grpc.aio.Channel:
    """Open an aio channel to ``target`` with Foredeck's per-call behaviour and retry policy.

    Each call's timeout is its own, else ``default_timeout``, else the settings' default, and
    never more than the inbound RPC has left; a call made after the inbound deadline fails at
    once with DEADLINE_EXCEEDED. ``name`` is how errors from this channel name the downstream
    (default: the called service's full name). Open channels inside the event loop that will
    use them.
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
    if credentials is not None:
        inner = grpc.aio.secure_channel(target, credentials, options=list(channel_options.items()))
    else:
        inner = grpc.aio.insecure_channel(target, options=list(channel_options.items()))
    outbound = _Outbound(
        default_timeout=timeout,
        principal=principal,
        tracer_provider=tracer_provider,
        name=name,
    )
    return _Channel(inner, outbound)
