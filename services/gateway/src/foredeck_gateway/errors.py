"""The gateway's public error catalogue (``foredeck.gateway.v1.ErrorReason``) as typed errors.

Every failure the gateway returns on purpose is a :class:`~foredeck_kit.errors.ServiceError`
built here, so the code that goes with each reason is written once.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import grpc

from foredeck_kit.errors import Reason, ServiceError, domain_for

__all__ = ["DOMAIN", "GatewayReason"]

DOMAIN = domain_for("gateway")

_UNAUTH = grpc.StatusCode.UNAUTHENTICATED
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class GatewayReason:
    """Constructors of the gateway's own errors, one per reason."""

    @staticmethod
    def credentials_missing() -> ServiceError:
        return ServiceError(_UNAUTH, "CREDENTIALS_MISSING", "credentials missing")

    @staticmethod
    def credentials_malformed() -> ServiceError:
        return ServiceError(_UNAUTH, "CREDENTIALS_MALFORMED", "credentials malformed")

    @staticmethod
    def api_key_invalid() -> ServiceError:
        return ServiceError(_UNAUTH, "API_KEY_INVALID", "API key invalid")

    @staticmethod
    def api_key_revoked(api_key_id: str) -> ServiceError:
        return ServiceError(
            _UNAUTH, "API_KEY_REVOKED", "API key revoked", metadata={"apiKeyId": api_key_id}
        )

    @staticmethod
    def api_key_expired(api_key_id: str) -> ServiceError:
        return ServiceError(
            _UNAUTH, "API_KEY_EXPIRED", "API key expired", metadata={"apiKeyId": api_key_id}
        )

    @staticmethod
    def jwt_invalid(check: str) -> ServiceError:
        return ServiceError(_UNAUTH, "JWT_INVALID", "token invalid", metadata={"check": check})

    @staticmethod
    def jwt_expired() -> ServiceError:
        return ServiceError(_UNAUTH, "JWT_EXPIRED", "token expired")

    @staticmethod
    def admin_required() -> ServiceError:
        return ServiceError(
            grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED", "admin credential required"
        )

    @staticmethod
    def rate_limited(scope: str, subject: str, limit: int, retry_after: timedelta) -> ServiceError:
        return ServiceError(
            _EXHAUSTED,
            "RATE_LIMITED",
            f"{scope} rate limit reached",
            metadata={"scope": scope, "limit": str(limit)},
            retry_after=retry_after,
            quota_violations=[(subject, f"more than {limit} requests per minute")],
        )

    @staticmethod
    def concurrency_limited(
        scope: str, subject: str, limit: int, retry_after: timedelta, upstream: str | None = None
    ) -> ServiceError:
        metadata = {"scope": scope, "limit": str(limit)}
        if upstream:
            metadata["upstreamReason"] = upstream
        return ServiceError(
            _EXHAUSTED,
            "CONCURRENCY_LIMITED",
            "too many unfinished runs",
            metadata=metadata,
            retry_after=retry_after,
            quota_violations=[(subject, f"at most {limit} unfinished runs")],
        )

    @staticmethod
    def budget_exhausted(
        budget_id: str, limit: str, remaining: int, retry_after: timedelta | None
    ) -> ServiceError:
        return ServiceError(
            _EXHAUSTED,
            "BUDGET_EXHAUSTED",
            "budget exhausted",
            metadata={"budgetId": budget_id, "limit": limit, "remaining": str(remaining)},
            retry_after=retry_after,
            quota_violations=[(f"budget:{budget_id}", f"too little {limit} left for the run")],
        )

    @staticmethod
    def budget_invalid(violations: Iterable[tuple[str, str]]) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "BUDGET_INVALID",
            "budget invalid",
            field_violations=list(violations),
        )

    @staticmethod
    def rate_limiter_unavailable(route: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "RATE_LIMITER_UNAVAILABLE",
            "rate limiter unavailable",
            metadata={"route": route},
            retry_after=timedelta(seconds=1),
        )

    @staticmethod
    def store_unavailable() -> ServiceError:
        return ServiceError.store_unavailable("redis")

    @staticmethod
    def run_not_found(run_id: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", "run not found", metadata={"runId": run_id}
        )

    @staticmethod
    def api_key_not_found(api_key_id: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            "API_KEY_NOT_FOUND",
            "API key not found",
            metadata={"apiKeyId": api_key_id},
        )

    @staticmethod
    def budget_not_found(budget_id: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            "BUDGET_NOT_FOUND",
            "budget not found",
            metadata={"budgetId": budget_id},
        )

    @staticmethod
    def etag_mismatch(budget_id: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
            "etag is not current",
            metadata={"budgetId": budget_id},
        )

    @staticmethod
    def invalid(violations: Iterable[tuple[str, str]]) -> ServiceError:
        return ServiceError.invalid_request(list(violations))

    @staticmethod
    def orchestrator_unavailable(upstream: str | None = None) -> ServiceError:
        metadata = {"upstreamReason": upstream} if upstream else {}
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "ORCHESTRATOR_UNAVAILABLE",
            "orchestrator unavailable",
            metadata=metadata,
            retry_after=timedelta(seconds=1),
        )

    @staticmethod
    def orchestrator_timeout(upstream: str | None = None) -> ServiceError:
        metadata = {"upstreamReason": upstream} if upstream else {}
        return ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "ORCHESTRATOR_TIMEOUT",
            "orchestrator did not answer in time",
            metadata=metadata,
        )


SHARED = frozenset(reason.value for reason in Reason)
