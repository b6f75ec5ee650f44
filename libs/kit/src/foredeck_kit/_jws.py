"""Compact HS256 JSON Web Signatures (RFC 7515), signed and verified with the standard library.

Principals and approval tokens are JWTs any stock library can verify; this module is the one
place that reads and writes them. Verification is ordered so that an unauthenticated caller
pays as little CPU as possible: size and shape checks first, then one decode of the small
header, then one HMAC over the signing input, and only for a genuine signature a decode of the
payload. Every failure raises :class:`Rejected` with a cause meant for debug logs only.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ALGORITHM",
    "MIN_KEY_BYTES",
    "Rejected",
    "check_keys",
    "check_times",
    "decode",
    "encode",
    "int_claim",
    "is_expired",
    "optional_int_claim",
    "optional_str_claim",
    "str_claim",
]

ALGORITHM = "HS256"
MIN_KEY_BYTES = 32

# An HS256 signature is 32 bytes: exactly 43 base64url characters without padding.
_TOKEN_SHAPE = re.compile(r"([A-Za-z0-9_-]{2,256})\.([A-Za-z0-9_-]{2,})\.([A-Za-z0-9_-]{43})")
_HEADER_FIELDS = frozenset({"alg", "kid", "typ"})


class Rejected(Exception):
    """A token failed verification; the message names the check, for server-side logs only."""


def check_keys(keys: Mapping[str, bytes], what: str = "principal") -> dict[str, bytes]:
    """Return ``keys`` as a dict after refusing empty sets, empty ids and short secrets."""
    if not keys:
        raise ValueError(f"at least one {what} key is required")
    for kid, secret in keys.items():
        if not kid:
            raise ValueError(f"{what} key ids must not be empty")
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"{what} key {kid!r} is shorter than {MIN_KEY_BYTES} bytes")
    return dict(keys)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode(claims: Mapping[str, Any], key: bytes, kid: str) -> str:
    """Sign ``claims`` with ``key`` as an HS256 JWS whose header names ``kid``."""
    signing_input = (
        _b64encode(_json({"alg": ALGORITHM, "kid": kid})) + "." + _b64encode(_json(claims))
    )
    signature = hmac.digest(key, signing_input.encode("ascii"), "sha256")
    return signing_input + "." + _b64encode(signature)


def _object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(segment))
    except (binascii.Error, ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON and integers too long to convert.
        raise Rejected(f"{what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise Rejected(f"{what} is not a JSON object")
    return value


def decode(token: object, keys: Mapping[str, bytes], max_chars: int) -> tuple[str, dict[str, Any]]:
    """Return ``(kid, claims)`` of a token whose HS256 signature matches the key ``kid`` names.

    Only the signature and the header are checked here; the caller checks the claims.
    """
    if not isinstance(token, str) or not token:
        raise Rejected("empty")
    if len(token) > max_chars:
        raise Rejected("too long")
    shape = _TOKEN_SHAPE.fullmatch(token)
    if shape is None:
        raise Rejected("not a compact HS256 JWS")
    header_segment, payload_segment, signature_segment = shape.groups()
    header = _object(header_segment, "header")
    # The header is the attacker's: pin the algorithm and refuse what we do not understand
    # (``crit``, embedded keys, key URLs) before any key is chosen.
    if header.get("alg") != ALGORITHM:
        raise Rejected("algorithm not accepted")
    if not header.keys() <= _HEADER_FIELDS:
        raise Rejected("unexpected header fields")
    if header.get("typ", "JWT") != "JWT":
        raise Rejected("unexpected type")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise Rejected("key id unknown")
    signing_input = token[: len(header_segment) + 1 + len(payload_segment)]
    expected = _b64encode(hmac.digest(key, signing_input.encode("ascii"), "sha256"))
    # Comparing the canonical encoding also refuses a signature spelled with other trailing bits.
    if not hmac.compare_digest(expected, signature_segment):
        raise Rejected("signature mismatch")
    assert isinstance(kid, str)
    return kid, _object(payload_segment, "payload")


def optional_int_claim(claims: Mapping[str, Any], name: str) -> int | None:
    """Return a NumericDate claim in seconds if present, refusing floats, bools, absurd values.

    A value past the year 2286 (10**10 seconds) is most likely milliseconds: refused rather
    than read as a date thousands of years away (or past what ``datetime`` can hold).
    """
    value = claims.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < 10**10:
        raise Rejected(f"claim {name!r} is not a plausible time in seconds")
    return value


def int_claim(claims: Mapping[str, Any], name: str) -> int:
    """Return a required NumericDate claim, checked as :func:`optional_int_claim` does."""
    value = optional_int_claim(claims, name)
    if value is None:
        raise Rejected(f"claim {name!r} missing")
    return value


def optional_str_claim(claims: Mapping[str, Any], name: str) -> str | None:
    """Return a string claim if present; present but empty or not a string is refused."""
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise Rejected(f"claim {name!r} is not a non-empty string")
    return value


def str_claim(claims: Mapping[str, Any], name: str) -> str:
    """Return a required non-empty string claim."""
    value = optional_str_claim(claims, name)
    if value is None:
        raise Rejected(f"claim {name!r} missing")
    return value


def check_times(
    claims: Mapping[str, Any], *, now: float, leeway: float, max_lifetime: float
) -> int:
    """Check ``iat``, ``exp`` and ``nbf`` except expiry itself; return ``exp``.

    Refused: a token issued in the future, not yet valid, expiring before it was issued, or
    living longer than ``max_lifetime`` seconds (a stolen long-lived token stays useful too
    long). Expiry is left to the caller so that it can be reported apart, after every other
    check has passed.
    """
    issued = int_claim(claims, "iat")
    expires = int_claim(claims, "exp")
    if expires <= issued:
        raise Rejected("expires before it was issued")
    if expires - issued > max_lifetime:
        raise Rejected("lifetime over the maximum")
    if issued > now + leeway:
        raise Rejected("issued in the future")
    not_before = optional_int_claim(claims, "nbf")
    if not_before is not None and not_before > now + leeway:
        raise Rejected("not yet valid")
    return expires


def is_expired(expires: float, *, now: float, leeway: float) -> bool:
    """Whether a token expiring at ``expires`` is past it, beyond the tolerated clock skew."""
    return expires <= now - leeway
