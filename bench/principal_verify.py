"""What verifying a principal costs, and what an unauthenticated caller can make it cost.

Measured: the kit's verifier (standard-library HS256) on a valid token it has seen before
(cached), on a valid token it has not (uncached: signature and claims), and on 8 KB of garbage
in three shapes. Baseline: the verification the kit did before with PyJWT (parse the header,
then decode and validate the whole token), on the same inputs in the same run. Also prints the
size of a realistic principal (ten permissions, two budgets) in both claim formats.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.errors import ServiceError
from foredeck_kit.principal import PrincipalSigner, PrincipalVerifier, generate_key

PERMISSIONS = [
    "runs:create",
    "runs:read",
    "runs:cancel",
    "approvals:read",
    "approvals:resolve",
    "tools:web_search",
    "tools:calculator",
    "memory:read",
    "memory:write",
    "agents:read",
]
BUDGETS = ["budget-monthly-usd", "budget-daily-tokens"]
TENANT, USER = "tenant-3f9a2c", "user-8b1e47d2"
REPEATS = 5


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _old_token(key: bytes, kid: str) -> str:
    """A principal in the claim format the kit used before: JSON permission list, uuid jti."""
    now = datetime.now(UTC)
    claims = {
        "iss": "foredeck-gateway",
        "aud": "foredeck-internal",
        "sub": USER,
        "tid": TENANT,
        "perms": sorted(PERMISSIONS),
        "bud": BUDGETS,
        "kind": "user",
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="HS256", headers={"kid": kid})


class _PyJwtVerifier:
    """The previous verification path: header parsed, then the token decoded by PyJWT."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self._keys = keys
        self._decoder = jwt.PyJWT(
            options={"require": ["iss", "aud", "sub", "tid", "perms", "kind", "iat", "exp", "jti"]}
        )

    def verify(self, token: str) -> dict[str, Any]:
        if not token or len(token) > 8192:
            raise ValueError("invalid")
        header = jwt.get_unverified_header(token)
        if header.get("alg") != "HS256":
            raise ValueError("invalid")
        key = self._keys.get(header.get("kid", ""))
        if key is None:
            raise ValueError("invalid")
        return self._decoder.decode(
            token,
            key,
            algorithms=["HS256"],
            audience="foredeck-internal",
            issuer="foredeck-gateway",
            leeway=timedelta(seconds=5),
        )


def _per_call_us(call: Callable[[], object], iterations: int, *, refused: bool = False) -> float:
    """Median over repeats of the mean time of one call, in microseconds.

    ``refused`` inputs must fail every time (checked), valid ones never.
    """
    samples = []
    for repeat in range(REPEATS + 1):
        failures = 0
        start = time.perf_counter()
        for _ in range(iterations):
            try:
                call()
            except (ServiceError, jwt.PyJWTError, ValueError):
                failures += 1
        elapsed = time.perf_counter() - start
        if failures != (iterations if refused else 0):
            raise AssertionError(f"{failures} of {iterations} calls failed")
        if repeat:  # the first round warms up
            samples.append(elapsed / iterations * 1e6)
    return statistics.median(samples)


def _garbage(kid: str, signing_key: bytes) -> dict[str, str]:
    size = 8192
    header = _b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
    payload = "A" * (size - len(header) - 45)
    return {
        "8 KB garbage, JWT-shaped": f"{'e' * 2000}.{'y' * (size - 2046)}.{'s' * 43}",
        "8 KB, valid header, bad sig": f"{header}.{payload}.{'s' * 43}",
        "8 KB, no dots": "x" * size,
    }


def run() -> None:
    """Print verification costs (µs per call) and token sizes."""
    kid = "gw-2025-01"
    key = generate_key()
    keys = {kid: key}
    signer = PrincipalSigner(keys, kid)
    new_token = signer.mint(
        tenant_id=TENANT, user_id=USER, permissions=PERMISSIONS, budget_ids=BUDGETS
    )
    old_token = _old_token(key, kid)
    delegated = DelegationSigner({"orch-2025-01": generate_key()}, "orch-2025-01").mint_for_run(
        RunClaims(TENANT, USER, tuple(PERMISSIONS), tuple(BUDGETS)), "run-01J9Z6X8Q4M7XW"
    )

    cached = PrincipalVerifier(keys)
    uncached = PrincipalVerifier(keys, cache_size=0)
    old = _PyJwtVerifier(keys)
    cached.verify(new_token)

    rows: list[tuple[str, float | None, float]] = [
        ("valid, cached", None, _per_call_us(lambda: cached.verify(new_token), 200_000)),
        (
            "valid, uncached",
            _per_call_us(lambda: old.verify(old_token), 5_000),
            _per_call_us(lambda: uncached.verify(new_token), 20_000),
        ),
    ]
    for name, token in _garbage(kid, key).items():
        rows.append(
            (
                name,
                _per_call_us(lambda t=token: old.verify(t), 2_000, refused=True),  # type: ignore[misc]
                _per_call_us(lambda t=token: uncached.verify(t), 20_000, refused=True),  # type: ignore[misc]
            )
        )

    print("\nprincipal verification: µs per call, kit (stdlib) vs previous PyJWT path (same run)")
    print(f"{'input':<30}{'PyJWT':>10}{'kit':>10}{'ratio':>9}")
    for name, before, after in rows:
        if before is None:
            print(f"{name:<30}{'-':>10}{after:>10.2f}{'':>9}")
        else:
            print(f"{name:<30}{before:>10.2f}{after:>10.2f}{after / before:>8.2f}x")
    print(
        f"token size, 10 permissions + 2 budgets: before {len(old_token)} chars, "
        f"now {len(new_token)} (gateway), {len(delegated)} (delegated)"
    )


if __name__ == "__main__":
    run()
