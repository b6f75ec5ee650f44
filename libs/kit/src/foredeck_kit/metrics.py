"""Prometheus metrics every Foredeck service exposes, created on demand in one registry.

Nothing is registered at import: a process builds one :class:`Metrics` (normally through
:func:`foredeck_kit.telemetry.setup_telemetry`) and hands it to whatever records values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["GRPC_LATENCY_BUCKETS", "Metrics"]

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

    def observe_rpc(self, full_method: str, code: str, seconds: float) -> None:
        """Record one completed RPC named ``/package.Service/Method``."""
        service, _, method = full_method.lstrip("/").partition("/")
        self.grpc_server_handled_total.labels(service, method, code).inc()
        self.grpc_server_handling_seconds.labels(service, method).observe(seconds)
