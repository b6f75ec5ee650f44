"""Foredeck errors as typed exceptions, read from the ``google.rpc.Status`` each error carries.

Every Foredeck RPC error has a canonical gRPC code and, in the ``grpc-status-details-bin``
trailer, a ``google.rpc.Status`` whose first detail is an ``ErrorInfo`` (``reason``, ``domain``,
``metadata``), then, where the reason calls for them, ``RetryInfo``, ``QuotaFailure`` and
``BadRequest``. :func:`error_from_rpc` turns one into the :class:`ForedeckError` subclass of its
code, with those details as attributes::

    try:
        run = await client.create_run("What is 17 * 23?")
    except RateLimited as error:
        await asyncio.sleep(error.retry_after or 1.0)

Branch on the class or on ``reason``, never on the message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ConfigurationError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "ForedeckError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "QuotaViolation",
    "RateLimited",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_from_rpc",
]

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exceeded limit (``google.rpc.QuotaFailure.Violation``): ``subject`` names it,
    e.g. ``key:<api_key_id>``, ``user:<user_id>``, ``tenant`` or ``budget:<budget_id>``."""

    subject: str
    description: str


@dataclass(eq=False)
class ForedeckError(Exception):
    """An RPC error from a Foredeck service, or a client-side problem before any call was made."""

    message: str
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = ""
    """``ErrorInfo.reason``, e.g. ``RATE_LIMITED``; empty when the error carried none."""
    domain: str = ""
    """``ErrorInfo.domain``, e.g. ``gateway.foredeck.dev``."""
    metadata: dict[str, str] = field(default_factory=dict)
    """``ErrorInfo.metadata``: the dynamic values (``runId``, ``permission``, ...)."""
    retry_after: float | None = None
    """Seconds to wait before trying again (``RetryInfo``), when the service said."""
    quota_violations: list[QuotaViolation] = field(default_factory=list)
    field_violations: list[FieldViolation] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        where = f" ({self.reason})" if self.reason else ""
        return f"{self.message}{where}"

    @property
    def hint(self) -> str:
        """What to do next, in one sentence, for a person reading a terminal."""
        return _REASON_HINTS.get(self.reason) or _HINTS.get(type(self), "")


class Unauthenticated(ForedeckError):
    """The credential is missing, malformed, unknown, expired or revoked."""


class PermissionDenied(ForedeckError):
    """The credential lacks a permission the call needs (``metadata['permission']``)."""


class NotFound(ForedeckError):
    """No such run, agent, key or approval visible to the caller."""


class InvalidArgument(ForedeckError):
    """The request is malformed; ``field_violations`` says which fields."""


class OutOfRange(ForedeckError):
    """A position past what is kept, e.g. resuming after events that were trimmed."""


class AlreadyExists(ForedeckError):
    """The resource exists already."""


class FailedPrecondition(ForedeckError):
    """The resource is not in a state that allows the call (e.g. the run already finished)."""


class Aborted(ForedeckError):
    """A concurrent change won (e.g. a stale etag); read again and retry."""


class ResourceExhausted(ForedeckError):
    """A limit: rate, concurrency, queue or budget (``quota_violations``, ``retry_after``)."""


class RateLimited(ResourceExhausted):
    """A rate or concurrency limit: the same call succeeds after ``retry_after`` seconds."""


class Unavailable(ForedeckError):
    """The service or one it depends on cannot be reached now; retrying later may succeed."""


class DeadlineExceeded(ForedeckError):
    """The call's deadline passed before it finished."""


class Cancelled(ForedeckError):
    """The call was cancelled."""


class Unimplemented(ForedeckError):
    """The server does not implement the method (an older server than this client)."""


class Internal(ForedeckError):
    """The service failed; its logs say why (the wire never does)."""


class ConfigurationError(ForedeckError):
    """The client cannot tell where Foredeck is or which credential to use; no call was made."""


_BY_CODE: dict[grpc.StatusCode, type[ForedeckError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
}

_RATE_REASONS = frozenset({"RATE_LIMITED", "CONCURRENCY_LIMITED", "QUEUE_FULL"})

_HINTS: dict[type[ForedeckError], str] = {
    Unauthenticated: "Check the API key (FOREDECK_API_KEY) or start the local stack with "
    "`foredeck up`, which creates one.",
    PermissionDenied: "Ask an administrator for a key with that permission.",
    NotFound: "Check the name or id.",
    InvalidArgument: "Fix the fields named above and try again.",
    FailedPrecondition: "The resource is not in a state that allows this; look at it with "
    "`foredeck show`.",
    Aborted: "Someone changed it meanwhile; read it again and retry.",
    ResourceExhausted: "A limit was reached; wait and try again, or raise the limit.",
    RateLimited: "Too many requests; wait the time given and try again.",
    Unavailable: "Is the platform running? `foredeck up` starts it locally; try again shortly.",
    DeadlineExceeded: "It took too long; try again or allow more time (--timeout).",
    Unimplemented: "The server is older than this client; upgrade the server.",
    Internal: "The service failed; its log says why (`foredeck logs gateway`).",
    ConfigurationError: "Start the local stack with `foredeck up`, or set FOREDECK_ADDRESS and "
    "FOREDECK_API_KEY.",
}


_REASON_HINTS: dict[str, str] = {
    "AGENT_NOT_FOUND": "`foredeck agents` lists the agents; leave out --agent to use `default`.",
    "RUN_NOT_FOUND": "Check the run id; `foredeck runs` lists your runs.",
    "APPROVAL_NOT_PENDING": "It was decided already or expired; `foredeck approve` lists what "
    "still waits.",
    "PERMISSION_MISSING": "The credential lacks the permission named above; ask an "
    "administrator for a key that has it.",
}


def _status_details(error: grpc.RpcError) -> status_pb2.Status | None:
    # Pairs at run time (a tuple of tuples, or grpc.aio's Metadata), whatever the stubs say.
    trailers = cast(
        "Iterable[tuple[str, str | bytes]] | None",
        error.trailing_metadata() if hasattr(error, "trailing_metadata") else None,
    )
    for key, value in trailers or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a corrupt trailer must not hide the error itself
                return None
            return status
    return None


def error_from_rpc(error: grpc.RpcError) -> ForedeckError:
    """The typed exception for a failed call, with the details of its ``google.rpc.Status``."""
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message: str = (error.details() if hasattr(error, "details") else "") or code.name.lower()
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    quota: list[QuotaViolation] = []
    fields: list[FieldViolation] = []
    status = _status_details(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and not reason:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota += [QuotaViolation(v.subject, v.description) for v in failure.violations]
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    if status is not None and status.message:
        message = status.message
    cls = _BY_CODE.get(code, ForedeckError)
    if cls is ResourceExhausted and reason in _RATE_REASONS:
        cls = RateLimited
    return cls(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_after=retry_after,
        quota_violations=quota,
        field_violations=fields,
    )
