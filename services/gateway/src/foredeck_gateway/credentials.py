"""Credentials the gateway accepts: API keys (``fdk_…``) and JWTs (HS256, RS256).

An API key is 32 random bytes as unpadded base64url behind ``fdk_``; only the SHA-256 of the
whole secret is ever stored. A JWT is verified here with PyJWT against the configured keys:
algorithm pinned per key (``alg: none`` and algorithm confusion are refused), issuer,
audience, expiry and not-before checked, then mapped through the configured claims to a
tenant, a user and permissions.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import RSAAlgorithm

from foredeck_gateway.errors import GatewayReason
from foredeck_kit.principal import MIN_KEY_BYTES, PrincipalKind, parse_keys

__all__ = [
    "API_KEY_PREFIX",
    "AUTHORIZATION_KEY",
    "Credential",
    "JwtIdentity",
    "JwtVerifier",
    "hash_secret",
    "new_api_key_secret",
    "parse_authorization",
]

AUTHORIZATION_KEY = "authorization"
API_KEY_PREFIX = "fdk_"
_API_KEY = re.compile(r"^fdk_[A-Za-z0-9_-]{43}$")
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_MAX_CREDENTIAL_CHARS = 8192
_IDENTIFIER = re.compile(r"^[A-Za-z0-9._@:-]{1,128}$")
_TENANT = re.compile(r"^[a-z0-9_.-]{1,64}$")
_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Credential:
    """What the ``authorization`` entry holds: an API key or a JWT, not yet verified."""

    kind: str
    """``api_key`` or ``jwt``."""
    secret: str


def new_api_key_secret() -> str:
    """A fresh API key secret: ``fdk_`` and 43 characters (32 random bytes)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_authorization(metadata: Any) -> Credential:
    """Find the one ``authorization: Bearer <credential>`` entry; raise UNAUTHENTICATED."""
    values = [value for key, value in (metadata or ()) if key == AUTHORIZATION_KEY]
    if not values:
        raise GatewayReason.credentials_missing()
    if len(values) > 1 or not isinstance(values[0], str):
        raise GatewayReason.credentials_malformed()
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_CREDENTIAL_CHARS:
        raise GatewayReason.credentials_malformed()
    if token.startswith(API_KEY_PREFIX):
        if not _API_KEY.fullmatch(token):
            raise GatewayReason.api_key_invalid()
        return Credential("api_key", token)
    if _JWT.fullmatch(token):
        return Credential("jwt", token)
    raise GatewayReason.credentials_malformed()


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    """Who a verified JWT says the caller is."""

    tenant_id: str
    user_id: str
    permissions: tuple[str, ...]
    kind: PrincipalKind
    token_id: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)


def _load_public_keys(path: Path | None, jwks: Path | None) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    if path is not None:
        document = json.loads(path.read_text())
        if not isinstance(document, dict):
            raise ValueError(f"{path}: expected a JSON object of key id to PEM")
        for kid, pem in document.items():
            keys[str(kid)] = RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(pem.encode())
    if jwks is not None:
        document = json.loads(jwks.read_text())
        for entry in document.get("keys", []):
            if entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
                continue
            if entry.get("alg", "RS256") != "RS256":
                continue
            kid = str(entry.get("kid", ""))
            keys[kid] = RSAAlgorithm.from_jwk(json.dumps(entry))
    return keys


class JwtVerifier:
    """Verifies identity-provider JWTs against HS256 secrets and RS256 public keys.

    A key id (``kid`` header) picks the key; a token without one is tried against the only key
    of its algorithm when there is exactly one. The algorithm is taken from the key, never from
    the token: an HS256 token cannot be checked with an RSA public key as its secret.
    """

    def __init__(
        self,
        *,
        hs256_secrets: Mapping[str, bytes],
        rs256_keys: Mapping[str, Any],
        issuer: str = "",
        audience: str = "",
        leeway: float = 30.0,
        tenant_claim: str = "tid",
        permissions_claim: str = "scope",
    ) -> None:
        for kid, secret in hs256_secrets.items():
            if len(secret) < MIN_KEY_BYTES:
                raise ValueError(f"JWT secret {kid!r} is shorter than {MIN_KEY_BYTES} bytes")
        self._hs = dict(hs256_secrets)
        self._rs = dict(rs256_keys)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._tenant_claim = tenant_claim
        self._permissions_claim = permissions_claim
        self._decoder = jwt.PyJWT()
        self._cache: OrderedDict[str, tuple[JwtIdentity, float]] = OrderedDict()

    @classmethod
    def from_settings(
        cls,
        *,
        hs256_spec: str,
        public_keys_file: Path | None,
        jwks_file: Path | None,
        issuer: str,
        audience: str,
        leeway: float,
        tenant_claim: str,
        permissions_claim: str,
    ) -> JwtVerifier:
        """Build the verifier from the gateway's settings; raises ValueError on bad keys."""
        return cls(
            hs256_secrets=parse_keys(hs256_spec) if hs256_spec else {},
            rs256_keys=_load_public_keys(public_keys_file, jwks_file),
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            tenant_claim=tenant_claim,
            permissions_claim=permissions_claim,
        )

    @property
    def configured(self) -> bool:
        """Whether any key is configured; without one every JWT is refused."""
        return bool(self._hs or self._rs)

    def _key_for(self, header: Mapping[str, Any]) -> tuple[Any, str]:
        alg = header.get("alg")
        kid = header.get("kid")
        if alg == "HS256":
            table: Mapping[str, Any] = self._hs
        elif alg == "RS256":
            table = self._rs
        else:
            raise GatewayReason.jwt_invalid("algorithm")
        if isinstance(kid, str) and kid:
            key = table.get(kid)
        elif len(table) == 1:
            key = next(iter(table.values()))
        else:
            key = None
        if key is None:
            raise GatewayReason.jwt_invalid("key")
        return key, alg

    def verify(self, token: str) -> JwtIdentity:
        """Return the caller a JWT names, or raise UNAUTHENTICATED JWT_INVALID / JWT_EXPIRED.

        A client sends the same token on many calls: a token that passed is remembered (up to
        :data:`_CACHE_SIZE`, least recently used dropped first) and then only its expiry is
        checked again.
        """
        cached = self._cache.get(token)
        if cached is not None:
            identity, expires = cached
            if time.time() > expires + self._leeway:
                del self._cache[token]
                raise GatewayReason.jwt_expired()
            self._cache.move_to_end(token)
            return identity
        identity = self._verify(token)
        claimed = identity.claims.get("exp")
        if isinstance(claimed, int | float):
            self._cache[token] = (identity, float(claimed))
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return identity

    def _verify(self, token: str) -> JwtIdentity:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, ValueError, binascii.Error):
            raise GatewayReason.jwt_invalid("claims") from None
        key, alg = self._key_for(header)
        options: dict[str, Any] = {
            "require": ["exp", "sub"],
            "verify_aud": bool(self._audience),
            "verify_iss": bool(self._issuer),
        }
        try:
            claims = self._decoder.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience or None,
                issuer=self._issuer or None,
                leeway=self._leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise GatewayReason.jwt_expired() from None
        except jwt.InvalidSignatureError:
            raise GatewayReason.jwt_invalid("signature") from None
        except jwt.InvalidAudienceError:
            raise GatewayReason.jwt_invalid("audience") from None
        except jwt.InvalidIssuerError:
            raise GatewayReason.jwt_invalid("issuer") from None
        except jwt.ImmatureSignatureError:
            raise GatewayReason.jwt_invalid("notBefore") from None
        except jwt.InvalidAlgorithmError:
            raise GatewayReason.jwt_invalid("algorithm") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise GatewayReason.jwt_invalid("claims") from None
        return self._identity(claims)

    def _identity(self, claims: Mapping[str, Any]) -> JwtIdentity:
        tenant = claims.get(self._tenant_claim)
        user = claims.get("sub")
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise GatewayReason.jwt_invalid("claims")
        if not isinstance(user, str) or not _IDENTIFIER.fullmatch(user):
            raise GatewayReason.jwt_invalid("claims")
        raw = claims.get(self._permissions_claim, "")
        if isinstance(raw, str):
            permissions = tuple(raw.split())
        elif isinstance(raw, list) and all(isinstance(p, str) and p.split() == [p] for p in raw):
            permissions = tuple(raw)
        else:
            raise GatewayReason.jwt_invalid("claims")
        try:
            kind = PrincipalKind(claims.get("kind", PrincipalKind.USER.value))
        except ValueError:
            raise GatewayReason.jwt_invalid("claims") from None
        jti = claims.get("jti")
        return JwtIdentity(
            tenant_id=tenant,
            user_id=user,
            permissions=permissions,
            kind=kind,
            token_id=jti if isinstance(jti, str) else "",
            claims=dict(claims),
        )
