"""Trace sampling: parent-based at the configured ratio unless OTEL_TRACES_SAMPLER is set."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import _sampler, setup_telemetry


def _provider(ratio: float, environ: dict[str, str] | None = None) -> TracerProvider:
    telemetry = setup_telemetry(
        "kittest",
        ServiceSettings(metrics_port=-1, trace_sample_ratio=ratio),
        environ=environ or {},
        set_global=False,
        configure_logs=False,
    )
    provider = telemetry.tracer_provider
    assert isinstance(provider, TracerProvider)
    return provider


def _recorded(provider: TracerProvider, roots: int) -> int:
    tracer = provider.get_tracer("test")
    recorded = 0
    for _ in range(roots):
        with tracer.start_as_current_span("root") as span:
            recorded += span.is_recording()
    return recorded


def test_settings_ratio_is_used_parent_based() -> None:
    provider = _provider(0.25)
    sampler = provider.sampler
    assert isinstance(sampler, ParentBased)
    # Trace ids are random: with 4000 roots at 25 % the count lies far inside these bounds.
    assert 800 < _recorded(provider, 4000) < 1200
    assert _recorded(_provider(0.0), 500) == 0
    assert _recorded(_provider(1.0), 500) == 500


def test_children_follow_their_parent_whatever_the_ratio() -> None:
    tracer = _provider(0.0).get_tracer("test")
    sampled_parent = _provider(1.0).get_tracer("test").start_span("caller")
    with (
        trace.use_span(sampled_parent, end_on_exit=True),
        tracer.start_as_current_span("call") as child,
    ):
        assert child.is_recording()


def test_otel_traces_sampler_wins_over_the_setting() -> None:
    provider = _provider(0.0, {"OTEL_TRACES_SAMPLER": "always_on"})
    assert _recorded(provider, 50) == 50
    ratio = _sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, 0.1)
    assert isinstance(ratio, TraceIdRatioBased)
    assert ratio.rate == 0.5
    off = _provider(1.0, {"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    assert _recorded(off, 50) == 0
    with pytest.raises(ValueError, match="jaeger_remote"):
        _sampler({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, 0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        _sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, 0.1)
