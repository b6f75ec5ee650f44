"""The server interceptor chain every Foredeck service runs, outermost first.

1. OpenTelemetry (health and reflection excluded): one server span per RPC.
2. :class:`RequestContextInterceptor`: per-RPC state (request id, deadline), exactly one log
   line per RPC and the ``grpc_server_*`` Prometheus metrics.
3. :class:`PrincipalInterceptor`: verifies the signed principal and makes it current.
4. :class:`ErrorInterceptor`: :class:`ServiceError` -> rich status; anything else -> INTERNAL.

Each wraps the method handler's behaviour, so all four RPC shapes are covered and the
request deserializer and response serializer are preserved.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.trace import TracerProvider

from foredeck_kit.context import REQUEST_ID_METADATA_KEY, RpcState, current_rpc
from foredeck_kit.context import _rpc as _rpc_var
from foredeck_kit.errors import ServiceError, error_details, to_status
from foredeck_kit.logs import get_logger
from foredeck_kit.metrics import Metrics
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY, Principal, PrincipalVerifier
from foredeck_kit.principal import _current as _principal_var

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

__all__ = [
    "PUBLIC_SERVICES",
    "ErrorInterceptor",
    "PrincipalInterceptor",
    "RequestContextInterceptor",
    "abort_with_error",
    "server_interceptors",
]

PUBLIC_SERVICES: frozenset[str] = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
"""Services every caller may use without a principal: probes and tooling."""

_MAX_REQUEST_ID_CHARS = 128
_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behavior = Callable[[Any, Context], Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


def _service_of(full_method: str) -> str:
    return full_method.lstrip("/").partition("/")[0]


def _traced(details: grpc.HandlerCallDetails) -> bool:
    # A plain set lookup: the instrumentation's own filters cost tens of microseconds a call.
    method: str | bytes = details.method
    name = method.decode() if isinstance(method, bytes) else method
    return _service_of(name) not in PUBLIC_SERVICES


async def _call_unary(behavior: Behavior, request: Any, context: Context) -> Any:
    result = behavior(request, context)
    if inspect.isawaitable(result):
        return await result
    return result


async def _iterate(behavior: Behavior, request: Any, context: Context) -> AsyncIterator[Any]:
    """Yield what a response-streaming behaviour produces, whatever style it is written in."""
    result = behavior(request, context)
    if hasattr(result, "__aiter__"):
        try:
            async for item in result:
                yield item
        finally:
            close = getattr(result, "aclose", None)
            if close is not None:
                await close()
    elif inspect.isawaitable(result):
        # Written with ``await context.write(...)``: the messages are already sent.
        await result
    elif result is not None:
        for item in result:
            yield item


def _wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Callable[[Behavior], UnaryBehavior],
    stream: Callable[[Behavior], StreamBehavior],
) -> grpc.RpcMethodHandler[Any, Any]:
    behavior: Any
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    wrapped = stream(behavior) if handler.response_streaming else unary(behavior)
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _BehaviorInterceptor(_ServerInterceptor):
    """Base for interceptors that wrap the handler's behaviour rather than the lookup."""

    def _applies(self, method: str) -> bool:
        return True

    def _unary(self, behavior: Behavior, method: str) -> UnaryBehavior:
        raise NotImplementedError

    def _stream(self, behavior: Behavior, method: str) -> StreamBehavior:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._applies(method):
            return handler
        return _wrap_handler(
            handler,
            lambda b: self._unary(b, method),
            lambda b: self._stream(b, method),
        )


async def abort_with_error(context: Context, error: ServiceError, domain: str) -> NoReturn:
    """End the RPC with ``error`` as a rich status in ``domain``; never returns."""
    state = current_rpc()
    if state is not None:
        state.reason = error.reason
    status = to_status(error, domain)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _metadata_values(context: Context, key: str) -> list[str]:
    values: list[str] = []
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            values.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return values


def _final_code(context: Context, state: RpcState, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = state.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    # grpc reports an exception that escapes every interceptor as UNKNOWN.
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


class RequestContextInterceptor(_BehaviorInterceptor):
    """Records per-RPC state, writes exactly one log line per RPC and updates gRPC metrics.

    Calls to ``quiet_services`` (health and reflection by default) are logged at debug level,
    so probes do not flood the log.
    """

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        quiet_services: Collection[str] = PUBLIC_SERVICES,
    ) -> None:
        self._metrics = metrics
        self._quiet = frozenset(quiet_services)

    def _begin(self, method: str, context: Context) -> RpcState:
        remaining = context.time_remaining()
        request_ids = _metadata_values(context, REQUEST_ID_METADATA_KEY)
        state = RpcState(
            method=method,
            request_id=request_ids[0][:_MAX_REQUEST_ID_CHARS] if request_ids else None,
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )
        # Each RPC runs in its own task with its own context copy, which is dropped when the
        # RPC ends, so the value needs no reset (a reset would break when a stream is closed
        # from another context).
        _rpc_var.set(state)
        return state

    def _finish(
        self, state: RpcState, context: Context, started: float, exc: BaseException | None
    ) -> None:
        elapsed = time.perf_counter() - started
        code = _final_code(context, state, exc)
        state.code = code
        if self._metrics is not None:
            self._metrics.observe_rpc(state.method, code.name, elapsed)
        fields: dict[str, Any] = {
            "method": state.method,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "peer": context.peer(),
        }
        if state.request_id is not None:
            fields["request_id"] = state.request_id
        if state.reason is not None:
            fields["reason"] = state.reason
        if state.principal is not None:
            fields["tenant_id"] = state.principal.tenant_id
            fields["user_id"] = state.principal.user_id
        if state.error is not None:
            fields["exc_info"] = state.error
        logger = get_logger("foredeck.rpc")
        if _service_of(state.method) in self._quiet:
            logger.debug("rpc", **fields)
        elif code in _SERVER_FAULTS:
            logger.error("rpc", **fields)
        else:
            logger.info("rpc", **fields)

    def _unary(self, behavior: Behavior, method: str) -> UnaryBehavior:
        async def handle(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            state = self._begin(method, context)
            failure: BaseException | None = None
            try:
                return await _call_unary(behavior, request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._finish(state, context, started, failure)

        return handle

    def _stream(self, behavior: Behavior, method: str) -> StreamBehavior:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            state = self._begin(method, context)
            failure: BaseException | None = None
            try:
                async for item in _iterate(behavior, request, context):
                    yield item
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._finish(state, context, started, failure)

        return handle


class PrincipalInterceptor(_BehaviorInterceptor):
    """Verifies the ``x-foredeck-principal`` token and makes the principal current.

    Health, reflection and ``public_methods`` (full names, ``/package.Service/Method``) skip
    the check; any other call without a valid principal ends UNAUTHENTICATED here.
    """

    def __init__(
        self,
        verifier: PrincipalVerifier,
        *,
        domain: str,
        public_methods: Collection[str] = (),
    ) -> None:
        self._verifier = verifier
        self._domain = domain
        self._public = frozenset("/" + m.lstrip("/") for m in public_methods)

    def _applies(self, method: str) -> bool:
        return method not in self._public and _service_of(method) not in PUBLIC_SERVICES

    def _authenticate(self, context: Context) -> tuple[Principal, str]:
        tokens = _metadata_values(context, PRINCIPAL_METADATA_KEY)
        if not tokens:
            raise ServiceError.principal_missing()
        if len(tokens) > 1:
            # Two tokens would let a proxy and a caller disagree about who is calling.
            raise ServiceError.principal_invalid("more than one principal sent")
        return self._verifier.verify(tokens[0]), tokens[0]

    async def _admit(self, context: Context) -> None:
        try:
            principal, token = self._authenticate(context)
        except ServiceError as error:
            await abort_with_error(context, error, self._domain)
        _principal_var.set(principal)
        state = current_rpc()
        if state is not None:
            state.principal = principal
            state.principal_token = token
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("foredeck.tenant_id", principal.tenant_id)
            span.set_attribute("enduser.id", principal.user_id)

    def _unary(self, behavior: Behavior, method: str) -> UnaryBehavior:
        async def handle(request: Any, context: Context) -> Any:
            await self._admit(context)
            return await _call_unary(behavior, request, context)

        return handle

    def _stream(self, behavior: Behavior, method: str) -> StreamBehavior:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            await self._admit(context)
            async for item in _iterate(behavior, request, context):
                yield item

        return handle


def _from_downstream(error: grpc.aio.AioRpcError) -> Exception:
    """Map a downstream error the handler let through; never forward it as it came.

    An unavailable downstream is this service's DOWNSTREAM_UNAVAILABLE (with RetryInfo, the
    downstream's reason kept as ``upstreamReason``); any other downstream failure means this
    service called it wrongly or it broke, so it stays an internal error.
    """
    if error.code() is grpc.StatusCode.UNAVAILABLE:
        details = error_details(error)
        mapped = ServiceError.downstream_unavailable(
            "downstream",
            details.retry_after or timedelta(seconds=1),
            upstream_reason=details.reason,
        )
        mapped.__cause__ = error
        return mapped
    return error


class ErrorInterceptor(_BehaviorInterceptor):
    """Innermost: turns :class:`ServiceError` into a rich status and hides everything else.

    An unexpected exception ends the RPC as INTERNAL "internal error"; its traceback goes to
    the RPC's log line only. Aborts made by the handler and cancellations pass through.
    """

    def __init__(self, *, domain: str) -> None:
        self._domain = domain

    async def _fail(self, context: Context, exc: Exception) -> NoReturn:
        state = current_rpc()
        if isinstance(exc, grpc.aio.AioRpcError):
            exc = _from_downstream(exc)
        if isinstance(exc, ServiceError):
            if state is not None and exc.code in _SERVER_FAULTS | {grpc.StatusCode.UNAVAILABLE}:
                state.error = exc if exc.__cause__ is not None else None
            await abort_with_error(context, exc, self._domain)
        if state is not None:
            state.error = exc
        else:
            get_logger("foredeck.rpc").error("unexpected error", exc_info=exc)
        await abort_with_error(context, ServiceError.internal(), self._domain)

    def _unary(self, behavior: Behavior, method: str) -> UnaryBehavior:
        async def handle(request: Any, context: Context) -> Any:
            try:
                return await _call_unary(behavior, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc)

        return handle

    def _stream(self, behavior: Behavior, method: str) -> StreamBehavior:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in _iterate(behavior, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc)

        return handle


def server_interceptors(
    *,
    domain: str,
    verifier: PrincipalVerifier | None,
    public_methods: Collection[str] = (),
    metrics: Metrics | None = None,
    tracer_provider: TracerProvider | None = None,
    extra: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """Return the standard chain, outermost first, with ``extra`` placed before error mapping.

    ``verifier=None`` turns principal verification off; only the gateway, which authenticates
    callers itself, runs that way.
    """
    # The instrumentation package ships without annotations for this factory.
    telemetry: grpc.aio.ServerInterceptor[Any, Any] = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider, filter_=_traced
    )
    chain: list[grpc.aio.ServerInterceptor[Any, Any]] = [
        telemetry,
        RequestContextInterceptor(metrics),
    ]
    if verifier is not None:
        chain.append(PrincipalInterceptor(verifier, domain=domain, public_methods=public_methods))
    chain.extend(extra)
    chain.append(ErrorInterceptor(domain=domain))
    return chain
