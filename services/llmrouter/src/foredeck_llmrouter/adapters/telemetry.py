"""Metrics and spans for every provider attempt.

Tokens go to the kit's ``agent_llm_tokens_total{model,direction}``; latency and time to first
token to histograms of the router's own; each attempt becomes one client span carrying the
OpenTelemetry GenAI semantic-convention attributes (``gen_ai.system``, ``gen_ai.request.model``,
``gen_ai.usage.*``, ...), as a child of the RPC's server span.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from foredeck_kit.metrics import Metrics
from foredeck_llmrouter.domain.ports import CallRecord

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class TelemetryObserver:
    """`CallObserver` writing Prometheus metrics and OpenTelemetry spans."""

    def __init__(self, metrics: Metrics, tracer_provider: trace.TracerProvider) -> None:
        self._metrics = metrics
        self._tracer = tracer_provider.get_tracer("foredeck_llmrouter")
        registry = metrics.registry
        self.call_seconds = Histogram(
            "llmrouter_provider_call_seconds",
            "Duration of one provider attempt, by provider, model, operation and outcome.",
            ["provider", "model", "operation", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "llmrouter_time_to_first_token_seconds",
            "Time from sending a streaming request to its first output, by provider and model.",
            ["provider", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.cost = Counter(
            "llmrouter_cost_usd_micros_total",
            "Cost of provider calls in micro-USD, from the configured price table.",
            ["model"],
            registry=registry,
        )
        self.failures = Counter(
            "llmrouter_provider_failures_total",
            "Failed provider attempts, by provider, model and reason.",
            ["provider", "model", "reason"],
            registry=registry,
        )

    def record(self, record: CallRecord, started_ns: int) -> None:
        """Account one attempt."""
        self.call_seconds.labels(
            record.provider, record.model, record.operation, record.outcome
        ).observe(record.seconds)
        if record.time_to_first_token is not None:
            self.time_to_first_token.labels(record.provider, record.model).observe(
                record.time_to_first_token
            )
        if record.error_reason:
            self.failures.labels(record.provider, record.model, record.error_reason).inc()
        usage = record.usage
        if usage is not None:
            tokens = self._metrics.agent_llm_tokens_total
            for direction, value in (
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
                ("cache_read", usage.cache_read_input_tokens),
                ("cache_write", usage.cache_creation_input_tokens),
            ):
                if value:
                    tokens.labels(record.model, direction).inc(value)
            if usage.cost_usd_micros:
                self.cost.labels(record.model).inc(usage.cost_usd_micros)
        self._span(record, started_ns)

    def _span(self, record: CallRecord, started_ns: int) -> None:
        span = self._tracer.start_span(
            f"{record.operation} {record.provider_model}",
            kind=SpanKind.CLIENT,
            start_time=started_ns,
        )
        span.set_attribute("gen_ai.operation.name", record.operation)
        span.set_attribute("gen_ai.system", record.gen_ai_system)
        span.set_attribute("gen_ai.request.model", record.provider_model)
        span.set_attribute("foredeck.llmrouter.provider", record.provider)
        span.set_attribute("foredeck.llmrouter.model", record.model)
        if record.operation == "chat":
            span.set_attribute("gen_ai.request.max_tokens", record.max_output_tokens)
        if record.temperature is not None:
            span.set_attribute("gen_ai.request.temperature", record.temperature)
        if record.response_id:
            span.set_attribute("gen_ai.response.id", record.response_id)
        if record.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [record.finish_reason])
        if record.usage is not None:
            span.set_attribute("gen_ai.response.model", record.provider_model)
            span.set_attribute("gen_ai.usage.input_tokens", record.usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", record.usage.output_tokens)
            span.set_attribute(
                "gen_ai.usage.cache_read_input_tokens", record.usage.cache_read_input_tokens
            )
            span.set_attribute(
                "gen_ai.usage.cache_creation_input_tokens",
                record.usage.cache_creation_input_tokens,
            )
        if record.error_reason:
            span.set_attribute("error.type", record.error_reason)
            if record.upstream_status:
                span.set_attribute("http.response.status_code", record.upstream_status)
            span.set_status(Status(StatusCode.ERROR))
        span.end()
