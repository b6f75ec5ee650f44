"""Failures: what a provider attempt failed with, and the typed error the router returns.

The domain never imports gRPC. It raises `RouterError` with a reason from the contract's
`ErrorReason` (without the prefix); the servicer maps the reason to its status code.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Failure(enum.Enum):
    """The kind of a failed provider attempt; each value is the contract reason it maps to."""

    RATE_LIMITED = "PROVIDER_RATE_LIMITED"
    QUOTA_EXHAUSTED = "PROVIDER_QUOTA_EXHAUSTED"
    UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    TIMEOUT = "PROVIDER_TIMEOUT"
    AUTH_FAILED = "PROVIDER_AUTH_FAILED"
    REJECTED = "PROVIDER_REJECTED_REQUEST"
    MODEL_NOT_FOUND = "PROVIDER_MODEL_NOT_FOUND"
    RESPONSE_INVALID = "PROVIDER_RESPONSE_INVALID"
    CONTENT_FILTERED = "CONTENT_FILTERED"
    CONTEXT_WINDOW = "CONTEXT_WINDOW_EXCEEDED"

    @property
    def retryable(self) -> bool:
        """Whether another attempt on the same model may succeed."""
        return self in _RETRYABLE

    @property
    def falls_back(self) -> bool:
        """Whether the next model in the chain should be tried."""
        return self in _FALLS_BACK

    @property
    def trips_circuit(self) -> bool:
        """Whether the failure counts against the model's circuit breaker."""
        return self in _TRIPS


_RETRYABLE = frozenset(
    {Failure.RATE_LIMITED, Failure.UNAVAILABLE, Failure.TIMEOUT, Failure.RESPONSE_INVALID}
)
_FALLS_BACK = _RETRYABLE | {Failure.QUOTA_EXHAUSTED}
# Rate limits and quota say the provider is healthy but refuses this account: they fail over
# but do not open the circuit, which would also block callers with headroom left.
_TRIPS = frozenset({Failure.UNAVAILABLE, Failure.TIMEOUT, Failure.RESPONSE_INVALID})


@dataclass
class ProviderFailure(Exception):
    """One provider attempt failed. Never carries the provider's message text."""

    kind: Failure
    upstream_status: int = 0
    """HTTP status, 0 for a connection failure or timeout."""
    retry_after: float | None = None
    """Seconds the provider asked to wait (retry-after-ms or Retry-After)."""
    should_retry: bool | None = None
    """The provider's x-should-retry header, when sent."""
    upstream_error_type: str = ""
    """The provider's error type or code (never its message)."""

    def __str__(self) -> str:
        return f"{self.kind.value} (upstream status {self.upstream_status})"

    @property
    def may_retry(self) -> bool:
        """Whether this attempt may be repeated on the same model.

        x-should-retry: false vetoes a retry; true cannot make a retry of a status that is never
        retried (a 4xx other than 408, 409 and 429, or an exhausted quota).
        """
        return self.should_retry is not False and self.kind.retryable


def classify_status(status: int, error_type: str = "", error_code: str = "") -> Failure:
    """Map a provider's HTTP status (and error type/code) to a failure kind."""
    if status == 429:
        if error_code == "insufficient_quota" or error_type == "insufficient_quota":
            return Failure.QUOTA_EXHAUSTED
        return Failure.RATE_LIMITED
    if status in (401, 403):
        return Failure.AUTH_FAILED
    if status == 404:
        return Failure.MODEL_NOT_FOUND
    if status in (408, 409) or status >= 500:
        return Failure.UNAVAILABLE
    if error_code == "context_length_exceeded":
        return Failure.CONTEXT_WINDOW
    if error_code == "content_policy_violation" or error_code == "content_filter":
        return Failure.CONTENT_FILTERED
    return Failure.REJECTED


def classify_error_type(error_type: str) -> Failure:
    """Map an error type that arrived inside a stream (no HTTP status) to a failure kind."""
    return {
        "rate_limit_error": Failure.RATE_LIMITED,
        "overloaded_error": Failure.UNAVAILABLE,
        "api_error": Failure.UNAVAILABLE,
        "server_error": Failure.UNAVAILABLE,
        "timeout_error": Failure.TIMEOUT,
        "authentication_error": Failure.AUTH_FAILED,
        "permission_error": Failure.AUTH_FAILED,
        "not_found_error": Failure.MODEL_NOT_FOUND,
        "insufficient_quota": Failure.QUOTA_EXHAUSTED,
        "invalid_request_error": Failure.REJECTED,
    }.get(error_type, Failure.UNAVAILABLE)


@dataclass
class RouterError(Exception):
    """An error the router returns on purpose: a contract reason plus its details."""

    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: Iterable[tuple[str, str]] = ()
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def invalid_request(violations: Iterable[tuple[str, str]]) -> RouterError:
    """INVALID_REQUEST with one BadRequest violation per bad field."""
    return RouterError("INVALID_REQUEST", "invalid request", field_violations=list(violations))
