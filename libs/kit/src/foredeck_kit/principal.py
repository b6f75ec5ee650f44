"""The signed principal: who is calling, minted by the gateway and verified by every service.

It is an HS256 JWT so services in any language can verify it with a stock library. Claims:
``iss``, ``aud``, ``sub`` (user id), ``tid`` (tenant id), ``perms`` (permission strings),
``bud`` (budget ids), ``kind`` (user | service | admin), ``iat``, ``exp``, ``jti``; the header's
``kid`` names the key so keys can rotate without downtime.
"""

from __future__ import annotations

import contextvars
import enum
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from foredeck_kit.errors import ServiceError

__all__ = [
    "ALGORITHM",
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
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

ALGORITHM = "HS256"
DEFAULT_ISSUER = "foredeck-gateway"
DEFAULT_AUDIENCE = "foredeck-internal"
MIN_KEY_BYTES = 32
_MAX_TOKEN_CHARS = 8192
_REQUIRED_CLAIMS = ("iss", "aud", "sub", "tid", "perms", "kind", "iat", "exp", "jti")

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
    """A verified caller: tenant, user, permissions and budgets, valid until ``expires_at``."""

    tenant_id: str
    user_id: str
    permissions: frozenset[str]
    budget_ids: tuple[str, ...]
    kind: PrincipalKind
    expires_at: datetime
    token_id: str

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


def generate_key() -> bytes:
    """Return a fresh random signing secret of the minimum accepted length."""
    return secrets.token_urlsafe(MIN_KEY_BYTES).encode()


def parse_keys(spec: str) -> dict[str, bytes]:
    """Parse ``"kid1:secret1,kid2:secret2"`` into ``{kid: secret}``.

    Secrets shorter than 32 bytes are refused: HS256 is only as strong as its key.
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


def _check_keys(keys: Mapping[str, bytes]) -> dict[str, bytes]:
    if not keys:
        raise ValueError("at least one principal key is required")
    for kid, secret in keys.items():
        if not kid:
            raise ValueError("principal key ids must not be empty")
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"principal key {kid!r} is shorter than {MIN_KEY_BYTES} bytes")
    return dict(keys)


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
    ) -> None:
        self._keys = _check_keys(keys)
        if active_kid not in self._keys:
            raise ValueError(f"active key id {active_kid!r} is not among the keys")
        if ttl <= timedelta(0):
            raise ValueError("principal ttl must be positive")
        self._kid = active_kid
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl

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
        """Return a signed token for the given caller, valid for ``ttl`` from ``now``."""
        if not tenant_id or not user_id:
            raise ValueError("tenant_id and user_id are required")
        issued = now or datetime.now(UTC)
        lifetime = ttl if ttl is not None else self._ttl
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": user_id,
            "tid": tenant_id,
            "perms": sorted(set(permissions)),
            "bud": list(budget_ids),
            "kind": PrincipalKind(kind).value,
            "iat": int(issued.timestamp()),
            "exp": int((issued + lifetime).timestamp()),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, self._keys[self._kid], algorithm=ALGORITHM, headers={"kid": self._kid}
        )


def _string_list(value: object, claim: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ServiceError.principal_invalid(f"principal claim {claim!r} is malformed")
    return tuple(value)


class PrincipalVerifier:
    """Verifies principal tokens: HS256 only, known key id, issuer, audience, expiry, claims.

    One token is typically sent on many calls (the gateway's principal is forwarded to every
    service a run touches), so tokens that passed are remembered, up to ``cache_size``, and
    then only their expiry is checked again. ``clock`` (seconds since the epoch) exists for
    tests.
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
    ) -> None:
        self._keys = _check_keys(keys)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._decoder = jwt.PyJWT(options={"require": list(_REQUIRED_CLAIMS)})
        self._cache: dict[str, Principal] = {}
        self._cache_size = cache_size
        self._clock = clock

    def verify(self, token: str) -> Principal:
        """Return the principal in ``token`` or raise UNAUTHENTICATED.

        The reason is ``PRINCIPAL_EXPIRED`` for a genuine but expired token and
        ``PRINCIPAL_INVALID`` for anything else.
        """
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at.timestamp() <= self._clock() - self._leeway.total_seconds():
                del self._cache[token]
                raise ServiceError.principal_expired()
            return cached
        principal = self._verify(token)
        if self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                # Dicts keep insertion order: drop the oldest entry.
                del self._cache[next(iter(self._cache))]
            self._cache[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise ServiceError.principal_invalid()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ServiceError.principal_invalid() from None
        # The header is attacker-controlled: pin the algorithm before anything else.
        if header.get("alg") != ALGORITHM:
            raise ServiceError.principal_invalid("principal algorithm not accepted")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise ServiceError.principal_invalid("principal key id unknown")
        try:
            claims = self._decoder.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise ServiceError.principal_expired() from None
        except jwt.PyJWTError:
            raise ServiceError.principal_invalid() from None
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        tenant, user, token_id = claims["tid"], claims["sub"], claims["jti"]
        if not all(isinstance(v, str) and v for v in (tenant, user, token_id)):
            raise ServiceError.principal_invalid("principal identity claims are malformed")
        try:
            kind = PrincipalKind(claims["kind"])
        except ValueError:
            raise ServiceError.principal_invalid("principal kind unknown") from None
        return Principal(
            tenant_id=tenant,
            user_id=user,
            permissions=frozenset(_string_list(claims["perms"], "perms")),
            budget_ids=_string_list(claims.get("bud", []), "bud"),
            kind=kind,
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            token_id=token_id,
        )


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
