"""What the router needs from the outside: providers, the shared circuit store, telemetry."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from foredeck_llmrouter.domain.model import (
    Completion,
    EmbeddingResult,
    ProviderCall,
    ProviderEvent,
    Usage,
)


class ChatProvider(Protocol):
    """One upstream that generates chat completions.

    Both methods raise `ProviderFailure` for every upstream failure, already classified, and
    never let a provider's message text out.
    """

    async def complete(self, call: ProviderCall) -> Completion:
        """The whole answer."""
        ...

    def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """The answer as events; closing the iterator early cancels the upstream request."""
        ...


class EmbeddingProvider(Protocol):
    """One upstream that embeds texts."""

    async def embed(
        self, provider_model: str, texts: Sequence[str], dimensions: int, time_limit: float
    ) -> EmbeddingResult:
        """Vectors for ``texts`` in order."""
        ...


class CircuitState(enum.Enum):
    """State of one circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Admission:
    """Whether a call may go to a provider and model now."""

    allowed: bool
    probe: bool = False
    """The call is the half-open probe: its outcome closes or reopens the circuit."""
    retry_after: float = 0.0
    """Seconds until the next probe, when refused."""


@dataclass(frozen=True)
class CircuitSnapshot:
    """One circuit as stored."""

    provider: str
    model: str
    state: CircuitState
    recent_failures: int
    opened_at: float | None
    next_probe_at: float | None
    last_failure_reason: str
    last_failure_at: float | None
    last_success_at: float | None


class CircuitStore(Protocol):
    """Circuit breaker state shared by every router replica."""

    async def admit(self, provider: str, model: str) -> Admission:
        """Ask to call; may turn an open circuit half-open and grant its probe."""
        ...

    async def record_success(self, provider: str, model: str, probe: bool) -> None:
        """A call succeeded: a probe closes the circuit."""
        ...

    async def record_failure(self, provider: str, model: str, reason: str, probe: bool) -> None:
        """A call failed in a way that counts against the circuit."""
        ...

    async def release_probe(self, provider: str, model: str) -> None:
        """A probe ended without a verdict (for example a caller's cancellation)."""
        ...

    async def snapshot(self, provider: str, model: str) -> CircuitSnapshot:
        """The circuit's current state."""
        ...


@dataclass(frozen=True)
class CallRecord:
    """One finished provider attempt, for telemetry."""

    provider: str
    gen_ai_system: str
    model: str
    provider_model: str
    operation: str
    outcome: str
    seconds: float
    time_to_first_token: float | None
    usage: Usage | None
    finish_reason: str
    error_reason: str
    upstream_status: int
    max_output_tokens: int
    temperature: float | None
    response_id: str


class CallObserver(Protocol):
    """Receives every finished provider attempt (metrics, spans)."""

    def record(self, record: CallRecord, started_ns: int) -> None:
        """Account one attempt that started at ``started_ns`` (epoch nanoseconds)."""
        ...
