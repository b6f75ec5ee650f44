"""Prometheus metrics every Foredeck service exposes, created on demand in one registry.

Nothing is registered at import: a process builds one :class:`Metrics` (normally through
:func:`foredeck_kit.telemetry.setup_telemetry`) and hands it to whatever records values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from foredeck_kit.logs import dropped_log_lines

__all__ = ["GRPC_LATENCY_BUCKETS", "MethodMetrics", "Metrics"]

GRPC_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""gRPC handling buckets: sub-millisecond echo calls up to minute-long streams."""

_EXECUTION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _DroppedLogLines(Collector):
    """Exports the process's count of log lines dropped because the log stream stalled."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "foredeck_log_lines_dropped",
            "Log lines dropped because the log stream did not keep up with the service.",
            value=dropped_log_lines(),
        )


class MethodMetrics:
    """The gRPC server metrics of one method, with label values bound once.

    Binding labels costs a lock and a dict lookup; doing it at registration instead of on
    every call keeps the per-RPC cost to the increments themselves.
    """

    __slots__ = ("_handled", "_handled_by_code", "_handling", "_method", "_service")

    def __init__(self, metrics: Metrics, full_method: str) -> None:
        self._service, _, self._method = full_method.lstrip("/").partition("/")
        self._handled = metrics.grpc_server_handled_total
        self._handling = metrics.grpc_server_handling_seconds.labels(self._service, self._method)
        self._handled_by_code: dict[str, Any] = {}

    def observe(self, code: str, seconds: float) -> None:
        """Record one completed RPC that ended with status ``code`` (e.g. ``"OK"``)."""
        counter = self._handled_by_code.get(code)
        if counter is None:
            counter = self._handled.labels(self._service, self._method, code)
            self._handled_by_code[code] = counter
        counter.inc()
        self._handling.observe(seconds)


class Metrics:
    """The platform's metrics: the agent metrics every dashboard shows plus gRPC server metrics.

    Pass ``process_collectors=True`` to add process, platform and GC metrics to the registry,
    as the default registry would have them.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        process_collectors: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.registry.register(_DroppedLogLines())
        self.agent_execution_seconds = Histogram(
            "agent_execution_seconds",
            "Wall time of one agent task, from start to final answer.",
            ["task_type", "model"],
            buckets=_EXECUTION_BUCKETS,
            registry=self.registry,
        )
        self.agent_tool_calls_total = Counter(
            "agent_tool_calls_total",
            "Tool calls executed for agents, by tool and outcome.",
            ["tool_name", "success"],
            registry=self.registry,
        )
        self.agent_llm_tokens_total = Counter(
            "agent_llm_tokens_total",
            "LLM tokens consumed, by model and direction (input or output).",
            ["model", "direction"],
            registry=self.registry,
        )
        self.agent_errors_total = Counter(
            "agent_errors_total",
            "Errors seen while running agents, by error type.",
            ["error_type"],
            registry=self.registry,
        )
        self.agent_concurrent_executions = Gauge(
            "agent_concurrent_executions",
            "Agent tasks executing right now, by user tier.",
            ["user_tier"],
            registry=self.registry,
        )
        self.grpc_server_handled_total = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by service, method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self.grpc_server_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time the server took to complete an RPC, by service and method.",
            ["grpc_service", "grpc_method"],
            buckets=GRPC_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def for_method(self, full_method: str) -> MethodMetrics:
        """Bind the gRPC server metrics of ``/package.Service/Method`` for repeated use."""
        return MethodMetrics(self, full_method)

    def observe_rpc(self, full_method: str, code: str, seconds: float) -> None:
        """Record one completed RPC named ``/package.Service/Method``."""
        service, _, method = full_method.lstrip("/").partition("/")
        self.grpc_server_handled_total.labels(service, method, code).inc()
        self.grpc_server_handling_seconds.labels(service, method).observe(seconds)
