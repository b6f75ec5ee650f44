"""Typed failures of the agent loop and of the downstream calls it makes.

The loop never imports grpc: a downstream failure reaches it as :class:`DownstreamError`, with
the status code as a number and the downstream's own reason and domain kept apart, and a run
that must stop carries a ready ``foredeck.common.v1.Error`` in :class:`RunFailed`.
"""

from __future__ import annotations

from collections.abc import Mapping

from foredeck.common.v1 import error_pb2

__all__ = [
    "DOMAIN",
    "CircuitOpenError",
    "Code",
    "DownstreamError",
    "RunFailed",
    "make_error",
]

DOMAIN = "orchestrator.foredeck.dev"


class Code:
    """Canonical gRPC status code numbers, so the domain can name them without grpc."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


def make_error(
    code: int,
    reason: str,
    message: str,
    metadata: Mapping[str, str] | None = None,
    *,
    retry_after: float | None = None,
    domain: str = DOMAIN,
) -> error_pb2.Error:
    """An orchestrator ``Error`` as run events, journal entries and the run record carry it."""
    error = error_pb2.Error(code=code, reason=reason, domain=domain, message=message)
    for key, value in (metadata or {}).items():
        if value:
            error.metadata[key] = value
    if retry_after is not None and retry_after > 0:
        error.retry_delay.FromNanoseconds(int(retry_after * 1e9))
    return error


class RunFailed(Exception):
    """The run cannot go on: it ends FAILED with :attr:`error`."""

    def __init__(self, error: error_pb2.Error) -> None:
        super().__init__(error.reason)
        self.error = error


class DownstreamError(Exception):
    """A call to llmrouter, toolrunner or memory failed.

    ``code`` is the gRPC status code number; ``reason``, ``domain`` and ``metadata`` come from
    the downstream's ``ErrorInfo`` (empty when it sent none). ``retry_after`` is its RetryInfo
    in seconds. ``run_deadline`` is true when the call's timeout was what the run's wall-time
    budget had left, so a DEADLINE_EXCEEDED means the run ran out of time rather than the
    downstream being slow. The downstream's message is never kept: it must not reach a run's
    error.
    """

    def __init__(
        self,
        downstream: str,
        code: int,
        code_name: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
        run_deadline: bool = False,
    ) -> None:
        super().__init__(f"{downstream} failed with {code_name} {reason}".rstrip())
        self.downstream = downstream
        self.code = code
        self.code_name = code_name
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after = retry_after
        self.run_deadline = run_deadline

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed: UNAVAILABLE, or RESOURCE_EXHAUSTED that came
        with a RetryInfo (a quota that waiting does not refill comes without one)."""
        if self.code == Code.UNAVAILABLE:
            return True
        return self.code == Code.RESOURCE_EXHAUSTED and self.retry_after is not None


class CircuitOpenError(DownstreamError):
    """The breaker in front of a downstream is open: the call was not attempted."""

    def __init__(self, downstream: str, retry_after: float) -> None:
        super().__init__(
            downstream,
            Code.UNAVAILABLE,
            "UNAVAILABLE",
            reason="CIRCUIT_OPEN",
            domain=DOMAIN,
            metadata={"downstream": downstream},
            retry_after=retry_after,
        )
