"""The signed principal: who is calling, minted by the gateway and verified by every service.

It is an HS256 JWT so services in any language can verify it with a stock library. Claims:
``iss``, ``aud``, ``sub`` (user id), ``tid`` (tenant id), ``scope`` (permissions, separated by
spaces; omitted when there are none), ``bud`` (budget ids; omitted when empty), ``kind``
(``service`` or ``admin``; omitted for a user), ``iat``, ``exp``, ``jti``; the header's ``kid``
names the key so keys can rotate without downtime.

Two issuers sign principals, each with its own keys. The gateway (``foredeck-gateway``) mints
one for every authenticated call. The orchestrator (``foredeck-orchestrator``) mints delegated
principals for the downstream calls of a run that may outlive the gateway's principal by days;
they carry ``act: {"sub": "orchestrator"}`` (RFC 8693) and ``rid`` (the run id), see
:mod:`foredeck_kit.delegation`.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from foredeck_kit import _jws
from foredeck_kit.errors import ServiceError

__all__ = [
    "ALGORITHM",
    "DEFAULT_ACTOR",
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "DEFAULT_MAX_LIFETIME",
    "DELEGATION_ISSUER",
    "MAX_TOKEN_CHARS",
    "MIN_KEY_BYTES",
    "PRINCIPAL_METADATA_KEY",
    "Principal",
    "PrincipalKind",
    "PrincipalSigner",
    "PrincipalVerifier",
    "current_principal",
    "format_keys",
    "generate_key",
    "optional_principal",
    "parse_keys",
    "principal_scope",
]

PRINCIPAL_METADATA_KEY = "x-foredeck-principal"
"""gRPC metadata key that carries the principal token."""

ALGORITHM = _jws.ALGORITHM
DEFAULT_ISSUER = "foredeck-gateway"
"""Issuer of the principals the gateway mints for authenticated callers."""
DELEGATION_ISSUER = "foredeck-orchestrator"
"""Issuer of the delegated principals the orchestrator mints for a run's downstream calls."""
DEFAULT_ACTOR = "orchestrator"
"""``act.sub`` of a delegated principal: who acts on the caller's behalf."""
DEFAULT_AUDIENCE = "foredeck-internal"
DEFAULT_MAX_LIFETIME = timedelta(minutes=15)
"""Longest ``exp - iat`` a principal may have; a leaked token is useless soon after."""
MIN_KEY_BYTES = _jws.MIN_KEY_BYTES
MAX_TOKEN_CHARS = 2048
"""Longest token accepted; a principal with ten permissions and two budgets is ~570."""

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "foredeck_principal", default=None
)


class PrincipalKind(enum.StrEnum):
    """What kind of caller a principal stands for."""

    USER = "user"
    SERVICE = "service"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: tenant, user, permissions and budgets, valid until ``expires_at``.

    ``actor`` and ``run_id`` are set on a delegated principal only: the orchestrator acting
    for this caller in run ``run_id``.
    """

    tenant_id: str
    user_id: str
    permissions: frozenset[str]
    budget_ids: tuple[str, ...]
    kind: PrincipalKind
    expires_at: datetime
    token_id: str
    actor: str | None = None
    run_id: str | None = None

    @property
    def delegated(self) -> bool:
        """Whether the principal was minted by the orchestrator for a run, not by the gateway."""
        return self.actor is not None

    def has(self, permission: str) -> bool:
        """Whether a permission is granted, directly or by ``*`` / ``prefix:*`` wildcards."""
        if permission in self.permissions or "*" in self.permissions:
            return True
        return any(
            granted.endswith(":*") and permission.startswith(granted[:-1])
            for granted in self.permissions
        )

    def require(self, permission: str) -> None:
        """Raise PERMISSION_DENIED (``PERMISSION_MISSING``) unless ``permission`` is granted."""
        if not self.has(permission):
            raise ServiceError.permission_missing(permission)

    def require_run(self, run_id: str, *, required: bool = False) -> None:
        """Raise PERMISSION_DENIED (``DELEGATION_NOT_ALLOWED``) if a delegated principal
        names a run other than its own.

        A run acts only for itself: where a request names a run (``run_id``,
        ``parent_run_id``…), it must be empty or the principal's run, and with ``required``
        it must be the principal's run. A gateway principal may name any run.
        """
        if self.run_id is None:
            return
        if run_id != self.run_id and (run_id or required):
            raise ServiceError.delegation_not_allowed()


def generate_key() -> bytes:
    """Return a fresh random signing secret of the minimum accepted length."""
    return secrets.token_urlsafe(MIN_KEY_BYTES).encode()


def parse_keys(spec: str) -> dict[str, bytes]:
    """Parse ``"kid1:secret1,kid2:secret2"`` into ``{kid: secret}``, in the order given.

    Secrets shorter than 32 bytes are refused: HS256 is only as strong as its key. Signers
    use the first key; verifiers accept every key listed.
    """
    keys: dict[str, bytes] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        kid, sep, secret = item.partition(":")
        kid = kid.strip()
        if not sep or not kid:
            raise ValueError("principal keys must look like 'kid:secret,kid2:secret2'")
        if kid in keys:
            raise ValueError(f"principal key id {kid!r} appears twice")
        encoded = secret.strip().encode()
        if len(encoded) < MIN_KEY_BYTES:
            raise ValueError(
                f"principal key {kid!r} is {len(encoded)} bytes; at least {MIN_KEY_BYTES} needed"
            )
        keys[kid] = encoded
    if not keys:
        raise ValueError("no principal keys given")
    return keys


def format_keys(keys: Mapping[str, bytes]) -> str:
    """Inverse of :func:`parse_keys`, for writing keys into a child process's environment."""
    return ",".join(f"{kid}:{secret.decode()}" for kid, secret in keys.items())


def _check_permissions(permissions: Iterable[str]) -> list[str]:
    listed = list(permissions)
    for permission in listed:
        # Permissions travel space-separated in ``scope``: whitespace would split one in two.
        if not isinstance(permission, str) or permission.split() != [permission]:
            raise ValueError(f"permission {permission!r} must be a non-empty word without spaces")
    return sorted(set(listed))


def _check_budgets(budget_ids: Iterable[str]) -> list[str]:
    listed = list(budget_ids)
    if not all(isinstance(budget, str) and budget for budget in listed):
        raise ValueError("budget ids must be non-empty strings")
    return listed


def _lifetime_seconds(ttl: timedelta, max_lifetime: timedelta) -> int:
    seconds = int(ttl.total_seconds())
    if seconds <= 0:
        raise ValueError("principal ttl must be at least one second")
    if ttl > max_lifetime:
        raise ValueError(f"principal ttl {ttl} is over the maximum lifetime {max_lifetime}")
    return seconds


def _token_id() -> str:
    return secrets.token_urlsafe(16)


def _sign_principal(
    keys: Mapping[str, bytes],
    kid: str,
    *,
    issuer: str,
    audience: str,
    tenant_id: str,
    user_id: str,
    permissions: Iterable[str],
    budget_ids: Iterable[str],
    kind: PrincipalKind,
    lifetime: int,
    now: datetime | None,
    delegation: tuple[str, str] | None = None,
) -> str:
    """Sign a principal; ``delegation`` is ``(actor, run_id)`` for an orchestrator's principal.

    Empty claims are left out: every call carries the token, so its size is paid many times.
    """
    if not tenant_id or not user_id:
        raise ValueError("tenant_id and user_id are required")
    issued = int((now or datetime.now(UTC)).timestamp())
    claims: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": user_id, "tid": tenant_id}
    scope = _check_permissions(permissions)
    if scope:
        claims["scope"] = " ".join(scope)
    budgets = _check_budgets(budget_ids)
    if budgets:
        claims["bud"] = budgets
    kind = PrincipalKind(kind)
    if kind is not PrincipalKind.USER:
        claims["kind"] = kind.value
    if delegation is not None:
        actor, run_id = delegation
        claims["act"] = {"sub": actor}
        claims["rid"] = run_id
    claims.update(iat=issued, exp=issued + lifetime, jti=_token_id())
    token = _jws.encode(claims, keys[kid], kid)
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(
            f"principal token is {len(token)} characters, over {MAX_TOKEN_CHARS}: "
            "grant wildcard permissions (e.g. 'tools:*') instead of long lists"
        )
    return token


class PrincipalSigner:
    """Mints principal tokens with the active key; used by the gateway and by test helpers."""

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active_kid: str,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        ttl: timedelta = timedelta(minutes=5),
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
    ) -> None:
        self._keys = _jws.check_keys(keys)
        if active_kid not in self._keys:
            raise ValueError(f"active key id {active_kid!r} is not among the keys")
        _lifetime_seconds(ttl, max_lifetime)
        self._kid = active_kid
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl
        self._max_lifetime = max_lifetime

    def mint(
        self,
        *,
        tenant_id: str,
        user_id: str,
        permissions: Iterable[str] = (),
        budget_ids: Iterable[str] = (),
        kind: PrincipalKind = PrincipalKind.USER,
        ttl: timedelta | None = None,
        now: datetime | None = None,
    ) -> str:
        """Return a signed token for the given caller, valid for ``ttl`` from ``now``.

        Refuses (ValueError) a ``ttl`` over the maximum lifetime, permissions with spaces,
        and a token longer than :data:`MAX_TOKEN_CHARS`.
        """
        return _sign_principal(
            self._keys,
            self._kid,
            issuer=self._issuer,
            audience=self._audience,
            tenant_id=tenant_id,
            user_id=user_id,
            permissions=permissions,
            budget_ids=budget_ids,
            kind=kind,
            lifetime=_lifetime_seconds(self._ttl if ttl is None else ttl, self._max_lifetime),
            now=now,
        )


class _Expired(_jws.Rejected):
    """Genuine and well formed, but past its expiry."""


def _normalise_method(method: str) -> str:
    return "/" + method.lstrip("/")


def _log_rejection(cause: str) -> None:
    # The wire message is the same for every failure, so the cause is only ever logged, and
    # only at debug level: it is the caller's problem, not the service's.
    logger = logging.getLogger("foredeck.principal")
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("principal rejected: %s", cause)


class PrincipalVerifier:
    """Verifies principal tokens of the gateway and, if configured, of the orchestrator.

    Each issuer has its own key set and a token is accepted only when the key its ``kid``
    names belongs to the issuer it claims. Checks: HS256 only, known key id, signature,
    issuer, audience, ``iat``/``exp``/``nbf`` plausibility, a lifetime of at most
    ``max_lifetime``, claim types, expiry (with ``leeway`` for clock skew). Methods in
    ``gateway_only_methods`` (full names, ``/package.Service/Method``) refuse delegated
    principals with PERMISSION_DENIED ``DELEGATION_NOT_ALLOWED``.

    One token is typically sent on many calls, so tokens that passed are remembered, up to
    ``cache_size`` (least recently used dropped first), and then only their expiry is checked
    again. ``clock`` (seconds since the epoch) exists for tests.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway: timedelta = timedelta(seconds=5),
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
        delegation_keys: Mapping[str, bytes] | None = None,
        delegation_issuer: str = DELEGATION_ISSUER,
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
        gateway_only_methods: Collection[str] = (),
    ) -> None:
        gateway = _jws.check_keys(keys)
        self._keys: dict[str, bytes] = dict(gateway)
        self._issuer_of: dict[str, str] = dict.fromkeys(gateway, issuer)
        if delegation_keys is not None:
            delegated = _jws.check_keys(delegation_keys, "delegation")
            shared = sorted(gateway.keys() & delegated.keys())
            if shared:
                raise ValueError(
                    f"key ids {shared} appear among both the principal and the delegation keys; "
                    "each issuer needs key ids of its own"
                )
            if delegation_issuer == issuer:
                raise ValueError("the delegation issuer must differ from the principal issuer")
            self._keys.update(delegated)
            self._issuer_of.update(dict.fromkeys(delegated, delegation_issuer))
        if max_lifetime <= timedelta(0):
            raise ValueError("max_lifetime must be positive")
        self._delegation_issuer = delegation_issuer
        self._audience = audience
        self._leeway = leeway.total_seconds()
        self._max_lifetime = max_lifetime.total_seconds()
        self._gateway_only = frozenset(_normalise_method(m) for m in gateway_only_methods)
        self._cache: OrderedDict[str, tuple[Principal, int]] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock

    def requires_gateway(self, method: str) -> bool:
        """Whether ``method`` refuses delegated principals."""
        return _normalise_method(method) in self._gateway_only

    def verify(self, token: str, *, method: str | None = None) -> Principal:
        """Return the principal in ``token`` or raise.

        UNAUTHENTICATED with reason ``PRINCIPAL_EXPIRED`` for a genuine but expired token and
        ``PRINCIPAL_INVALID`` for anything else, always with the same message; the specific
        cause is logged at debug level. With ``method``, a delegated principal calling a
        gateway-only method fails PERMISSION_DENIED ``DELEGATION_NOT_ALLOWED``.
        """
        now = self._clock()
        # Oversized input never reaches the cache: hashing it would be work for nothing.
        usable = isinstance(token, str) and len(token) <= MAX_TOKEN_CHARS
        cached = self._cache.get(token) if usable else None
        if cached is not None:
            principal, expires = cached
            if _jws.is_expired(expires, now=now, leeway=self._leeway):
                del self._cache[token]
                raise ServiceError.principal_expired()
            self._cache.move_to_end(token)
        else:
            try:
                principal, expires = self._verify(token, now)
            except _Expired:
                raise ServiceError.principal_expired() from None
            except _jws.Rejected as rejected:
                _log_rejection(str(rejected))
                raise ServiceError.principal_invalid() from None
            if self._cache_size > 0:
                if len(self._cache) >= self._cache_size:
                    self._cache.popitem(last=False)
                self._cache[token] = (principal, expires)
        if principal.actor is not None and method is not None and self.requires_gateway(method):
            _log_rejection(f"delegated principal on gateway-only method {method}")
            raise ServiceError.delegation_not_allowed()
        return principal

    def _verify(self, token: str, now: float) -> tuple[Principal, int]:
        kid, claims = _jws.decode(token, self._keys, MAX_TOKEN_CHARS)
        issuer = self._issuer_of[kid]
        if claims.get("iss") != issuer:
            raise _jws.Rejected("issuer does not match the key set of the key id")
        audience = claims.get("aud")
        if not (
            audience == self._audience
            or (isinstance(audience, list) and self._audience in audience)
        ):
            raise _jws.Rejected("audience not accepted")
        expires = _jws.check_times(
            claims, now=now, leeway=self._leeway, max_lifetime=self._max_lifetime
        )
        tenant = _jws.str_claim(claims, "tid")
        user = _jws.str_claim(claims, "sub")
        token_id = _jws.str_claim(claims, "jti")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise _jws.Rejected("claim 'scope' is not a string")
        budgets = claims.get("bud", [])
        if not isinstance(budgets, list) or not all(isinstance(b, str) and b for b in budgets):
            raise _jws.Rejected("claim 'bud' is not a list of strings")
        try:
            kind = PrincipalKind(claims.get("kind", PrincipalKind.USER.value))
        except ValueError:
            raise _jws.Rejected("claim 'kind' unknown") from None
        actor, run_id = self._delegation(claims, issuer)
        if _jws.is_expired(expires, now=now, leeway=self._leeway):
            raise _Expired("expired")
        principal = Principal(
            tenant_id=tenant,
            user_id=user,
            permissions=frozenset(scope.split()),
            budget_ids=tuple(budgets),
            kind=kind,
            expires_at=datetime.fromtimestamp(expires, UTC),
            token_id=token_id,
            actor=actor,
            run_id=run_id,
        )
        return principal, expires

    def _delegation(self, claims: Mapping[str, Any], issuer: str) -> tuple[str | None, str | None]:
        act = claims.get("act")
        run_id = claims.get("rid")
        if issuer != self._delegation_issuer:
            # Only the orchestrator delegates: a gateway principal claiming an actor is forged
            # or confused, and is refused rather than half-trusted.
            if act is not None or run_id is not None:
                raise _jws.Rejected("delegation claims on a principal of the gateway")
            return None, None
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise _jws.Rejected("claim 'act' missing or malformed on a delegated principal")
        if not isinstance(run_id, str) or not run_id:
            raise _jws.Rejected("claim 'rid' missing on a delegated principal")
        return act["sub"], run_id


def current_principal() -> Principal:
    """Return the verified principal of the RPC being served.

    Raises UNAUTHENTICATED (``PRINCIPAL_MISSING``) when there is none, e.g. in a public method.
    """
    principal = _current.get()
    if principal is None:
        raise ServiceError.principal_missing()
    return principal


def optional_principal() -> Principal | None:
    """Return the verified principal of the RPC being served, if any."""
    return _current.get()


@contextmanager
def principal_scope(principal: Principal | None) -> Iterator[None]:
    """Make ``principal`` current for the code inside the block."""
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)
