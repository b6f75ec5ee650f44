"""Admission: who is calling, may they, and is there room — one Redis round trip per call.

:class:`Gate` reads the credential, verifies a JWT locally (an API key is looked up by the
admission script itself), checks the RPC's permission, runs the admission script (request
windows of key, user and tenant; for a run also the request id, the user's concurrency cap and
the budget reservations), mints the signed principal for the downstream call and counts the
decision in ``gateway_admission_decisions_total{outcome}``. When Redis does not answer within
its timeout, a route listed in ``fail_open_routes`` is admitted unchecked and every other route
is refused with ``RATE_LIMITER_UNAVAILABLE``.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter

from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.credentials import JwtVerifier, hash_secret, parse_authorization
from foredeck_gateway.errors import GatewayReason
from foredeck_gateway.store import Admission, RedisState, Refusal, StoreDown
from foredeck_kit.context import current_rpc
from foredeck_kit.errors import ServiceError
from foredeck_kit.principal import Principal, PrincipalKind, PrincipalSigner

__all__ = ["AdmissionMetrics", "Caller", "Gate", "RunAdmission"]

_PRINCIPAL_CACHE = 4096
_MIN_DEADLINE = timedelta(milliseconds=10)
_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


class AdmissionMetrics:
    """``gateway_admission_decisions_total{outcome}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # One counter per registry: hosts that share a registry (a restart in one process)
        # share the counter instead of registering it twice.
        existing = _COUNTERS.get(registry)
        if existing is None:
            existing = Counter(
                "gateway_admission_decisions_total",
                "Admission decisions of the gateway, by outcome.",
                ["outcome"],
                registry=registry,
            )
            _COUNTERS[registry] = existing
        self.decisions = existing

    def count(self, outcome: str) -> None:
        self.decisions.labels(outcome).inc()


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated and admitted caller, with the principal minted for its call."""

    admission: Admission
    credential_kind: str
    principal_token: str
    principal: Principal
    checked: bool = True
    """False when the call was admitted unchecked because Redis was unreachable."""

    @property
    def tenant_id(self) -> str:
        return self.admission.tenant_id

    @property
    def user_id(self) -> str:
        return self.admission.user_id

    def has(self, permission: str) -> bool:
        return self.principal.has(permission)


@dataclass(frozen=True, slots=True)
class RunAdmission:
    """What CreateRun and ForkRun ask admission to reserve."""

    reservation_id: str
    request_id: str
    fingerprint: str
    tokens: int
    cost: int


@dataclass(slots=True)
class _CachedKey:
    admission: Admission
    seen: float


@dataclass(slots=True)
class _PrincipalCache:
    entries: OrderedDict[tuple[Any, ...], tuple[str, Principal, float]] = field(
        default_factory=OrderedDict
    )


class Gate:
    """Authentication, permission, limits and principal minting for every call."""

    def __init__(
        self,
        settings: GatewaySettings,
        state: RedisState,
        jwt_verifier: JwtVerifier,
        signer: PrincipalSigner,
        metrics: AdmissionMetrics,
    ) -> None:
        self._s = settings
        self._state = state
        self._jwt = jwt_verifier
        self._signer = signer
        self._metrics = metrics
        self._admins = settings.admin_hashes()
        self._fail_open = frozenset(settings.fail_open_routes)
        self._defaults = (
            settings.default_key_requests_per_minute,
            settings.default_user_requests_per_minute,
            settings.default_tenant_requests_per_minute,
            settings.default_max_concurrent_runs,
        )
        self._keys: OrderedDict[str, _CachedKey] = OrderedDict()
        self._principals = _PrincipalCache()
        self._ttl = settings.principal_ttl_seconds

    def fails_open(self, route: str) -> bool:
        return route in self._fail_open

    # -- the one entry point -----------------------------------------------------------------

    async def admit(
        self,
        metadata: Any,
        route: str,
        permission: str,
        *,
        admin: bool = False,
        run: RunAdmission | None = None,
    ) -> Caller:
        """Authenticate, authorise and admit a call of ``route`` (a method name)."""
        state = current_rpc()
        remaining = state.time_remaining() if state is not None else None
        if remaining is not None and remaining < _MIN_DEADLINE.total_seconds():
            # Nothing is counted or reserved for a call whose caller has already given up.
            self._metrics.count("deadline_too_short")
            raise ServiceError.deadline_too_short(_MIN_DEADLINE)
        try:
            credential = parse_authorization(metadata)
        except ServiceError:
            self._metrics.count("unauthenticated")
            raise
        key_hash = ""
        identity = None
        if credential.kind == "api_key":
            key_hash = hash_secret(credential.secret)
            # The configured admin digests open AdminService only; anything else the key
            # does goes through Redis like any key's.
            if admin and key_hash in self._admins:
                return self._bootstrap_admin()
        else:
            try:
                if not self._jwt.configured:
                    raise GatewayReason.jwt_invalid("key")
                identity = self._jwt.verify(credential.secret)
            except ServiceError:
                self._metrics.count("unauthenticated")
                raise
            if admin and identity.kind is not PrincipalKind.ADMIN:
                self._metrics.count("permission_denied")
                raise GatewayReason.admin_required()
            if permission and not _grants(identity.permissions, permission):
                self._metrics.count("permission_denied")
                raise ServiceError.permission_missing(permission)

        op = "auth" if admin else ("run" if run is not None else "call")
        try:
            result = await self._state.admit(
                op=op,
                key_hash=key_hash,
                permission="!admin" if admin else permission,
                tenant_id=identity.tenant_id if identity else "",
                user_id=identity.user_id if identity else "",
                kind=identity.kind.value if identity else "user",
                permissions=identity.permissions if identity else (),
                defaults=self._defaults,
                reservation_id=run.reservation_id if run else "",
                request_id=run.request_id if run else "",
                fingerprint=run.fingerprint if run else "",
                run_caps=(run.tokens, run.cost) if run else (0, 0),
                default_caps=(self._s.default_run_tokens, self._s.default_run_cost_usd_micros),
                lease_ms=self._s.submit_grace_seconds * 1000,
            )
        except StoreDown:
            return self._unchecked(route, key_hash, identity, admin, permission)
        if isinstance(result, Refusal):
            raise self._refused(result)
        if key_hash and self._s.api_key_cache_seconds > 0:
            self._remember_key(key_hash, result)
        outcome = "admitted"
        if result.reservation == "existing":
            outcome = "admitted_retry"
        self._metrics.count(outcome)
        return self._caller(result, "jwt" if identity else "api_key")

    # -- pieces ------------------------------------------------------------------------------

    def _bootstrap_admin(self) -> Caller:
        admission = Admission(
            tenant_id=self._s.admin_tenant,
            user_id="admin",
            kind="admin",
            permissions=("*",),
            api_key_id="bootstrap-admin",
            key_rpm=0,
            user_rpm=0,
            tenant_rpm=0,
            max_concurrent_runs=self._s.default_max_concurrent_runs,
            run_budget=(0, 0, 0, 0, 0, 0),
            budget_ids=(),
        )
        self._metrics.count("admitted")
        return self._caller(admission, "api_key")

    def _remember_key(self, key_hash: str, admission: Admission) -> None:
        self._keys[key_hash] = _CachedKey(
            replace(admission, reservation="", reservation_id=""), time.monotonic()
        )
        self._keys.move_to_end(key_hash)
        while len(self._keys) > _PRINCIPAL_CACHE:
            self._keys.popitem(last=False)

    def _unchecked(
        self, route: str, key_hash: str, identity: Any, admin: bool, permission: str
    ) -> Caller:
        """Redis is unreachable: admit unchecked on a fail-open route, refuse otherwise."""
        if admin or not self.fails_open(route):
            self._metrics.count("fail_closed")
            if admin:
                raise GatewayReason.store_unavailable()
            raise GatewayReason.rate_limiter_unavailable(
                f"foredeck.gateway.v1.GatewayService/{route}"
            )
        if identity is not None:
            admission = Admission(
                tenant_id=identity.tenant_id,
                user_id=identity.user_id,
                kind=identity.kind.value,
                permissions=identity.permissions,
                api_key_id="",
                key_rpm=self._defaults[0],
                user_rpm=self._defaults[1],
                tenant_rpm=self._defaults[2],
                max_concurrent_runs=self._defaults[3],
                run_budget=(0, 0, 0, 0, 0, 0),
                budget_ids=(),
            )
            self._metrics.count("fail_open")
            return self._caller(admission, "jwt", checked=False)
        cached = self._keys.get(key_hash)
        if cached is None or time.monotonic() - cached.seen > self._s.api_key_cache_seconds:
            # A key never seen cannot be authenticated without Redis.
            self._metrics.count("fail_closed")
            raise GatewayReason.store_unavailable()
        if permission and not _grants(cached.admission.permissions, permission):
            self._metrics.count("permission_denied")
            raise ServiceError.permission_missing(permission)
        self._metrics.count("fail_open")
        return self._caller(cached.admission, "api_key", checked=False)

    def _refused(self, refusal: Refusal) -> ServiceError:
        kind, values = refusal.kind, refusal.values
        if kind == "invalid":
            self._metrics.count("unauthenticated")
            return GatewayReason.api_key_invalid()
        if kind == "revoked":
            self._metrics.count("unauthenticated")
            return GatewayReason.api_key_revoked(values[0])
        if kind == "expired":
            self._metrics.count("unauthenticated")
            return GatewayReason.api_key_expired(values[0])
        if kind == "admin":
            self._metrics.count("permission_denied")
            return GatewayReason.admin_required()
        if kind == "perm":
            self._metrics.count("permission_denied")
            return ServiceError.permission_missing(values[0])
        if kind == "rate":
            self._metrics.count("rate_limited")
            scope, subject, limit, retry_ms = values
            return GatewayReason.rate_limited(
                scope, subject, int(limit), timedelta(milliseconds=max(int(retry_ms), 1))
            )
        if kind == "conc":
            self._metrics.count("concurrency_limited")
            return GatewayReason.concurrency_limited(
                "user", values[0], int(values[1]), timedelta(seconds=1)
            )
        if kind == "budget":
            self._metrics.count("budget_exhausted")
            budget_id, limit, remaining, retry_ms = values
            retry = timedelta(milliseconds=int(retry_ms)) if int(retry_ms) > 0 else None
            return GatewayReason.budget_exhausted(budget_id, limit, max(int(remaining), 0), retry)
        if kind == "reused":
            self._metrics.count("request_id_reused")
            state = current_rpc()
            return ServiceError.request_id_reused(state.request_id or "" if state else "")
        self._metrics.count("error")
        return ServiceError.internal()

    def _caller(self, admission: Admission, kind: str, *, checked: bool = True) -> Caller:
        token, principal = self.mint(
            admission.tenant_id,
            admission.user_id,
            admission.permissions,
            admission.budget_ids,
            admission.kind,
        )
        caller = Caller(admission, kind, token, principal, checked)
        state = current_rpc()
        if state is not None:
            state.principal = principal
            fields = state.log_fields or {}
            fields["credential"] = kind
            if admission.api_key_id:
                fields["api_key_id"] = admission.api_key_id
            state.log_fields = fields
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "foredeck.tenant_id": admission.tenant_id,
                    "enduser.id": admission.user_id,
                    "foredeck.api_key_id": admission.api_key_id,
                }
            )
        return caller

    def mint(
        self,
        tenant_id: str,
        user_id: str,
        permissions: Sequence[str],
        budget_ids: Sequence[str],
        kind: str,
    ) -> tuple[str, Principal]:
        """A principal for the caller, reused while more than half its life is left."""
        key = (tenant_id, user_id, tuple(permissions), tuple(budget_ids), kind)
        now = time.monotonic()
        cached = self._principals.entries.get(key)
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        principal_kind = PrincipalKind(kind) if kind else PrincipalKind.USER
        token = self._signer.mint(
            tenant_id=tenant_id,
            user_id=user_id,
            permissions=permissions,
            budget_ids=budget_ids,
            kind=principal_kind,
        )
        from datetime import UTC, datetime

        principal = Principal(
            tenant_id=tenant_id,
            user_id=user_id,
            permissions=frozenset(permissions),
            budget_ids=tuple(budget_ids),
            kind=principal_kind,
            expires_at=datetime.now(UTC) + timedelta(seconds=self._ttl),
            token_id="",
        )
        entries = self._principals.entries
        entries[key] = (token, principal, now + self._ttl / 2)
        entries.move_to_end(key)
        while len(entries) > _PRINCIPAL_CACHE:
            entries.popitem(last=False)
        return token, principal


def _grants(granted: Collection[str], permission: str) -> bool:
    if permission in granted or "*" in granted:
        return True
    return any(g.endswith(":*") and permission.startswith(g[:-1]) for g in granted)
