"""A span per call that roots the run's trace, decisions counted, one JSON line per call."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.testing import bearer, running_gateway
from foredeck_kit.logs import flush_logging, reset_logging
from foredeck_kit.telemetry import setup_telemetry


async def test_spans_metrics_and_log_lines(redis_url: str) -> None:
    spans = InMemorySpanExporter()
    logs = io.StringIO()
    telemetry = setup_telemetry(
        "gateway",
        GatewaySettings(trace_sample_ratio=1.0, metrics_port=-1),
        environ={},
        span_exporter=spans,
        set_global=False,
        log_stream=logs,
    )
    try:
        async with running_gateway(
            redis_url, telemetry=telemetry, default_key_requests_per_minute=3
        ) as gateway:
            secret, key = await gateway.new_key()
            created = await gateway.api.CreateRun(
                gw.CreateRunRequest(input="task", request_id="obs-1"),
                metadata=bearer(secret),
                timeout=5,
            )
            run_id = created.run.run_id
            await gateway.api.GetRun(gw.GetRunRequest(run_id=run_id), metadata=bearer(secret))
            await gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=bearer(secret))
            with pytest.raises(grpc.aio.AioRpcError):
                await gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=bearer(secret))
            registry = telemetry.metrics.registry

            def decisions(outcome: str) -> float | None:
                return registry.get_sample_value(
                    "gateway_admission_decisions_total", {"outcome": outcome}
                )

            assert decisions("admitted") == 4  # the admin's CreateApiKey and three calls
            assert decisions("rate_limited") == 1
    finally:
        telemetry.shutdown()
        flush_logging()
        reset_logging()

    finished = spans.get_finished_spans()
    server = next(s for s in finished if s.name == "foredeck.gateway.v1.GatewayService/CreateRun")
    client = next(s for s in finished if s.name == "foredeck.orchestrator.v1.RunService/SubmitRun")
    assert server.parent is None  # the call roots the run's trace
    assert client.context.trace_id == server.context.trace_id
    assert client.parent is not None
    assert client.parent.span_id == server.context.span_id
    assert server.attributes is not None
    assert server.attributes["foredeck.api_key_id"] == key.api_key_id

    lines = [json.loads(line) for line in logs.getvalue().splitlines() if line.startswith("{")]
    rpc_lines = [line for line in lines if line.get("event") == "rpc"]
    gateway_service = "/foredeck.gateway.v1.GatewayService"
    create = [line for line in rpc_lines if line["method"] == f"{gateway_service}/CreateRun"]
    assert len(create) == 1
    assert create[0]["tenant_id"] == "acme"
    assert create[0]["api_key_id"] == key.api_key_id
    assert create[0]["run_id"] == run_id
    get = next(line for line in rpc_lines if line["method"] == f"{gateway_service}/GetRun")
    assert get["run_id"] == run_id
    limited = next(line for line in rpc_lines if line.get("reason") == "RATE_LIMITED")
    assert limited["method"].endswith("/WhoAmI")
    assert secret not in logs.getvalue()
