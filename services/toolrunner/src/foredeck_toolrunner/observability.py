"""The runner's own metrics, beside the kit's: call outcomes, latency and sandbox kills."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from foredeck.toolrunner.v1 import tool_pb2
from foredeck_kit.metrics import Metrics

__all__ = ["ToolMetrics"]

_BUCKETS = (
    0.001,
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
    120.0,
    900.0,
)


class ToolMetrics:
    """Records each finished call in ``agent_tool_calls_total`` and the runner's own metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.call_seconds = Histogram(
            "toolrunner_tool_call_seconds",
            "Time one ExecuteTool call took, by tool and outcome.",
            ["tool_name", "outcome"],
            buckets=_BUCKETS,
            registry=metrics.registry,
        )
        self.sandbox_kills = Counter(
            "toolrunner_sandbox_kills_total",
            "Sandboxed tool processes the runner or its limits stopped, by cause.",
            ["cause"],
            registry=metrics.registry,
        )
        self.sandbox_info = Gauge(
            "toolrunner_sandbox_info",
            "The sandbox this replica runs code in (1 for the kind in use).",
            ["kind", "seccomp"],
            registry=metrics.registry,
        )

    def sandbox(self, kind: str, seccomp: bool) -> None:
        """Publish which sandbox this replica runs tools in (probed at start)."""
        self.sandbox_info.labels(kind, "true" if seccomp else "false").set(1)

    def finished(
        self,
        tool: tool_pb2.Tool | None,
        tool_name: str,
        outcome: str,
        seconds: float,
        kill_cause: str | None,
    ) -> None:
        """One call ended; only calls of a known tool are labelled with its name."""
        name = tool.definition.name if tool is not None else "unknown"
        success = "true" if outcome in ("success", "replayed") else "false"
        self.metrics.agent_tool_calls_total.labels(name, success).inc()
        self.call_seconds.labels(name, outcome).observe(seconds)
        if kill_cause:
            self.sandbox_kills.labels(kill_cause).inc()
