"""Typed service errors and their wire form, a ``google.rpc.Status`` with rich details.

Servers raise :class:`ServiceError`; the kit's handler wrapper turns it into a status carrying
exactly one ``ErrorInfo`` (reason + domain + metadata) followed by ``BadRequest``, ``RetryInfo``
and ``QuotaFailure`` where they apply. Clients read it back with :func:`error_details` and branch
on the reason, never on the message text.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "ENUM_PREFIX",
    "INTERNAL_MESSAGE",
    "MAX_FIELD_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY_BYTES",
    "MAX_STATUS_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_VIOLATIONS",
    "OMITTED_METADATA_KEY",
    "OMITTED_QUOTA_VIOLATIONS_KEY",
    "OMITTED_VIOLATIONS_KEY",
    "STATUS_DETAILS_KEY",
    "ErrorDetails",
    "FieldViolation",
    "QuotaViolation",
    "Reason",
    "ServiceError",
    "domain_for",
    "error_details",
    "missing_shared_reasons",
    "reason_from_enum",
    "reason_to_enum",
    "to_status",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing metadata key that carries the serialized ``google.rpc.Status``."""

INTERNAL_MESSAGE = "internal error"
"""The only message an INTERNAL error ever carries on the wire."""

ENUM_PREFIX = "ERROR_REASON_"
"""Prefix of every value of a service's proto ``ErrorReason`` enum."""

MAX_STATUS_BYTES = 4096
"""Largest serialized ``google.rpc.Status`` :func:`to_status` builds (base64 in the trailer)."""

MAX_VIOLATIONS = 20
"""Most field violations (and, separately, quota violations) sent with one error."""

MAX_MESSAGE_BYTES = 256
"""Longest status message on the wire, in UTF-8 bytes."""
MAX_TEXT_BYTES = 256
"""Longest violation description or metadata value on the wire, in UTF-8 bytes."""
MAX_FIELD_BYTES = 128
"""Longest field path, quota subject or domain on the wire, in UTF-8 bytes."""
MAX_METADATA_KEY_BYTES = 64
MAX_METADATA_ENTRIES = 16
"""Most ErrorInfo metadata entries sent (within a 1 KiB budget), the omitted counts aside."""

OMITTED_VIOLATIONS_KEY = "omittedViolations"
OMITTED_QUOTA_VIOLATIONS_KEY = "omittedQuotaViolations"
OMITTED_METADATA_KEY = "omittedMetadata"

_METADATA_BUDGET = 1024
_RESERVED_BYTES = 256
_ELLIPSIS = "\u2026".encode()
_TYPE_URL_PREFIX = "type.googleapis.com/"

# AIP-193: reasons are UPPER_SNAKE_CASE, at most 63 characters.
_REASON_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,61}[A-Z0-9]$")
_DOMAIN_SUFFIX = ".foredeck.dev"


class Reason(enum.StrEnum):
    """Reasons shared by every Foredeck service; each service's ``ErrorReason`` enum has them."""

    PRINCIPAL_MISSING = "PRINCIPAL_MISSING"
    PRINCIPAL_INVALID = "PRINCIPAL_INVALID"
    PRINCIPAL_EXPIRED = "PRINCIPAL_EXPIRED"
    PERMISSION_MISSING = "PERMISSION_MISSING"
    INVALID_REQUEST = "INVALID_REQUEST"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    DEADLINE_TOO_SHORT = "DEADLINE_TOO_SHORT"
    DOWNSTREAM_UNAVAILABLE = "DOWNSTREAM_UNAVAILABLE"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"
    DELEGATION_NOT_ALLOWED = "DELEGATION_NOT_ALLOWED"

    @classmethod
    def numbered(cls) -> list[tuple[Reason, int]]:
        """Each shared reason with its value number, the same in every service's enum (1-19)."""
        return [(reason, number) for number, reason in enumerate(cls, start=1)]


class FieldViolation(NamedTuple):
    """One invalid request field, named by its path (``messages[2].content``)."""

    field: str
    description: str


class QuotaViolation(NamedTuple):
    """One exceeded quota: who it applies to and what was exceeded."""

    subject: str
    description: str


def domain_for(service: str) -> str:
    """Return the error domain of a service, e.g. ``memory`` -> ``memory.foredeck.dev``."""
    if not service or "." in service:
        raise ValueError(f"service name must be a single label, got {service!r}")
    return f"{service}{_DOMAIN_SUFFIX}"


def _check_reason(reason: str) -> str:
    if not _REASON_PATTERN.fullmatch(reason):
        raise ValueError(f"error reason must be UPPER_SNAKE_CASE (AIP-193), got {reason!r}")
    return reason


def reason_from_enum(value_name: str) -> str:
    """Turn a proto enum value name (``ERROR_REASON_PRINCIPAL_MISSING``) into its reason."""
    if not value_name.startswith(ENUM_PREFIX):
        raise ValueError(f"{value_name!r} is not an ErrorReason value (missing {ENUM_PREFIX})")
    reason = value_name.removeprefix(ENUM_PREFIX)
    if reason == "UNSPECIFIED":
        raise ValueError("ERROR_REASON_UNSPECIFIED is not a reason")
    return _check_reason(reason)


def reason_to_enum(reason: str) -> str:
    """Return the proto enum value name that carries ``reason``."""
    return ENUM_PREFIX + _check_reason(reason)


def missing_shared_reasons(enum_value_names: Iterable[str]) -> list[Reason]:
    """Return the shared reasons a service's ``ErrorReason`` enum lacks (empty when complete).

    Pass the enum's value names, e.g. ``ErrorReason.keys()`` of a generated enum wrapper.
    """
    present = set(enum_value_names)
    return [reason for reason in Reason if reason_to_enum(reason) not in present]


class ServiceError(Exception):
    """An error a service returns on purpose: a gRPC code plus a machine-readable reason.

    ``message`` travels on the wire, so it must never hold secrets, raw provider messages or
    stack traces; dynamic values belong in ``metadata``.
    """

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str]
    """Dynamic values, keys and values coerced to strings."""
    field_violations: list[FieldViolation]
    retry_after: timedelta | None
    quota_violations: list[QuotaViolation]

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, object] | None = None,
        field_violations: Iterable[tuple[object, object]] = (),
        retry_after: timedelta | None = None,
        quota_violations: Iterable[tuple[object, object]] = (),
    ) -> None:
        if code is grpc.StatusCode.OK:
            raise ValueError("a ServiceError cannot carry status OK")
        super().__init__(message)
        self.code = code
        self.reason = _check_reason(str(reason))
        self.message = INTERNAL_MESSAGE if code is grpc.StatusCode.INTERNAL else str(message)
        # Everything below ends up in protobuf string fields; coercing here means a count or
        # an id passed as a number can never turn a typed error into an INTERNAL one later.
        self.metadata = {str(key): str(value) for key, value in (metadata or {}).items()}
        self.field_violations = [FieldViolation(str(f), str(d)) for f, d in field_violations]
        self.retry_after = retry_after
        self.quota_violations = [QuotaViolation(str(s), str(d)) for s, d in quota_violations]

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.reason}, {self.message!r})"

    @classmethod
    def principal_missing(cls) -> ServiceError:
        """The call carried no principal although the method requires one."""
        return cls(grpc.StatusCode.UNAUTHENTICATED, Reason.PRINCIPAL_MISSING, "principal missing")

    @classmethod
    def principal_invalid(cls, message: str = "principal invalid") -> ServiceError:
        """The principal failed verification (signature, key id, claims, algorithm)."""
        return cls(grpc.StatusCode.UNAUTHENTICATED, Reason.PRINCIPAL_INVALID, message)

    @classmethod
    def principal_expired(cls) -> ServiceError:
        """The principal was well formed and signed but is past its expiry."""
        return cls(grpc.StatusCode.UNAUTHENTICATED, Reason.PRINCIPAL_EXPIRED, "principal expired")

    @classmethod
    def delegation_not_allowed(cls) -> ServiceError:
        """A delegated principal called a gateway-only method or named another run."""
        return cls(
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.DELEGATION_NOT_ALLOWED,
            "not allowed with a principal delegated to a run",
        )

    @classmethod
    def permission_missing(cls, permission: str) -> ServiceError:
        """The verified principal lacks ``permission``."""
        return cls(
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.PERMISSION_MISSING,
            f"permission {permission!r} required",
            metadata={"permission": permission},
        )

    @classmethod
    def invalid_request(
        cls,
        violations: Iterable[tuple[str, str]],
        message: str = "invalid request",
    ) -> ServiceError:
        """One or more request fields are invalid; each is listed as a BadRequest violation."""
        listed = list(violations)
        if not listed:
            raise ValueError("invalid_request needs at least one field violation")
        return cls(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            message,
            field_violations=listed,
        )

    @classmethod
    def request_too_large(cls, field_path: str, limit: int, actual: int) -> ServiceError:
        """A field is over its documented size limit (bytes, items or tokens as documented)."""
        return cls(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.REQUEST_TOO_LARGE,
            f"{field_path} is over its size limit",
            metadata={"field": field_path, "limit": str(limit), "actual": str(actual)},
            field_violations=[(field_path, f"size {actual} is over the limit of {limit}")],
        )

    @classmethod
    def request_id_reused(cls, request_id: str) -> ServiceError:
        """A client request id already recorded came back with a different request."""
        return cls(
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.REQUEST_ID_REUSED,
            "request_id was already used for a different request",
            metadata={"requestId": request_id},
        )

    @classmethod
    def page_token_invalid(cls, field_path: str = "page_token") -> ServiceError:
        """A page token is malformed, expired, or from a request with other parameters."""
        return cls(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.PAGE_TOKEN_INVALID,
            "invalid page token; restart from the first page",
            field_violations=[(field_path, "malformed, expired or from a different request")],
        )

    @classmethod
    def deadline_too_short(cls, minimum: timedelta) -> ServiceError:
        """The caller's deadline leaves less time than the operation needs to start."""
        return cls(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            Reason.DEADLINE_TOO_SHORT,
            "deadline too short",
            metadata={"minimumSeconds": f"{minimum.total_seconds():g}"},
        )

    @classmethod
    def downstream_unavailable(
        cls,
        downstream: str,
        retry_after: timedelta = timedelta(seconds=1),
        *,
        upstream_reason: str | None = None,
    ) -> ServiceError:
        """A service this one depends on cannot be reached; retry after ``retry_after``."""
        metadata = {"downstream": downstream}
        if upstream_reason:
            metadata["upstreamReason"] = upstream_reason
        return cls(
            grpc.StatusCode.UNAVAILABLE,
            Reason.DOWNSTREAM_UNAVAILABLE,
            f"{downstream} unavailable",
            metadata=metadata,
            retry_after=retry_after,
        )

    @classmethod
    def store_unavailable(
        cls, store: str, retry_after: timedelta = timedelta(seconds=1)
    ) -> ServiceError:
        """A data store this service owns cannot be reached; retry after ``retry_after``."""
        return cls(
            grpc.StatusCode.UNAVAILABLE,
            Reason.STORE_UNAVAILABLE,
            f"{store} unavailable",
            metadata={"store": store},
            retry_after=retry_after,
        )

    @classmethod
    def shutting_down(cls) -> ServiceError:
        """The server is draining; the caller should retry on another replica."""
        return cls(grpc.StatusCode.UNAVAILABLE, Reason.SHUTTING_DOWN, "server shutting down")

    @classmethod
    def internal(cls) -> ServiceError:
        """An unexpected failure; details go to the log, never to the wire."""
        return cls(grpc.StatusCode.INTERNAL, Reason.INTERNAL, INTERNAL_MESSAGE)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _clip(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` UTF-8 bytes, marking a cut with an ellipsis.

    A lone surrogate (text decoded with ``surrogateescape``) becomes ``?``: protobuf refuses
    to serialize it, which would turn the error into a failure to report it.
    """
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        encoded = text.encode("utf-8", "replace")
        text = encoded.decode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - len(_ELLIPSIS)].decode("utf-8", "ignore") + "\u2026"


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_len(size: int) -> int:
    """Bytes a length-delimited field of ``size`` bytes takes (single-byte tag)."""
    return 1 + _varint_len(size) + size


def _detail_len(payload: int, type_name: str) -> int:
    """Bytes a ``google.protobuf.Any`` detail of ``payload`` bytes takes inside a Status."""
    any_size = _field_len(len(_TYPE_URL_PREFIX) + len(type_name)) + _field_len(payload)
    return _field_len(any_size)


def _bounded_metadata(metadata: Mapping[str, str]) -> tuple[dict[str, str], int]:
    kept: dict[str, str] = {}
    used = omitted = 0
    for key, value in metadata.items():
        clipped_key = _clip(key, MAX_METADATA_KEY_BYTES)
        clipped_value = _clip(value, MAX_TEXT_BYTES)
        size = _field_len(
            _field_len(len(clipped_key.encode())) + _field_len(len(clipped_value.encode()))
        )
        if len(kept) >= MAX_METADATA_ENTRIES or used + size > _METADATA_BUDGET:
            omitted += 1
            continue
        kept[clipped_key] = clipped_value
        used += size
    return kept, omitted


def _field_violation(name: str, description: str) -> Any:
    return error_details_pb2.BadRequest.FieldViolation(field=name, description=description)


def _quota_violation(subject: str, description: str) -> Any:
    return error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)


def _fill(
    items: Sequence[tuple[str, str]], make: Callable[[str, str], Any], budget: int, limit: int
) -> tuple[list[Any], int, int]:
    """Take items in order while they fit ``budget`` bytes and ``limit`` items."""
    kept: list[Any] = []
    used = 0
    for index, (name, description) in enumerate(items):
        item = make(_clip(name, MAX_FIELD_BYTES), _clip(description, MAX_TEXT_BYTES))
        size = _field_len(item.ByteSize())
        if len(kept) >= limit or used + size > budget:
            return kept, used, len(items) - index
        kept.append(item)
        used += size
    return kept, used, 0


def to_status(error: ServiceError, domain: str) -> grpc.Status:
    """Build the ``grpc.Status`` (with ``grpc-status-details-bin``) that carries ``error``.

    The serialized status never exceeds :data:`MAX_STATUS_BYTES`, whatever the error holds:
    texts are clipped, and field and quota violations beyond :data:`MAX_VIOLATIONS` or the
    byte budget are left out and counted in ErrorInfo metadata (``omittedViolations``,
    ``omittedQuotaViolations``, ``omittedMetadata``). An oversized trailer would be refused
    by the client's HTTP/2 header limit and the caller would see RESOURCE_EXHAUSTED with the
    real reason lost.
    """
    message = _clip(error.message, MAX_MESSAGE_BYTES)
    metadata, omitted_metadata = _bounded_metadata(error.metadata)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=_clip(domain, MAX_FIELD_BYTES), metadata=metadata
    )
    retry: error_details_pb2.RetryInfo | None = None
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(error.retry_after)
        retry = error_details_pb2.RetryInfo(retry_delay=delay)

    base = status_pb2.Status(code=error.code.value[0], message=message)
    used = base.ByteSize() + _detail_len(info.ByteSize(), "google.rpc.ErrorInfo")
    if retry is not None:
        used += _detail_len(retry.ByteSize(), "google.rpc.RetryInfo")
    # Room for the omitted counts and for the two list details' own envelopes.
    used += _RESERVED_BYTES
    budget = MAX_STATUS_BYTES - used
    violations, taken, omitted_violations = _fill(
        error.field_violations,
        _field_violation,
        budget,
        MAX_VIOLATIONS,
    )
    quota, _, omitted_quota = _fill(
        error.quota_violations,
        _quota_violation,
        budget - taken,
        MAX_VIOLATIONS,
    )
    for key, count in (
        (OMITTED_VIOLATIONS_KEY, omitted_violations),
        (OMITTED_QUOTA_VIOLATIONS_KEY, omitted_quota),
        (OMITTED_METADATA_KEY, omitted_metadata),
    ):
        if count:
            info.metadata[key] = str(count)

    status = _assemble(base, info, violations, retry, quota)
    if status.ByteSize() > MAX_STATUS_BYTES:
        # The budget above is exact but for a few bytes of envelopes; never risk the trailer.
        info.metadata[OMITTED_VIOLATIONS_KEY] = str(len(error.field_violations))
        info.metadata[OMITTED_QUOTA_VIOLATIONS_KEY] = str(len(error.quota_violations))
        status = _assemble(base, info, [], retry, [])
    return rpc_status.to_status(status)


def _assemble(
    base: status_pb2.Status,
    info: error_details_pb2.ErrorInfo,
    violations: list[Any],
    retry: error_details_pb2.RetryInfo | None,
    quota: list[Any],
) -> status_pb2.Status:
    details = [_pack(info)]
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if retry is not None:
        details.append(_pack(retry))
    if quota:
        details.append(_pack(error_details_pb2.QuotaFailure(violations=quota)))
    return status_pb2.Status(code=base.code, message=base.message, details=details)


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a client learns from a failed call: code, reason, domain and the rich details."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    domain: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: Sequence[FieldViolation] = ()
    retry_after: timedelta | None = None
    quota_violations: Sequence[QuotaViolation] = ()


def _trailing_status(rpc_error: grpc.RpcError) -> Any:
    trailing = getattr(rpc_error, "trailing_metadata", None)
    pairs = trailing() if callable(trailing) else None
    for key, value in pairs or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def error_details(rpc_error: grpc.RpcError) -> ErrorDetails:
    """Parse the rich status a server attached to ``rpc_error`` (sync or ``grpc.aio`` error).

    The first ``ErrorInfo`` gives reason and domain; a status without details still yields its
    code and message so callers can always branch on ``code``.
    """
    code_fn = getattr(rpc_error, "code", None)
    details_fn = getattr(rpc_error, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or ""
    status = _trailing_status(rpc_error)
    if status is None:
        return ErrorDetails(code=code, message=message)

    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: timedelta | None = None
    quota: list[QuotaViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            if reason is None:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta()
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota.extend(QuotaViolation(v.subject, v.description) for v in failure.violations)
    return ErrorDetails(
        code=code,
        message=message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(violations),
        retry_after=retry_after,
        quota_violations=tuple(quota),
    )
