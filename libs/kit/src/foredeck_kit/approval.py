"""Approval tokens: proof, checked by the toolrunner, that a person approved one tool call.

When it executes a call whose approval was granted, the orchestrator signs an approval token
with its delegation keys (the same ``DELEGATION_KEYS`` that sign its delegated principals) and
sends it in ``ExecuteToolRequest.approval_token``; the toolrunner refuses a call of a tool that
requires approval unless the token matches that exact call. It is an HS256 JWT with audience
``foredeck-toolrunner-approval`` (so it can never pass as a principal, nor a principal as an
approval) and claims ``iss`` (``foredeck-orchestrator``), ``aud``, ``tid`` (tenant), ``rid``
(run), ``sid`` (step), ``tool`` (tool name), ``args`` (lowercase hex SHA-256 of the RFC 8785
canonical JSON of the arguments, see :func:`canonical_json`), ``iat``, ``exp`` (at most five
minutes later: the orchestrator mints one per attempt from its durable approval record) and
``jti``. The call's idempotency key is ``<run_id>:<step_id>``, so the token allows one effect.

A token that fails verification raises PERMISSION_DENIED with the reason the verifier was
built with (``PERMISSION_MISSING`` by default; the toolrunner passes its own
``APPROVAL_INVALID``), one fixed message, and metadata ``toolName``, ``check`` (the first failed
check: ``signature``, ``issuer``, ``audience``, ``expiry``, ``tenant``, ``run``, ``step``,
``tool`` or ``arguments``) and ``approval`` (``invalid``, ``expired`` or ``mismatch``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
    "APPROVAL_CATEGORY_KEY",
    "APPROVAL_CHECK_KEY",
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
APPROVAL_MAX_LIFETIME = timedelta(minutes=5)
"""Longest ``exp - iat`` an approval token may have, at minting and at verification."""
APPROVAL_CHECK_KEY = "check"
"""ErrorInfo metadata key naming the first check a refused approval token failed."""
APPROVAL_CATEGORY_KEY = "approval"
"""ErrorInfo metadata key saying how a token was refused: invalid, expired or mismatch."""

_DIGEST = re.compile(r"[0-9a-f]{64}")
_EXACT_INTEGERS = 2**53


def _number(value: float) -> str:
    """A number as ECMAScript writes it (RFC 8785 section 3.2.2.3): shortest round trip."""
    if not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON")
    if value == 0:
        return "0"  # -0 included
    sign = "-" if value < 0 else ""
    mantissa, _, exponent_text = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    all_digits = whole + fraction
    digits = all_digits.lstrip("0")
    # The value is 0.<digits> x 10**point.
    point = len(whole) + int(exponent_text or 0) - (len(all_digits) - len(digits))
    digits = digits.rstrip("0")
    count = len(digits)
    if count <= point <= 21:
        return sign + digits + "0" * (point - count)
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    exponent = point - 1
    shown = digits if count == 1 else digits[0] + "." + digits[1:]
    return f"{sign}{shown}e{'+' if exponent > 0 else '-'}{abs(exponent)}"


def _canonical(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        # JSON numbers are doubles: an integer beyond 2**53 is written as its double would be.
        out.append(str(value) if abs(value) < _EXACT_INTEGERS else _number(float(value)))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _canonical(item, out)
        out.append("]")
    elif isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ValueError("JSON object keys must be strings")
        out.append("{")
        # RFC 8785 orders keys by their UTF-16 code units, not by code points.
        for index, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be"))):
            if index:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _canonical(value[key], out)
        out.append("}")
    else:
        raise ValueError(f"{type(value).__name__} is not JSON")


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical JSON of parsed arguments: sorted keys, no whitespace, UTF-8.

    Numbers are written as ECMAScript writes doubles (``1.0`` is ``1``, ``1e21`` is
    ``1e+21``); NaN, infinities and lone surrogates are refused (ValueError).
    """
    out: list[str] = []
    _canonical(value, out)
    return "".join(out).encode("utf-8")


def arguments_digest(value: Any) -> str:
    """Lowercase hex SHA-256 of :func:`canonical_json` of ``value`` (parsed arguments)."""
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
    """Lowercase hex SHA-256 of the canonical form of arguments given as JSON text.

    A token still matches when the model's JSON differs only in key order or spacing. Raises
    ValueError for text that is not strict JSON (repeated keys, NaN, bad syntax).
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
        ttl: timedelta | None = None,
        now: datetime | None = None,
    ) -> str:
        """Return a token approving the call of ``tool_name`` at ``step_id`` of ``run_id``.

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
            raise ValueError("arguments_digest must be a lowercase hex SHA-256")
        issued = int((now or datetime.now(UTC)).timestamp())
        lifetime = self._ttl if ttl is None else self._lifetime(ttl)
        claims = {
            "iss": self._issuer,
            "aud": APPROVAL_AUDIENCE,
            "tid": tenant_id,
            "rid": run_id,
            "sid": step_id,
            "tool": tool_name,
            "args": arguments_digest,
            "iat": issued,
            "exp": issued + lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        token = _jws.encode(claims, self._keys[self._kid], self._kid)
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"approval token is over {MAX_TOKEN_CHARS} characters")
        return token


class _Refused(Exception):
    def __init__(self, check: str, cause: str, category: str = "invalid") -> None:
        super().__init__(cause)
        self.check = check
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
        run_id: str,
        step_id: str,
        principal: Principal | None = None,
    ) -> Approval:
        """Return the approval if ``token`` allows this call, else raise PERMISSION_DENIED.

        The token must name the tenant of the current principal (or of ``principal``), the
        request's ``run_id`` and ``step_id`` (and, for a delegated principal, its run), the
        tool, and the digest of the request's arguments.
        """
        if not _DIGEST.fullmatch(arguments_digest):
            raise ValueError("arguments_digest must be a lowercase hex SHA-256")
        caller = principal if principal is not None else current_principal()
        try:
            return self._verify(token, tool_name, arguments_digest, run_id, step_id, caller)
        except _Refused as refused:
            logger = logging.getLogger("foredeck.approval")
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("approval token refused: %s", refused)
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                self._reason,
                "approval token not valid for this call",
                metadata={
                    "toolName": tool_name,
                    APPROVAL_CHECK_KEY: refused.check,
                    APPROVAL_CATEGORY_KEY: refused.category,
                },
            ) from None

    def _verify(
        self,
        token: str,
        tool_name: str,
        digest: str,
        run_id: str,
        step_id: str,
        caller: Principal,
    ) -> Approval:
        now = self._clock()
        try:
            _, claims = _jws.decode(token, self._keys, MAX_TOKEN_CHARS)
            token_id = _jws.str_claim(claims, "jti")
        except _jws.Rejected as rejected:
            raise _Refused("signature", str(rejected)) from None
        if claims.get("iss") != self._issuer:
            raise _Refused("issuer", "issuer not accepted")
        if claims.get("aud") != APPROVAL_AUDIENCE:
            raise _Refused("audience", "audience not accepted")
        try:
            expires = _jws.check_times(
                claims, now=now, leeway=self._leeway, max_lifetime=self._max_lifetime
            )
        except _jws.Rejected as rejected:
            raise _Refused("expiry", str(rejected)) from None
        if _jws.is_expired(expires, now=now, leeway=self._leeway):
            raise _Refused("expiry", "expired", "expired")
        tenant, run, step = claims.get("tid"), claims.get("rid"), claims.get("sid")
        checks = (
            ("tenant", tenant == caller.tenant_id),
            ("run", run == run_id and (caller.run_id is None or run == caller.run_id)),
            ("step", step == step_id),
            ("tool", claims.get("tool") == tool_name),
            ("arguments", claims.get("args") == digest),
        )
        for check, ok in checks:
            if not ok:
                raise _Refused(check, f"{check} differs from the approved call", "mismatch")
        # Each compared equal to a non-empty string of the request or the principal.
        assert isinstance(run, str)
        assert isinstance(step, str)
        return Approval(
            tenant_id=caller.tenant_id,
            run_id=run,
            step_id=step,
            tool_name=tool_name,
            arguments_digest=digest,
            expires_at=datetime.fromtimestamp(expires, UTC),
            token_id=token_id,
        )
