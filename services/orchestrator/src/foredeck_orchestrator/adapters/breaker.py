"""Circuit breakers in front of the orchestrator's downstream services, one per downstream.

A worker that keeps failing to reach llmrouter, toolrunner or memory stops calling it for a
cool-down instead of spending every run's time and retries on it: the breaker opens after
``failure_threshold`` failures within ``failure_window`` seconds, refuses calls at once while
open, then lets one probe call through (half-open); the probe's success closes it, its failure
opens it again. Only failures that say the downstream is unwell count (unavailable, timed out
on its own, overloaded); a refused request does not.

The state is kept in the worker process, not in Redis like llmrouter's provider circuits: it
guards this worker's path to a downstream, needs no agreement between workers, and must keep
working when Redis is what is failing. The clock is injectable for tests.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from foredeck_orchestrator.domain.loop.errors import CircuitOpenError

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker", "CircuitBreakers"]


class BreakerState(enum.StrEnum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and for how long.

    ``probe_timeout`` frees the half-open probe slot when a granted probe never reports (its
    task was cancelled without a word), so one lost probe cannot hold the breaker shut.
    """

    failure_threshold: int = 5
    failure_window: float = 30.0
    cooldown: float = 15.0
    probe_timeout: float = 60.0


class CircuitBreaker:
    """The breaker of one downstream. Not thread-safe: used from one event loop."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._failures: deque[float] = deque()
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probe_until = 0.0

    @property
    def state(self) -> BreakerState:
        """The state now, moving OPEN to HALF_OPEN once the cool-down is over."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() >= self._opened_at + self.config.cooldown
        ):
            self._state = BreakerState.HALF_OPEN
            self._probe_until = 0.0
        return self._state

    def admit(self) -> bool:
        """Grant a call or raise :class:`CircuitOpenError`; True when the call is the probe."""
        state = self.state
        now = self._clock()
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and now >= self._probe_until:
            self._probe_until = now + self.config.probe_timeout
            return True
        if state is BreakerState.OPEN:
            wait = self._opened_at + self.config.cooldown - now
        else:
            wait = self._probe_until - now
        raise CircuitOpenError(self.name, max(wait, 0.001))

    def record_success(self, probe: bool) -> None:
        """The call got an answer from the downstream (any answer that is not a failure)."""
        if probe and self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._failures.clear()
            self._probe_until = 0.0

    def record_failure(self, probe: bool) -> None:
        """The call found the downstream unwell."""
        now = self._clock()
        if self._state is BreakerState.HALF_OPEN:
            if probe:
                self._open(now)
            return
        if self._state is BreakerState.OPEN:
            return
        self._failures.append(now)
        horizon = now - self.config.failure_window
        while self._failures and self._failures[0] <= horizon:
            self._failures.popleft()
        if len(self._failures) >= self.config.failure_threshold:
            self._open(now)

    def release(self, probe: bool) -> None:
        """The call ended without telling anything (cancelled): free the probe slot."""
        if probe and self._state is BreakerState.HALF_OPEN:
            self._probe_until = 0.0

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._failures.clear()
        self._probe_until = 0.0


class CircuitBreakers:
    """One breaker per downstream name, made on first use with a shared config."""

    def __init__(
        self, config: BreakerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        """The breaker of downstream ``name``."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, self.config, clock=self._clock)
            self._breakers[name] = breaker
        return breaker
