"""Process-wide telemetry: traces (OpenTelemetry), metrics (Prometheus) and JSON logs.

``main()`` calls :func:`setup_telemetry` once, before the event loop starts, and calls
:meth:`Telemetry.shutdown` on the way out so buffered spans are flushed. The standard
``OTEL_*`` variables are honoured: ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER``
(``otlp``, ``console``, ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` and friends,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` (with
``OTEL_TRACES_SAMPLER_ARG``), ``OTEL_PROPAGATORS`` and the ``OTEL_BSP_*`` batch settings.
Without ``OTEL_TRACES_SAMPLER`` traces are sampled parent-based at the settings'
``trace_sample_ratio``: a call follows its caller's decision, and a new trace is recorded with
that probability, so a busy service does not export every span.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TextIO
from wsgiref.simple_server import WSGIServer

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import start_http_server

from foredeck_kit.logs import configure_logging, get_logger
from foredeck_kit.metrics import Metrics
from foredeck_kit.settings import ServiceSettings

__all__ = ["Telemetry", "setup_telemetry", "start_metrics_server"]

_TRUE = {"true", "1", "yes", "on"}


@dataclass
class Telemetry:
    """What :func:`setup_telemetry` set up; pass it to the server builder and shut it down last."""

    service_name: str
    metrics: Metrics
    tracer_provider: trace.TracerProvider
    metrics_port: int | None = None
    """Port of the Prometheus endpoint, None when it is disabled."""
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def shutdown(self) -> None:
        """Flush and stop exporters and the metrics endpoint; safe to call more than once."""
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:
                get_logger("foredeck.telemetry").exception("telemetry shutdown step failed")


def start_metrics_server(metrics: Metrics, host: str, port: int) -> tuple[int, Callable[[], None]]:
    """Serve ``metrics`` over HTTP on ``host:port`` (0 = free port); return the port and a stop."""
    server: WSGIServer
    thread: threading.Thread
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return int(server.server_port), stop


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    configured = env.get("OTEL_TRACES_EXPORTER")
    if configured is None:
        # Exporting to the spec's default localhost:4317 when nothing listens there only
        # produces error logs, so OTLP is on by default only once an endpoint is configured.
        has_endpoint = bool(
            env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
        configured = "otlp" if has_endpoint else "none"
    exporters: list[SpanExporter] = []
    for name in (part.strip().lower() for part in configured.split(",")):
        if name in ("", "none"):
            continue
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER {name!r} is not supported (otlp, console, none)"
            )
    return exporters


def _sampler(env: Mapping[str, str], ratio: float) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` names, else parent-based at ``ratio``."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return ParentBased(TraceIdRatioBased(ratio))
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        env_ratio = float(arg) if arg else 1.0
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG {arg!r} is not a number") from None
    if not 0.0 <= env_ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG {arg!r} is not between 0 and 1")
    samplers: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(env_ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(env_ratio)),
    }
    if name not in samplers:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER {name!r} is not supported ({', '.join(sorted(samplers))})"
        )
    return samplers[name]()


def setup_telemetry(
    service_name: str,
    settings: ServiceSettings,
    *,
    environ: Mapping[str, str] | None = None,
    span_exporter: SpanExporter | None = None,
    set_global: bool = True,
    configure_logs: bool = True,
    log_stream: TextIO | None = None,
) -> Telemetry:
    """Set up tracing, metrics and logging for a service process.

    ``span_exporter`` adds an exporter with synchronous export (tests use an in-memory one).
    ``set_global=False`` leaves the global tracer provider and propagator alone, for tests
    that build several services in one process.
    """
    env = os.environ if environ is None else environ
    if configure_logs:
        configure_logging(
            service_name, level=settings.log_level, fmt=settings.log_format, stream=log_stream
        )
    telemetry = Telemetry(
        service_name=service_name,
        metrics=Metrics(process_collectors=True),
        tracer_provider=trace.NoOpTracerProvider(),
    )

    if env.get("OTEL_SDK_DISABLED", "").strip().lower() not in _TRUE:
        resource_name = env.get("OTEL_SERVICE_NAME") or service_name
        provider = SdkTracerProvider(
            resource=Resource.create({SERVICE_NAME: resource_name}),
            sampler=_sampler(env, settings.trace_sample_ratio),
        )
        for exporter in _exporters(env):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        if span_exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        telemetry.tracer_provider = provider
        telemetry._closers.append(provider.shutdown)
    if set_global:
        trace.set_tracer_provider(telemetry.tracer_provider)
        if "OTEL_PROPAGATORS" not in env:
            propagate.set_global_textmap(
                CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
            )

    if settings.metrics_port >= 0:
        try:
            port, stop = start_metrics_server(
                telemetry.metrics, settings.metrics_host, settings.metrics_port
            )
        except BaseException:
            telemetry.shutdown()
            raise
        telemetry.metrics_port = port
        telemetry._closers.append(stop)
    return telemetry
