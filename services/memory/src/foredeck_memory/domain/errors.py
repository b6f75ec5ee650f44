"""Typed failures of the memory domain, turned into rich gRPC statuses by the servicer.

The domain stays free of gRPC: a :class:`Fault` names its kind (the canonical code family) and
its reason from the ``foredeck.memory.v1.ErrorReason`` catalogue; ``servicer.py`` maps kinds to
status codes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import timedelta


class FaultKind(enum.Enum):
    """The family of a failure; one canonical gRPC code each."""

    INVALID = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE = "DEADLINE_EXCEEDED"


class Fault(Exception):
    """A failure the service returns on purpose, with a reason from the error catalogue."""

    def __init__(
        self,
        kind: FaultKind,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        retry_after: timedelta | None = None,
        quota_violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_after = retry_after
        self.quota_violations = list(quota_violations)


class StoreDown(Exception):
    """A store adapter could not reach its store; carries which store for the error reason."""

    def __init__(self, store: str, cause: BaseException | None = None) -> None:
        super().__init__(f"{store} unavailable")
        self.store = store
        self.cause = cause


STORE_REASONS = {
    "redis": "STORE_UNAVAILABLE",
    "qdrant": "VECTOR_STORE_UNAVAILABLE",
    "neo4j": "GRAPH_STORE_UNAVAILABLE",
}


def store_unavailable(store: str, retry_after: timedelta) -> Fault:
    """UNAVAILABLE for a store this service owns, with the store's own reason and RetryInfo."""
    return Fault(
        FaultKind.UNAVAILABLE,
        STORE_REASONS[store],
        f"{store} unavailable",
        metadata={"store": store},
        retry_after=retry_after,
    )


def invalid(violations: Iterable[tuple[str, str]]) -> Fault:
    """INVALID_REQUEST with one BadRequest violation per bad field."""
    listed = list(violations)
    return Fault(FaultKind.INVALID, "INVALID_REQUEST", "invalid request", field_violations=listed)


def content_empty(field: str) -> Fault:
    """The memory content or the query is empty or only whitespace."""
    return Fault(
        FaultKind.INVALID,
        "CONTENT_EMPTY",
        f"{field} is empty",
        metadata={"field": field},
        field_violations=[(field, "must not be empty or only whitespace")],
    )


def content_too_large(field: str, limit: int, actual: int) -> Fault:
    """The memory content or the query is over its byte limit."""
    return Fault(
        FaultKind.INVALID,
        "CONTENT_TOO_LARGE",
        f"{field} is over its size limit",
        metadata={"field": field, "limitBytes": str(limit), "actualBytes": str(actual)},
        field_violations=[(field, f"{actual} bytes is over the limit of {limit}")],
    )


def request_too_large(field: str, limit: int, actual: int) -> Fault:
    """A field other than content is over its documented size limit."""
    return Fault(
        FaultKind.INVALID,
        "REQUEST_TOO_LARGE",
        f"{field} is over its size limit",
        metadata={"field": field, "limit": str(limit), "actual": str(actual)},
        field_violations=[(field, f"size {actual} is over the limit of {limit}")],
    )


def limit_out_of_range(field: str, value: int, low: int, high: int) -> Fault:
    """A result limit outside its documented range."""
    return Fault(
        FaultKind.INVALID,
        "LIMIT_OUT_OF_RANGE",
        f"{field} must be between {low} and {high}",
        metadata={"field": field, "limit": str(value), "min": str(low), "max": str(high)},
        field_violations=[(field, f"must be between {low} and {high}")],
    )


def depth_out_of_range(field: str, value: int, low: int, high: int) -> Fault:
    """A neighbourhood depth outside 1..3."""
    return Fault(
        FaultKind.INVALID,
        "DEPTH_OUT_OF_RANGE",
        f"depth must be between {low} and {high}",
        metadata={"depth": str(value), "min": str(low), "max": str(high)},
        field_violations=[(field, f"must be between {low} and {high}")],
    )


def entity_type_unknown(fields: Iterable[tuple[str, str]], allowed: Iterable[str]) -> Fault:
    """Entity types that are not configured; ``fields`` lists (path, type) pairs."""
    listed = list(fields)
    return Fault(
        FaultKind.INVALID,
        "ENTITY_TYPE_UNKNOWN",
        "unknown entity type",
        metadata={"entityType": listed[0][1], "allowedTypes": ",".join(allowed)},
        field_violations=[(path, f"unknown entity type {value!r}") for path, value in listed],
    )


def relationship_type_invalid(fields: Iterable[tuple[str, str]]) -> Fault:
    """Relationship types that are malformed or not configured."""
    listed = list(fields)
    return Fault(
        FaultKind.INVALID,
        "RELATIONSHIP_TYPE_INVALID",
        "invalid relationship type",
        metadata={"relationshipType": listed[0][1]},
        field_violations=[(path, "not an accepted UPPER_SNAKE_CASE type") for path, _ in listed],
    )


def validity_range_invalid(field: str, description: str) -> Fault:
    """An empty or inverted validity interval."""
    return Fault(
        FaultKind.INVALID,
        "VALIDITY_RANGE_INVALID",
        "invalid validity range",
        metadata={"field": field},
        field_violations=[(field, description)],
    )


def page_token_invalid() -> Fault:
    """A page token that is malformed or from another request."""
    return Fault(
        FaultKind.INVALID,
        "PAGE_TOKEN_INVALID",
        "invalid page token; restart from the first page",
        field_violations=[("page_token", "malformed, expired or from a different request")],
    )


def memory_not_found(memory_id: str) -> Fault:
    """No such memory for this tenant and user."""
    return Fault(
        FaultKind.NOT_FOUND,
        "MEMORY_NOT_FOUND",
        "memory not found",
        metadata={"memoryId": memory_id},
    )


def entity_not_found(entity_type: str, entity_id: str) -> Fault:
    """No such entity in this tenant (at the requested time)."""
    return Fault(
        FaultKind.NOT_FOUND,
        "ENTITY_NOT_FOUND",
        "entity not found",
        metadata={"entityType": entity_type, "entityId": entity_id},
    )


def session_not_found(session_id: str) -> Fault:
    """No such working-memory session for this tenant and user."""
    return Fault(
        FaultKind.NOT_FOUND,
        "SESSION_NOT_FOUND",
        "session not found",
        metadata={"sessionId": session_id},
    )


def request_id_reused(request_id: str) -> Fault:
    """A request id came back with a different request."""
    return Fault(
        FaultKind.PRECONDITION,
        "REQUEST_ID_REUSED",
        "request_id was already used for a different request",
        metadata={"requestId": request_id},
    )


def memory_quota_exceeded(
    subject: str, subject_id: str, limit: int, held: int, asked: int
) -> Fault:
    """The tenant or the user holds too many memory versions to add ``asked`` more."""
    return Fault(
        FaultKind.EXHAUSTED,
        "MEMORY_QUOTA_EXCEEDED",
        f"the {subject} holds the maximum number of long-term memories",
        metadata={"quota": "memories", "limit": str(limit), "subject": subject},
        quota_violations=[
            (
                f"{subject}:{subject_id}",
                f"long-term memories per {subject}: {held} held, {asked} more asked, limit {limit}",
            )
        ],
    )
