"""Spans around every store call, the recall latency histogram and per-tenant memory counts."""

from __future__ import annotations

import functools
import inspect
from typing import Any, TypeVar, cast

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Gauge, Histogram

T = TypeVar("T")

_RECALL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class MemoryMetrics:
    """The memory service's own metrics, registered in the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.recall_seconds = Histogram(
            "memory_recall_seconds",
            "Wall time of Recall: embedding the query and searching the vectors.",
            buckets=_RECALL_BUCKETS,
            registry=registry,
        )
        self.memories = Gauge(
            "memory_long_term_memories",
            "Long-term memory versions held per tenant, as last counted after a write.",
            ["tenant_id"],
            registry=registry,
        )


class _Traced:
    """Proxy that runs each coroutine method of ``target`` inside a client span."""

    def __init__(self, target: Any, store: str, tracer: trace.Tracer) -> None:
        self._target = target
        self._store = store
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self._tracer.start_as_current_span(
                f"{self._store}.{name}",
                kind=trace.SpanKind.CLIENT,
                attributes={"db.system": self._store, "db.operation": name},
            ):
                return await attr(*args, **kwargs)

        return wrapped


def traced(target: T, store: str, tracer_provider: trace.TracerProvider | None) -> T:
    """``target`` with a span per async call, named ``<store>.<method>``."""
    provider = tracer_provider or trace.get_tracer_provider()
    return cast(T, _Traced(target, store, provider.get_tracer("foredeck_memory")))
