"""The per-RPC work every Foredeck server does, wrapped around each method handler once.

A service's ``register`` callback receives a :class:`RegisteringServer` instead of the
``grpc.aio`` server: every handler it adds (``add_generic_rpc_handlers``,
``add_registered_method_handlers``, i.e. what generated ``add_…_to_server`` functions call) is
wrapped once, at registration, by :class:`HandlerWrapper`. No ``grpc.aio`` server interceptor
runs: they rebuild handlers on every call and cost more than the work they wrap.

For each RPC, in this order:

1. Request context: the metadata is scanned once (principal, ``x-request-id``, trace
   headers) and the :class:`~foredeck_kit.context.RpcState` is made current.
2. Principal verification; health, reflection and ``public_methods`` skip it.
3. A server span continuing the caller's W3C trace (health and reflection are not traced),
   started with every attribute known at once.
4. The service's middleware (:data:`Middleware`), outermost first.
5. Request decoding, the handler, response encoding. Handlers are registered with bytes in and
   bytes out and the wrapper runs the real (de)serializers, so a malformed request is
   INVALID_ARGUMENT and a response that cannot be encoded is INTERNAL instead of grpc's own
   UNKNOWN with the exception text on the wire.
6. Error mapping: one last-resort mapping covers everything above — :class:`ServiceError` ->
   rich status, a downstream's error -> this service's own (see :func:`_map_downstream`),
   anything else -> INTERNAL "internal error".
7. At the end: one log line (``event="rpc"``), the ``grpc_server_*`` metrics and the span's
   status, written as the event loop's next callback so the response goes out first.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from foredeck_kit.channels import downstream_call
from foredeck_kit.context import REQUEST_ID_METADATA_KEY, RpcState, current_rpc
from foredeck_kit.context import _rpc as _rpc_var
from foredeck_kit.errors import Reason, ServiceError, error_details, to_status
from foredeck_kit.logs import emit, level_enabled
from foredeck_kit.metrics import MethodMetrics, Metrics
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY, PrincipalVerifier
from foredeck_kit.principal import _current as _principal_var

__all__ = [
    "INFRASTRUCTURE_SERVICES",
    "Context",
    "HandlerWrapper",
    "Middleware",
    "RegisteringServer",
    "abort_with_error",
]

INFRASTRUCTURE_SERVICES: frozenset[str] = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
"""Services every caller may use without a principal (probes and tooling); never traced,
logged at debug level and outside the service's middleware."""

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

Middleware: TypeAlias = Callable[[RpcState, Context], AbstractAsyncContextManager[object]]
"""Extra per-RPC behaviour a service adds: called with the RPC's state (principal already
verified) and context, it returns an async context manager that is entered before the handler
runs and exited after it (after the last message of a response stream). It may raise
:class:`ServiceError` on entry or exit; the error is mapped like the handler's own. Write one
with :func:`contextlib.asynccontextmanager`."""

_OK = grpc.StatusCode.OK
_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
# OpenTelemetry's RPC conventions: these codes make a server span an error.
_SERVER_SPAN_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_MAX_REQUEST_ID_CHARS = 128
_DOWNSTREAM_RETRY = timedelta(seconds=1)
_EMPTY_CONTEXT = otel_context.Context()


class _CarrierGetter(Getter[dict[str, str]]):
    """Reads trace headers from the dict the metadata scan filled: plain strings, no checks."""

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _CarrierGetter()
_INSTRUMENTATION = "foredeck_kit.handlers"
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]

if TYPE_CHECKING:
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
    _ServiceRpcHandler = grpc.ServiceRpcHandler[Any, Any]
else:
    _GenericHandler = grpc.GenericRpcHandler
    _ServiceRpcHandler = grpc.ServiceRpcHandler


# --- error mapping -------------------------------------------------------------------------------


def _coerced(error: ServiceError) -> ServiceError:
    """A copy of ``error`` whose wire fields are all strings, for errors built carelessly."""
    coerced = ServiceError(
        error.code,
        error.reason,
        str(error.message),
        metadata={str(k): str(v) for k, v in dict(error.metadata).items()},
        field_violations=[(str(f), str(d)) for f, d in error.field_violations],
        retry_after=error.retry_after if isinstance(error.retry_after, timedelta) else None,
        quota_violations=[(str(s), str(d)) for s, d in error.quota_violations],
    )
    coerced.__cause__ = error.__cause__
    return coerced


def _wire_status(
    error: ServiceError, domain: str
) -> tuple[grpc.Status, ServiceError, BaseException | None]:
    """Build the status for ``error``; never fails.

    A field that is not a string (metadata values above all) is converted with ``str``; an
    error that still cannot be encoded becomes INTERNAL, returned with the reason why.
    """
    try:
        return to_status(error, domain), error, None
    except Exception:
        pass
    try:
        coerced = _coerced(error)
        return to_status(coerced, domain), coerced, None
    except Exception as exc:
        internal = ServiceError.internal()
        return to_status(internal, domain), internal, exc


async def abort_with_error(context: Context, error: ServiceError, domain: str) -> NoReturn:
    """End the RPC with ``error`` as a rich status in ``domain``; never returns."""
    status, error, _ = _wire_status(error, domain)
    state = current_rpc()
    if state is not None:
        state.reason = error.reason
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


@dataclass(slots=True)
class _Mapped:
    """How a failure ends on the wire and in the log."""

    error: ServiceError
    level: int
    log_exception: BaseException | None = None
    fields: dict[str, str] | None = None
    status: grpc.Status | None = None


def _map_downstream(error: grpc.aio.AioRpcError, state: RpcState | None) -> _Mapped:
    """Map a downstream's error that a handler let through; never forward it as it came.

    - UNAVAILABLE -> UNAVAILABLE ``DOWNSTREAM_UNAVAILABLE`` with RetryInfo (the downstream's,
      else 1 s) and the downstream's reason as ``upstreamReason``.
    - DEADLINE_EXCEEDED because the caller's own deadline ran out -> DEADLINE_EXCEEDED
      ``DEADLINE_TOO_SHORT``, logged at info: the caller gave up, nothing broke here.
    - DEADLINE_EXCEEDED of a shorter timeout the handler chose while the caller still has time
      -> UNAVAILABLE ``DOWNSTREAM_UNAVAILABLE`` with RetryInfo: the downstream was too slow.
    - CANCELLED -> CANCELLED ``DOWNSTREAM_UNAVAILABLE``.
    - anything else -> INTERNAL: a downstream's INVALID_ARGUMENT means this service sent a bad
      request, which is its own fault.

    Metadata ``downstream`` names the called service (or the channel's name) when the call
    went through :func:`~foredeck_kit.channels.open_channel`, else ``unknown``.
    """
    code = error.code()
    call = downstream_call(error)
    name = call.name if call is not None else "unknown"
    log_fields = {"downstream": name, "downstream_code": code.name}
    if code is grpc.StatusCode.UNAVAILABLE:
        details = error_details(error)
        mapped = ServiceError.downstream_unavailable(
            name, details.retry_after or _DOWNSTREAM_RETRY, upstream_reason=details.reason
        )
        return _Mapped(mapped, logging.WARNING, fields=log_fields)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        remaining = state.time_remaining() if state is not None else None
        caller_gone = (call is not None and call.inbound_deadline) or (
            remaining is not None and remaining <= 0
        )
        if caller_gone:
            mapped = ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                Reason.DEADLINE_TOO_SHORT,
                "deadline exceeded",
                metadata={"downstream": name},
            )
            return _Mapped(mapped, logging.INFO, fields=log_fields)
        mapped = ServiceError.downstream_unavailable(name, _DOWNSTREAM_RETRY)
        mapped.metadata["upstreamCode"] = code.name
        return _Mapped(mapped, logging.WARNING, fields=log_fields)
    if code is grpc.StatusCode.CANCELLED:
        mapped = ServiceError(
            grpc.StatusCode.CANCELLED,
            Reason.DOWNSTREAM_UNAVAILABLE,
            f"{name} call cancelled",
            metadata={"downstream": name, "upstreamCode": code.name},
        )
        return _Mapped(mapped, logging.INFO, fields=log_fields)
    return _Mapped(ServiceError.internal(), logging.ERROR, error, log_fields)


def _code_of(context: Context) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else _OK


# --- the wrapper --------------------------------------------------------------------------------


class _EncodingContext:
    """The servicer context a streaming handler sees: ``write`` encodes, ``read`` decodes.

    The handler is registered with bytes in and out, so messages written or read through the
    context need the method's own (de)serializers; everything else is the real context.
    """

    __slots__ = ("_context", "_decode", "_encode")

    def __init__(
        self,
        context: Context,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
    ) -> None:
        self._context = context
        self._encode = encode
        self._decode = decode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._context.write(self._encode(message))

    async def read(self) -> Any:
        raw = await self._context.read()
        if raw is _EOF:
            return raw
        return self._decode(raw)


class _Method:
    """One method's wrapped behaviour, with everything that is fixed per method bound once."""

    def __init__(
        self,
        wrapper: HandlerWrapper,
        full_method: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        infrastructure: bool,
    ) -> None:
        service, _, name = full_method.lstrip("/").partition("/")
        self.full_method = full_method
        self._domain = wrapper.domain
        self._quiet = infrastructure
        self._middleware = () if infrastructure else wrapper.middleware
        self._tracer = None if infrastructure else wrapper.tracer
        self._trace_keys = wrapper.trace_keys if self._tracer is not None else frozenset()
        self._verify: Callable[[str], Any] | None = None
        if (
            wrapper.verifier is not None
            and not infrastructure
            and full_method not in wrapper.public_methods
        ):
            self._verify = wrapper.verify_function(full_method)
        self._metrics: MethodMetrics | None = (
            wrapper.metrics.for_method(full_method) if wrapper.metrics is not None else None
        )
        self._span_name = f"{service}/{name}"
        self._span_attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        self._decode: Callable[[bytes], Any] = handler.request_deserializer or _identity
        self._encode: Callable[[Any], bytes] = handler.response_serializer or _identity

    # -- the four shapes --

    def handler(self, original: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """Return the wrapped handler, registered with bytes in and bytes out."""
        if original.request_streaming and original.response_streaming:
            behavior = original.stream_stream
            return grpc.stream_stream_rpc_method_handler(self._streaming(behavior, True))
        if original.request_streaming:
            behavior = original.stream_unary
            return grpc.stream_unary_rpc_method_handler(self._unary(behavior, True))
        if original.response_streaming:
            behavior = original.unary_stream
            return grpc.unary_stream_rpc_method_handler(self._streaming(behavior, False))
        return grpc.unary_unary_rpc_method_handler(self._unary(original.unary_unary, False))

    def _unary(self, behavior: Any, request_streaming: bool) -> Callable[..., Any]:
        async def unary_response(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            state, token, tokens, carrier = self._begin(context)
            rejection = self._admit(state, token, tokens) if self._verify is not None else None
            span = self._start_span(state, carrier) if self._tracer is not None else None
            code = _OK
            mapped: _Mapped | None = None
            try:
                if rejection is not None:
                    raise rejection
                if self._middleware:
                    async with contextlib.AsyncExitStack() as stack:
                        for middleware in self._middleware:
                            await stack.enter_async_context(middleware(state, context))
                        response = await self._respond(
                            behavior, request, context, request_streaming
                        )
                elif request_streaming:
                    response = await self._respond(behavior, request, context, True)
                else:
                    # The common case, inline: one coroutine less per call.
                    response = behavior(self._decode_request(request), context)
                    if inspect.isawaitable(response):
                        response = await response
                code = _code_of(context)
                if response is None and code is not _OK:
                    # The handler ended the call with set_code(): grpc sends no message.
                    return None
                return self._encode(response)
            except grpc.aio.AbortError:
                code = _code_of(context)
                raise
            except asyncio.CancelledError:
                code = self._cancelled_code(state)
                raise
            except Exception as exc:
                mapped = self._map(state, context, exc)
                code = mapped.error.code
                status = mapped.status
                assert status is not None
                await context.abort(status.code, status.details, status.trailing_metadata)
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._done(state, context, span, started, code, mapped)

        return unary_response

    def _streaming(self, behavior: Any, request_streaming: bool) -> Callable[..., Any]:
        async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            state, token, tokens, carrier = self._begin(context)
            rejection = self._admit(state, token, tokens) if self._verify is not None else None
            span = self._start_span(state, carrier) if self._tracer is not None else None
            code = _OK
            mapped: _Mapped | None = None
            try:
                if rejection is not None:
                    raise rejection
                async with contextlib.AsyncExitStack() as stack:
                    for middleware in self._middleware:
                        await stack.enter_async_context(middleware(state, context))
                    async for item in self._stream(behavior, request, context, request_streaming):
                        yield item
                code = _code_of(context)
            except grpc.aio.AbortError:
                code = _code_of(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = self._cancelled_code(state)
                raise
            except Exception as exc:
                mapped = self._map(state, context, exc)
                code = mapped.error.code
                status = mapped.status
                assert status is not None
                await context.abort(status.code, status.details, status.trailing_metadata)
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._done(state, context, span, started, code, mapped)

        return stream_response

    # -- steps --

    def _begin(self, context: Context) -> tuple[RpcState, str | None, int, dict[str, str] | None]:
        """Scan the metadata once and make the RPC's state current."""
        token: str | None = None
        tokens = 0
        request_id: str | None = None
        carrier: dict[str, str] | None = None
        trace_keys = self._trace_keys
        metadata: Any = context.invocation_metadata() or ()
        for key, value in metadata:
            if key == PRINCIPAL_METADATA_KEY:
                tokens += 1
                token = value
            elif key == REQUEST_ID_METADATA_KEY:
                if request_id is None:
                    request_id = value[:_MAX_REQUEST_ID_CHARS]
            elif key in trace_keys:
                if carrier is None:
                    carrier = {}
                carrier[key] = value
        remaining = context.time_remaining()
        try:
            peer = context.peer()
        except Exception:
            peer = "unknown"
        state = RpcState(
            method=self.full_method,
            request_id=request_id,
            deadline=time.monotonic() + remaining if remaining is not None else None,
            peer=peer,
        )
        # Each RPC runs in its own task with its own copy of the context, dropped when the RPC
        # ends, so values set here need no reset (a reset would fail when a stream is closed
        # from another context).
        _rpc_var.set(state)
        return state, token, tokens, carrier

    def _admit(self, state: RpcState, token: str | None, tokens: int) -> ServiceError | None:
        """Verify the principal and make it current; return why the call is refused, if it is."""
        if tokens == 0 or token is None:
            return ServiceError.principal_missing()
        if tokens > 1:
            # Two tokens would let a proxy and a caller disagree about who is calling.
            return ServiceError.principal_invalid()
        assert self._verify is not None
        try:
            principal = self._verify(token)
        except ServiceError as error:
            return error
        except Exception as exc:
            # Whatever breaks inside verification, the token was not accepted.
            state.error = exc
            refused = ServiceError.principal_invalid()
            refused.__cause__ = exc
            return refused
        _principal_var.set(principal)
        state.principal = principal
        state.principal_token = token
        return None

    def _start_span(self, state: RpcState, carrier: dict[str, str] | None) -> trace.Span | None:
        """Start the RPC's server span, continuing the caller's trace, and make it current.

        A propagator or tracer that fails costs the RPC its span, never its answer.
        """
        try:
            return self._traced(state, carrier)
        except Exception:
            return None

    def _traced(self, state: RpcState, carrier: dict[str, str] | None) -> trace.Span:
        assert self._tracer is not None
        parent = (
            propagate.extract(carrier, getter=_GETTER) if carrier is not None else _EMPTY_CONTEXT
        )
        attributes = self._span_attributes
        principal = state.principal
        if principal is not None:
            # All attributes at once: setting them one by one takes the span's lock each time.
            attributes = {
                **attributes,
                "foredeck.tenant_id": principal.tenant_id,
                "enduser.id": principal.user_id,
            }
        span = self._tracer.start_span(
            self._span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        otel_context.attach(trace.set_span_in_context(span, parent))
        return span

    def _decode_request(self, raw: Any) -> Any:
        try:
            return self._decode(raw)
        except Exception as exc:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                Reason.INVALID_REQUEST,
                "request message could not be parsed",
                metadata={"method": self.full_method},
            ) from exc

    async def _decoded(self, raw_requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for raw in raw_requests:
            yield self._decode_request(raw)

    async def _respond(
        self, behavior: Any, request: Any, context: Context, request_streaming: bool
    ) -> Any:
        if request_streaming:
            result = behavior(
                self._decoded(request), _EncodingContext(context, self._encode, self._decode)
            )
        else:
            result = behavior(self._decode_request(request), context)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _stream(
        self, behavior: Any, request: Any, context: Context, request_streaming: bool
    ) -> AsyncIterator[bytes]:
        """Run a response-streaming handler, whatever style it is written in; encode each
        message it yields."""
        incoming = self._decoded(request) if request_streaming else self._decode_request(request)
        result = behavior(incoming, _EncodingContext(context, self._encode, self._decode))
        encode = self._encode
        if hasattr(result, "__aiter__"):
            try:
                async for item in result:
                    yield encode(item)
            finally:
                close = getattr(result, "aclose", None)
                if close is not None:
                    await close()
        elif inspect.isawaitable(result):
            # Written with ``await context.write(...)``: the messages are already sent.
            await result
        elif result is not None:
            for item in result:
                yield encode(item)

    def _map(self, state: RpcState, context: Context, exc: Exception) -> _Mapped:
        if isinstance(exc, grpc.aio.AioRpcError):
            mapped = _map_downstream(exc, state)
        elif isinstance(exc, ServiceError):
            # A server fault raised from another exception is logged with its traceback.
            caused = exc.code in _SERVER_FAULTS and exc.__cause__ is not None
            mapped = _Mapped(exc, logging.INFO, exc if caused else None)
        elif isinstance(exc, NotImplementedError) and (
            _code_of(context) is grpc.StatusCode.UNIMPLEMENTED
        ):
            # What a generated servicer base class does for a method the service lacks.
            mapped = _Mapped(
                ServiceError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    Reason.INVALID_REQUEST,
                    "method not implemented",
                    metadata={"method": self.full_method},
                ),
                logging.INFO,
            )
        else:
            mapped = _Mapped(ServiceError.internal(), logging.ERROR, exc)
        mapped.status, mapped.error, failure = _wire_status(mapped.error, self._domain)
        if failure is not None:
            mapped.log_exception = failure
        state.reason = mapped.error.reason
        if mapped.log_exception is not None and state.error is None:
            state.error = mapped.log_exception
        return mapped

    @staticmethod
    def _cancelled_code(state: RpcState) -> grpc.StatusCode:
        remaining = state.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def _done(
        self,
        state: RpcState,
        context: Context,
        span: trace.Span | None,
        started: float,
        code: grpc.StatusCode,
        mapped: _Mapped | None,
    ) -> None:
        """Record the RPC's outcome; the log line, metrics and span end follow a moment later.

        They run as the event loop's next callback, once grpc has the response and is sending
        it, so the caller does not wait for the bookkeeping. Duration and end time are taken
        now.
        """
        elapsed = time.perf_counter() - started
        end_time = time.time_ns()
        state.code = code
        arguments = (state, state.peer, span, elapsed, end_time, code, mapped)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._finish_safely(*arguments)
        else:
            loop.call_soon(self._finish_safely, *arguments)

    def _finish_safely(
        self,
        state: RpcState,
        peer: str,
        span: trace.Span | None,
        elapsed: float,
        end_time: int,
        code: grpc.StatusCode,
        mapped: _Mapped | None,
    ) -> None:
        # An exception here must not reach the event loop's handler or change anything the
        # caller sees; the bookkeeping is not worth that, so a failure in it is dropped.
        try:  # noqa: SIM105 - a plain try costs nothing on the hot path; suppress() does
            self._finish(state, peer, span, elapsed, end_time, code, mapped)
        except Exception:
            pass

    def _finish(
        self,
        state: RpcState,
        peer: str,
        span: trace.Span | None,
        elapsed: float,
        end_time: int,
        code: grpc.StatusCode,
        mapped: _Mapped | None,
    ) -> None:
        if self._metrics is not None:
            self._metrics.observe(code.name, elapsed)
        error = state.error
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_SPAN_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code.name))
            if error is not None:
                span.record_exception(error)
            span.end(end_time=end_time)

        if self._quiet:
            level = logging.DEBUG
        elif code in _SERVER_FAULTS:
            level = logging.ERROR
        else:
            level = mapped.level if mapped is not None else logging.INFO
            if error is not None:
                level = max(level, logging.WARNING)
        if not level_enabled(level):
            return
        fields: dict[str, Any] = {
            "method": self.full_method,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "peer": peer,
        }
        if state.request_id is not None:
            fields["request_id"] = state.request_id
        if state.reason is not None:
            fields["reason"] = state.reason
        principal = state.principal
        if principal is not None:
            fields["tenant_id"] = principal.tenant_id
            fields["user_id"] = principal.user_id
            if principal.run_id:
                # A call the orchestrator makes for a run: its line names the run.
                fields["run_id"] = principal.run_id
        if mapped is not None and mapped.fields:
            fields.update(mapped.fields)
        if state.log_fields:
            for key, value in state.log_fields.items():
                fields.setdefault(key, value)
        if span is not None:
            span_context = span.get_span_context()
            if span_context.is_valid:
                fields["trace_id"] = format(span_context.trace_id, "032x")
                fields["span_id"] = format(span_context.span_id, "016x")
        emit(level, "foredeck.rpc", "rpc", fields, exc_info=error)


def _identity(value: Any) -> Any:
    return value


class _ServiceHandler(_ServiceRpcHandler):
    """A service's wrapped method handlers, looked up by full method name."""

    def __init__(self, name: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        self._name = name
        self._handlers = handlers

    def service_name(self) -> str:
        return self._name

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)


class _LazyGenericHandler(_GenericHandler):
    """Wraps the handlers of an arbitrary generic handler the first time each is looked up."""

    def __init__(self, inner: _GenericHandler, wrapper: HandlerWrapper) -> None:
        self._inner = inner
        self._wrapper = wrapper

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str | bytes = handler_call_details.method
        name = method.decode() if isinstance(method, bytes) else method
        return self._wrapper.wrap(name, handler)


class HandlerWrapper:
    """Wraps method handlers with the per-RPC work described in this module, once each.

    ``verifier=None`` turns principal verification off; only the gateway, which authenticates
    callers itself, runs that way. ``tracer_provider=None`` uses the global provider.
    """

    def __init__(
        self,
        *,
        domain: str,
        verifier: PrincipalVerifier | None,
        public_methods: Collection[str] = (),
        metrics: Metrics | None = None,
        tracer_provider: TracerProvider | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.domain = domain
        self.verifier = verifier
        self.public_methods = frozenset("/" + m.lstrip("/") for m in public_methods)
        self.metrics = metrics
        self.middleware = tuple(middleware)
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer: trace.Tracer | None = (
            None
            if isinstance(provider, trace.NoOpTracerProvider)
            else provider.get_tracer(_INSTRUMENTATION)
        )
        self.trace_keys = frozenset(propagate.get_global_textmap().fields)
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}

    def verify_function(self, full_method: str) -> Callable[[str], Any]:
        """The verifier's ``verify`` bound to one method, so gateway-only methods are enforced."""
        verifier = self.verifier
        assert verifier is not None

        def verify(token: str) -> Any:
            return verifier.verify(token, method=full_method)

        return verify

    def wrap(
        self,
        full_method: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        *,
        infrastructure: bool | None = None,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Return ``handler`` wrapped; the same wrapped object for the same handler."""
        known = self._wrapped.get(id(handler))
        if known is not None and known[0] is handler:
            wrapped: grpc.RpcMethodHandler[Any, Any] = known[1]
            return wrapped
        if infrastructure is None:
            infrastructure = full_method.lstrip("/").partition("/")[0] in INFRASTRUCTURE_SERVICES
        wrapped = _Method(self, full_method, handler, infrastructure).handler(handler)
        # Keeping the original referenced keeps its id from being reused.
        self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped

    def wrap_generic(self, handler: _GenericHandler) -> _GenericHandler:
        """Return ``handler`` with each of its method handlers wrapped.

        A generic handler made by ``grpc.method_handlers_generic_handler`` (what generated
        code uses) is wrapped method by method now; any other on each method's first call.
        """
        methods = getattr(handler, "_method_handlers", None)
        if isinstance(handler, grpc.ServiceRpcHandler) and isinstance(methods, dict):
            return _ServiceHandler(
                handler.service_name(),
                {name: self.wrap(name, method) for name, method in methods.items()},
            )
        return _LazyGenericHandler(handler, self)


class RegisteringServer(grpc.aio.Server):
    """What a service's ``register`` callback receives: a server that wraps what it is given.

    Handler registration is wrapped; everything else goes to the real ``grpc.aio`` server.
    """

    def __init__(self, server: grpc.aio.Server, wrapper: HandlerWrapper) -> None:
        self._server = server
        self._wrapper = wrapper

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[_GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            [self._wrapper.wrap_generic(handler) for handler in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Register pre-registered methods (grpc's faster lookup path), wrapped."""
        wrapped = {
            name: self._wrapper.wrap(f"/{service_name}/{name}", handler)
            for name, handler in method_handlers.items()
        }
        self._server.add_registered_method_handlers(service_name, wrapped)  # type: ignore[attr-defined]

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        return await self._server.wait_for_termination(timeout)
