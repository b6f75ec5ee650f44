"""The kit starts its own server spans (cheaper than the OpenTelemetry gRPC interceptor), so
they must carry what that instrumentation records: a dashboard or trace query written for
one works for the other."""

from __future__ import annotations

import io
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from foredeck_kit.errors import ServiceError
from foredeck_kit.logs import reset_logging
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_testing.echo import SERVICE_NAME, Message, register, unary, unary_call
from foredeck_testing.server import running_server

RPC_KEYS = ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code")


async def _echo(request: Message, context: Any) -> Message:
    return Message(value=request.value)


async def _missing(request: Message, context: Any) -> Message:
    raise ServiceError(grpc.StatusCode.NOT_FOUND, "THING_NOT_FOUND", "no such thing")


async def _missing_bare(request: Message, context: Any) -> Message:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returns only by raising")


HANDLERS = {"Echo": unary(_echo), "Missing": unary(_missing)}
BARE_HANDLERS = {"Echo": unary(_echo), "Missing": unary(_missing_bare)}


async def _call(channel: grpc.aio.Channel, method: str, metadata: Any = ()) -> None:
    call = unary_call(channel, method)(Message(value="x"), metadata=metadata, timeout=10)
    if method == "Missing":
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    else:
        await call


async def _upstream_spans() -> dict[str, ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    interceptor = aio_server_interceptor(tracer_provider=provider)  # type: ignore[no-untyped-call]
    server = grpc.aio.server(interceptors=[interceptor])
    register(BARE_HANDLERS)(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in HANDLERS:
                await _call(channel, method)
    finally:
        await server.stop(None)
    return {
        str(span.attributes["rpc.method"]): span
        for span in exporter.get_finished_spans()
        if span.attributes
    }


async def _kit_spans() -> dict[str, ReadableSpan]:
    exporter = InMemorySpanExporter()
    settings = ServiceSettings(metrics_port=-1, trace_sample_ratio=1.0)
    telemetry = setup_telemetry(
        "kittest",
        settings,
        environ={},
        span_exporter=exporter,
        set_global=False,
        log_stream=io.StringIO(),
    )
    try:
        async with running_server(
            register(HANDLERS),
            service_names=[SERVICE_NAME],
            domain="kittest.foredeck.dev",
            settings=settings,
            telemetry=telemetry,
        ) as srv:
            for method in HANDLERS:
                await _call(srv.channel, method, srv.mint())
    finally:
        telemetry.shutdown()
        reset_logging()
    return {
        str(span.attributes["rpc.method"]): span
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.SERVER and span.attributes
    }


@pytest.mark.parametrize("method", list(HANDLERS))
async def test_kit_server_spans_match_the_grpc_instrumentation(method: str) -> None:
    upstream = (await _upstream_spans())[method]
    kit = (await _kit_spans())[method]
    assert kit.kind is upstream.kind is SpanKind.SERVER
    assert upstream.attributes is not None
    assert kit.attributes is not None
    for key in RPC_KEYS:
        assert kit.attributes.get(key) == upstream.attributes.get(key), key
    # The semantic conventions name a gRPC span `package.Service/Method`; the instrumentation
    # keeps grpc's leading slash.
    assert upstream.name.lstrip("/") == kit.name
    assert kit.status.status_code is upstream.status.status_code
