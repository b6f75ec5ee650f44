"""Approval tokens: proof, checked by the toolrunner, that a person approved one tool call.

When a person approves a tool call, the orchestrator signs an approval token with its
delegation keys (the same ``DELEGATION_KEYS`` that sign its delegated principals) and sends it
with ``ExecuteTool``; the toolrunner refuses a call of a tool that requires approval unless the
token matches that exact call. It is an HS256 JWT with audience
``foredeck-toolrunner-approval`` (so it can never pass as a principal, nor a principal as an
approval) and claims:

``iss`` (``foredeck-orchestrator``), ``aud``, ``tid`` (tenant), ``rid`` (run), ``sid`` (step),
``tool`` (tool name), ``args`` (hex SHA-256 of the canonical JSON of the arguments, see
:func:`canonical_json`), ``idk`` (the call's idempotency key, when bound), ``iat``, ``exp``
(a few minutes: the orchestrator mints one per attempt from its durable approval record) and
``jti``.

A token that fails verification raises PERMISSION_DENIED with the reason the verifier was
built with (``PERMISSION_MISSING`` by default; the toolrunner passes its own
``APPROVAL_INVALID``) and metadata ``approval``: ``invalid`` (signature, key, issuer,
audience, lifetime or claims), ``expired``, or ``mismatch`` (another tenant, run, tool,
arguments or idempotency key), plus ``toolName``. The wire message is the same for all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import grpc

from foredeck_kit import _jws
from foredeck_kit.errors import Reason, ServiceError
from foredeck_kit.principal import DELEGATION_ISSUER, MAX_TOKEN_CHARS, Principal, current_principal

__all__ = [
    "APPROVAL_AUDIENCE",
    "APPROVAL_ERROR_KEY",
    "APPROVAL_MAX_LIFETIME",
    "APPROVAL_TTL",
    "Approval",
    "ApprovalTokenSigner",
    "ApprovalTokenVerifier",
    "arguments_digest",
    "arguments_json_digest",
    "canonical_json",
]

APPROVAL_AUDIENCE = "foredeck-toolrunner-approval"
APPROVAL_TTL = timedelta(minutes=2)
"""Default lifetime: enough for one ExecuteTool call and its retries."""
APPROVAL_MAX_LIFETIME = timedelta(minutes=10)
"""Longest ``exp - iat`` an approval token may have, at minting and at verification."""
APPROVAL_ERROR_KEY = "approval"
"""ErrorInfo metadata key saying why an approval token was refused."""

_DIGEST = re.compile(r"[0-9a-f]{64}")


def canonical_json(value: Any) -> bytes:
    """The canonical JSON of a tool call's arguments: sorted keys, no whitespace, UTF-8.

    Numbers are written as Python's ``json`` writes them; NaN and infinities are refused.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def arguments_digest(value: Any) -> str:
    """Hex SHA-256 of :func:`canonical_json` of ``value`` (parsed arguments)."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Two parsers may keep different duplicates: the approved arguments must be one thing.
        raise ValueError("arguments JSON repeats an object key")
    return result


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"arguments JSON holds {name}, which is not JSON")


def arguments_json_digest(arguments_json: str | bytes) -> str:
    """Hex SHA-256 of the canonical form of arguments given as JSON text.

    Raises ValueError for text that is not strict JSON (repeated keys, NaN, bad syntax).
    """
    value = json.loads(
        arguments_json, object_pairs_hook=_no_duplicates, parse_constant=_no_constants
    )
    return arguments_digest(value)


@dataclass(frozen=True, slots=True)
class Approval:
    """A verified approval: which call of which run and step it allows, until when."""

    tenant_id: str
    run_id: str
    step_id: str
    tool_name: str
    arguments_digest: str
    idempotency_key: str | None
    expires_at: datetime
    token_id: str


class ApprovalTokenSigner:
    """Signs approval tokens with the orchestrator's delegation keys."""

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active_kid: str,
        *,
        issuer: str = DELEGATION_ISSUER,
        ttl: timedelta = APPROVAL_TTL,
        max_lifetime: timedelta = APPROVAL_MAX_LIFETIME,
    ) -> None:
        self._keys = _jws.check_keys(keys, "delegation")
        if active_kid not in self._keys:
            raise ValueError(f"active key id {active_kid!r} is not among the keys")
        self._kid = active_kid
        self._issuer = issuer
        self._max_lifetime = max_lifetime
        self._ttl = self._lifetime(ttl)

    def _lifetime(self, ttl: timedelta) -> int:
        seconds = int(ttl.total_seconds())
        if seconds <= 0 or ttl > self._max_lifetime:
            raise ValueError(f"approval ttl must be 1 s to {self._max_lifetime}, got {ttl}")
        return seconds

    def mint(
        self,
        *,
        tenant_id: str,
        run_id: str,
        step_id: str,
        tool_name: str,
        arguments_digest: str,
        idempotency_key: str | None = None,
        ttl: timedelta | None = None,
        now: datetime | None = None,
    ) -> str:
        """Return a token approving one call of ``tool_name`` with the given arguments.

        ``arguments_digest`` comes from :func:`arguments_digest` or
        :func:`arguments_json_digest`.
        """
        for name, value in (
            ("tenant_id", tenant_id),
            ("run_id", run_id),
            ("step_id", step_id),
            ("tool_name", tool_name),
        ):
            if not value:
                raise ValueError(f"{name} is required")
        if not _DIGEST.fullmatch(arguments_digest):
            raise ValueError("arguments_digest must be a hex SHA-256")
        issued = int((now or datetime.now(UTC)).timestamp())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": APPROVAL_AUDIENCE,
            "tid": tenant_id,
            "rid": run_id,
            "sid": step_id,
            "tool": tool_name,
            "args": arguments_digest,
        }
        if idempotency_key:
            claims["idk"] = idempotency_key
        lifetime = self._ttl if ttl is None else self._lifetime(ttl)
        claims.update(iat=issued, exp=issued + lifetime, jti=secrets.token_urlsafe(16))
        token = _jws.encode(claims, self._keys[self._kid], self._kid)
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"approval token is over {MAX_TOKEN_CHARS} characters")
        return token


class _Refused(Exception):
    def __init__(self, category: str, cause: str) -> None:
        super().__init__(cause)
        self.category = category


class ApprovalTokenVerifier:
    """Checks an approval token against the call being made; used by the toolrunner.

    ``reason`` is the ErrorInfo reason of a refusal (``PERMISSION_MISSING`` until the
    toolrunner passes its own ``APPROVAL_INVALID``). ``clock`` exists for tests.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        issuer: str = DELEGATION_ISSUER,
        leeway: timedelta = timedelta(seconds=5),
        max_lifetime: timedelta = APPROVAL_MAX_LIFETIME,
        reason: str = Reason.PERMISSION_MISSING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = _jws.check_keys(keys, "delegation")
        self._issuer = issuer
        self._leeway = leeway.total_seconds()
        self._max_lifetime = max_lifetime.total_seconds()
        self._reason = reason
        self._clock = clock
        # Fail at construction, not at the first refusal, if the reason is malformed.
        ServiceError(grpc.StatusCode.PERMISSION_DENIED, reason, "approval token not valid")

    def verify(
        self,
        token: str,
        *,
        tool_name: str,
        arguments_digest: str,
        principal: Principal | None = None,
        idempotency_key: str | None = None,
    ) -> Approval:
        """Return the approval if ``token`` allows this call, else raise PERMISSION_DENIED.

        The call is the current principal's (or ``principal``'s): the token must name its
        tenant, and its run when the principal is delegated for one; the tool; the digest of
        the arguments; and, when the token binds one, the idempotency key.
        """
        if not _DIGEST.fullmatch(arguments_digest):
            raise ValueError("arguments_digest must be a hex SHA-256")
        caller = principal if principal is not None else current_principal()
        try:
            return self._verify(token, tool_name, arguments_digest, caller, idempotency_key)
        except _Refused as refused:
            logger = logging.getLogger("foredeck.approval")
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("approval token refused: %s", refused)
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                self._reason,
                "approval token not valid for this call",
                metadata={APPROVAL_ERROR_KEY: refused.category, "toolName": tool_name},
            ) from None

    def _verify(
        self,
        token: str,
        tool_name: str,
        digest: str,
        caller: Principal,
        idempotency_key: str | None,
    ) -> Approval:
        now = self._clock()
        try:
            _, claims = _jws.decode(token, self._keys, MAX_TOKEN_CHARS)
            if claims.get("iss") != self._issuer:
                raise _jws.Rejected("issuer not accepted")
            if claims.get("aud") != APPROVAL_AUDIENCE:
                raise _jws.Rejected("audience not accepted")
            expires = _jws.check_times(
                claims, now=now, leeway=self._leeway, max_lifetime=self._max_lifetime
            )
            values = {
                name: _jws.str_claim(claims, name)
                for name in ("tid", "rid", "sid", "tool", "args", "jti")
            }
            bound_key = _jws.optional_str_claim(claims, "idk")
        except _jws.Rejected as rejected:
            raise _Refused("invalid", str(rejected)) from None
        if _jws.is_expired(expires, now=now, leeway=self._leeway):
            raise _Refused("expired", "expired")
        checks = (
            ("tenant", values["tid"] == caller.tenant_id),
            ("run", caller.run_id is None or values["rid"] == caller.run_id),
            ("tool", values["tool"] == tool_name),
            ("arguments", values["args"] == digest),
            ("idempotency key", bound_key is None or bound_key == idempotency_key),
        )
        for what, ok in checks:
            if not ok:
                raise _Refused("mismatch", f"{what} differs from the approved call")
        return Approval(
            tenant_id=values["tid"],
            run_id=values["rid"],
            step_id=values["sid"],
            tool_name=tool_name,
            arguments_digest=digest,
            idempotency_key=bound_key,
            expires_at=datetime.fromtimestamp(expires, UTC),
            token_id=values["jti"],
        )
