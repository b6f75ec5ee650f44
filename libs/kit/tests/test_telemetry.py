"""Telemetry: one JSON log line per RPC, gRPC metrics, spans, and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from foredeck_kit.channels import open_channel
from foredeck_kit.logs import configure_logging, get_logger, reset_logging
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import _exporters, setup_telemetry
from foredeck_testing.echo import SERVICE_NAME, Message, register, unary, unary_call
from foredeck_testing.server import fresh_keys, running_server

DOMAIN = "kittest.foredeck.dev"
ARTICLE_METRICS = {
    "agent_execution_seconds": "histogram",
    "agent_tool_calls_total": "counter",
    "agent_llm_tokens_total": "counter",
    "agent_errors_total": "counter",
    "agent_concurrent_executions": "gauge",
    "grpc_server_handled_total": "counter",
    "grpc_server_handling_seconds": "histogram",
}


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    reset_logging()


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_prometheus_endpoint_serves_the_article_metrics(log_stream: io.StringIO) -> None:
    telemetry = setup_telemetry(
        "kittest",
        ServiceSettings(metrics_port=0),
        environ={},
        set_global=False,
        log_stream=log_stream,
    )
    try:
        assert telemetry.metrics_port
        telemetry.metrics.agent_tool_calls_total.labels("calculator", "true").inc()
        url = f"http://127.0.0.1:{telemetry.metrics_port}/metrics"
        body = await asyncio.to_thread(_fetch, url)
    finally:
        telemetry.shutdown()
    for name, kind in ARTICLE_METRICS.items():
        assert f"# TYPE {name} {kind}" in body, name
    assert 'agent_tool_calls_total{success="true",tool_name="calculator"} 1.0' in body
    assert "process_cpu_seconds_total" in body
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_fetch, url)


async def test_one_json_log_line_per_rpc_with_metrics_and_spans(log_stream: io.StringIO) -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "kittest",
        ServiceSettings(metrics_port=-1, trace_sample_ratio=1.0),
        environ={},
        span_exporter=spans,
        set_global=False,
        log_stream=log_stream,
    )

    async def echo(request: Message, context: Any) -> Message:
        return Message(value=request.value)

    async def crash(request: Message, context: Any) -> Message:
        raise RuntimeError("disk on fire")

    try:
        async with running_server(
            register({"Echo": unary(echo), "Crash": unary(crash)}),
            service_names=[SERVICE_NAME],
            domain=DOMAIN,
            telemetry=telemetry,
        ) as srv:
            metadata = srv.mint("tenant-5", "user-5", request_id="req-1")
            await unary_call(srv.channel, "Echo")(Message(value="hi"), metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError):
                await unary_call(srv.channel, "Crash")(Message(), metadata=metadata)
            await health_pb2_grpc.HealthStub(srv.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
    finally:
        telemetry.shutdown()

    rpc_lines = [r for r in _records(log_stream) if r.get("event") == "rpc"]
    echo_lines = [r for r in rpc_lines if r["method"] == f"/{SERVICE_NAME}/Echo"]
    assert len(echo_lines) == 1
    line = echo_lines[0]
    assert line["code"] == "OK"
    assert line["level"] == "info"
    assert line["service"] == "kittest"
    assert line["request_id"] == "req-1"
    assert (line["tenant_id"], line["user_id"]) == ("tenant-5", "user-5")
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert isinstance(line["duration_ms"], float)
    assert "timestamp" in line

    (crash_line,) = [r for r in rpc_lines if r["method"] == f"/{SERVICE_NAME}/Crash"]
    assert (crash_line["code"], crash_line["level"]) == ("INTERNAL", "error")
    assert "RuntimeError: disk on fire" in crash_line["exception"]
    assert crash_line["trace_id"]
    # Probes are logged at debug level only, so they do not flood an info-level log.
    assert not [r for r in rpc_lines if r["method"].startswith("/grpc.health")]

    finished = spans.get_finished_spans()
    echo_spans = [s for s in finished if s.name == f"/{SERVICE_NAME}/Echo"]
    assert len(echo_spans) == 1
    assert line["trace_id"] == format(echo_spans[0].context.trace_id, "032x")
    assert not [s for s in finished if "grpc.health" in s.name]

    registry = telemetry.metrics.registry
    labels = {"grpc_service": SERVICE_NAME, "grpc_method": "Echo"}
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    )
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 1
    crash_labels = {"grpc_service": SERVICE_NAME, "grpc_method": "Crash", "grpc_code": "INTERNAL"}
    assert registry.get_sample_value("grpc_server_handled_total", crash_labels) == 1


async def test_log_line_codes_for_rejections_and_deadlines(log_stream: io.StringIO) -> None:
    configure_logging("kittest", stream=log_stream)

    async def hang(request: Message, context: Any) -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with running_server(
        register({"Hang": unary(hang)}), service_names=[SERVICE_NAME], domain=DOMAIN
    ) as srv:
        hang_call = unary_call(srv.channel, "Hang")
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await hang_call(Message(), timeout=5)
        assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await hang_call(Message(), metadata=srv.mint(), timeout=0.2)
        assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

        deadline = asyncio.get_running_loop().time() + 10
        while len([r for r in _records(log_stream) if r.get("event") == "rpc"]) < 2:
            assert asyncio.get_running_loop().time() < deadline, log_stream.getvalue()
            await asyncio.sleep(0.01)

    first, second = [r for r in _records(log_stream) if r.get("event") == "rpc"]
    assert (first["code"], first["reason"]) == ("UNAUTHENTICATED", "PRINCIPAL_MISSING")
    assert "tenant_id" not in first
    assert second["code"] == "DEADLINE_EXCEEDED"
    assert second["tenant_id"] == "tenant-a"


async def test_trace_spans_services(log_stream: io.StringIO) -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "kittest",
        ServiceSettings(metrics_port=-1, trace_sample_ratio=1.0),
        environ={},
        span_exporter=spans,
        set_global=False,
        log_stream=log_stream,
    )
    keys = fresh_keys()

    async def leaf(request: Message, context: Any) -> Message:
        return Message(value="leaf")

    try:
        async with running_server(
            register({"Leaf": unary(leaf)}),
            service_names=[SERVICE_NAME],
            domain=DOMAIN,
            keys=keys,
            telemetry=telemetry,
        ) as downstream:
            channel = open_channel(downstream.address, tracer_provider=telemetry.tracer_provider)

            async def root(request: Message, context: Any) -> Message:
                return await unary_call(channel, "Leaf")(request)  # type: ignore[no-any-return]

            async with running_server(
                register({"Root": unary(root)}),
                service_names=[SERVICE_NAME],
                domain=DOMAIN,
                keys=keys,
                telemetry=telemetry,
            ) as upstream:
                await unary_call(upstream.channel, "Root")(Message(), metadata=upstream.mint())
            await channel.close(None)
    finally:
        telemetry.shutdown()

    by_name = {s.name: s for s in spans.get_finished_spans()}
    server_root = by_name[f"/{SERVICE_NAME}/Root"]
    server_leaf = next(
        s
        for s in spans.get_finished_spans()
        if s.name == f"/{SERVICE_NAME}/Leaf" and s.kind is trace.SpanKind.SERVER
    )
    assert server_leaf.context.trace_id == server_root.context.trace_id
    assert server_leaf.parent is not None
    client_leaf = next(
        s for s in spans.get_finished_spans() if s.context.span_id == server_leaf.parent.span_id
    )
    assert client_leaf.kind is trace.SpanKind.CLIENT
    assert client_leaf.parent is not None
    assert client_leaf.parent.span_id == server_root.context.span_id


def test_otel_environment_is_honoured() -> None:
    disabled = setup_telemetry(
        "kittest",
        ServiceSettings(metrics_port=-1),
        environ={"OTEL_SDK_DISABLED": "true"},
        set_global=False,
        configure_logs=False,
    )
    assert isinstance(disabled.tracer_provider, trace.NoOpTracerProvider)
    disabled.shutdown()

    assert _exporters({}) == []
    assert _exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    (console,) = _exporters({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(console, ConsoleSpanExporter)
    (otlp,) = _exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert isinstance(otlp, OTLPSpanExporter)
    otlp.shutdown()
    with pytest.raises(ValueError, match="zipkin"):
        _exporters({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_stdlib_logs_share_the_json_shape(log_stream: io.StringIO) -> None:
    configure_logging("kittest", level="info", stream=log_stream)
    logging.getLogger("some.library").warning("library says %s", "hello")
    get_logger("foredeck.test").debug("hidden at info")
    tracer = trace.NoOpTracerProvider().get_tracer("t")
    with tracer.start_as_current_span("noop"):
        get_logger("foredeck.test").info("visible", answer=42)
    records = _records(log_stream)
    assert [r["event"] for r in records] == ["library says hello", "visible"]
    library, own = records
    assert (library["logger"], library["level"], library["service"]) == (
        "some.library",
        "warning",
        "kittest",
    )
    assert (own["logger"], own["answer"]) == ("foredeck.test", 42)
    assert "trace_id" not in own


def test_console_format(log_stream: io.StringIO) -> None:
    configure_logging("kittest", fmt="console", stream=log_stream)
    get_logger("foredeck.test").info("readable", key="value")
    assert "readable" in log_stream.getvalue()
    assert "key=value" in log_stream.getvalue()
    with pytest.raises(ValueError, match="log level"):
        configure_logging("kittest", level="loud")
