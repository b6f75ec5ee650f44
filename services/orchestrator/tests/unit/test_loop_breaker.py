"""The per-downstream circuit breaker: opening, failing fast, probing, closing."""

from __future__ import annotations

import pytest

from foredeck_orchestrator.adapters.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitBreakers,
)
from foredeck_orchestrator.domain.loop.errors import CircuitOpenError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CONFIG = BreakerConfig(failure_threshold=3, failure_window=10.0, cooldown=5.0, probe_timeout=20.0)


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("toolrunner", CONFIG, clock=clock)


def state(b: CircuitBreaker) -> BreakerState:
    """Read through a call, so the type checker does not pin the state between reads."""
    return b.state


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        b.record_failure(b.admit())


def test_opens_after_the_threshold_and_fails_fast() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 2)
    assert state(b) is BreakerState.CLOSED
    fail(b, 1)
    assert state(b) is BreakerState.OPEN
    clock.now += 2.0
    with pytest.raises(CircuitOpenError) as caught:
        b.admit()
    error = caught.value
    assert error.reason == "CIRCUIT_OPEN"
    assert error.downstream == "toolrunner"
    assert error.transient
    assert error.retry_after == pytest.approx(3.0)


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 2)
    clock.now += 11.0
    fail(b, 2)
    assert state(b) is BreakerState.CLOSED


def test_successes_do_not_open_it() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.record_success(b.admit())
    assert state(b) is BreakerState.CLOSED


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 5.0
    assert state(b) is BreakerState.HALF_OPEN
    probe = b.admit()
    assert probe is True
    with pytest.raises(CircuitOpenError):
        b.admit()
    b.record_success(probe)
    assert state(b) is BreakerState.CLOSED
    assert b.admit() is False


def test_a_failed_probe_opens_it_again() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 5.0
    b.record_failure(b.admit())
    assert state(b) is BreakerState.OPEN
    with pytest.raises(CircuitOpenError):
        b.admit()


def test_a_non_probe_failure_while_half_open_does_not_reopen() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 5.0
    probe = b.admit()
    b.record_failure(False)
    assert state(b) is BreakerState.HALF_OPEN
    b.record_success(probe)
    assert state(b) is BreakerState.CLOSED


def test_a_released_probe_frees_the_slot() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 5.0
    b.release(b.admit())
    assert b.admit() is True


def test_a_silent_probe_expires() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.now += 5.0
    assert b.admit() is True
    clock.now += 19.0
    with pytest.raises(CircuitOpenError):
        b.admit()
    clock.now += 1.0
    assert b.admit() is True


def test_one_breaker_per_downstream() -> None:
    clock = Clock()
    breakers = CircuitBreakers(CONFIG, clock=clock)
    fail(breakers.get("llmrouter"), 3)
    assert state(breakers.get("llmrouter")) is BreakerState.OPEN
    assert state(breakers.get("memory")) is BreakerState.CLOSED
    assert breakers.get("llmrouter") is breakers.get("llmrouter")
