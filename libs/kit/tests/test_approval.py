"""Approval tokens: signed by the orchestrator's delegation keys, bound to one exact tool call."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from pydantic import SecretStr

from foredeck_kit.approval import (
    APPROVAL_AUDIENCE,
    APPROVAL_CATEGORY_KEY,
    APPROVAL_CHECK_KEY,
    ApprovalTokenSigner,
    ApprovalTokenVerifier,
    arguments_digest,
    arguments_json_digest,
    canonical_json,
)
from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.errors import Reason, ServiceError
from foredeck_kit.principal import (
    Principal,
    PrincipalKind,
    PrincipalSigner,
    PrincipalVerifier,
    format_keys,
    principal_scope,
)
from foredeck_kit.settings import ServiceSettings

DELEGATION_KEYS = {"orch1": b"o" * 32, "orch2": b"p" * 32}
GATEWAY_KEYS = {"gw1": b"g" * 32}
ARGUMENTS = {"query": "weather in Zürich", "limit": 3, "filters": {"b": True, "a": None}}
DIGEST = arguments_digest(ARGUMENTS)


def _principal(tenant: str = "tenant-1", run_id: str | None = "run-1") -> Principal:
    return Principal(
        tenant_id=tenant,
        user_id="user-1",
        permissions=frozenset({"tools:*"}),
        budget_ids=(),
        kind=PrincipalKind.USER,
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
        token_id="j",
        actor="orchestrator" if run_id else None,
        run_id=run_id,
    )


def _mint(**overrides: Any) -> str:
    values: dict[str, Any] = {
        "tenant_id": "tenant-1",
        "run_id": "run-1",
        "step_id": "step-4",
        "tool_name": "web_search",
        "arguments_digest": DIGEST,
    }
    values.update(overrides)
    return ApprovalTokenSigner(DELEGATION_KEYS, "orch1").mint(**values)


def _verify(token: str, **overrides: Any) -> Any:
    call: dict[str, Any] = {
        "tool_name": "web_search",
        "arguments_digest": DIGEST,
        "principal": _principal(),
        "run_id": "run-1",
        "step_id": "step-4",
    }
    call.update(overrides)
    return ApprovalTokenVerifier(DELEGATION_KEYS).verify(token, **call)


def _refusal(token: str, **overrides: Any) -> tuple[str, str]:
    """The failed check and its category, after asserting the refusal's fixed shape."""
    with pytest.raises(ServiceError) as caught:
        _verify(token, **overrides)
    error = caught.value
    assert (error.code, error.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        Reason.PERMISSION_MISSING,
    )
    assert error.message == "approval token not valid for this call"
    assert error.metadata["toolName"] == overrides.get("tool_name", "web_search")
    return error.metadata[APPROVAL_CHECK_KEY], error.metadata[APPROVAL_CATEGORY_KEY]


def _hand_signed(claims: dict[str, Any], keys: dict[str, bytes] = DELEGATION_KEYS) -> str:
    kid = next(iter(keys))
    return jwt.encode(claims, keys[kid], algorithm="HS256", headers={"kid": kid})


def test_canonical_json_and_digests() -> None:
    assert canonical_json(ARGUMENTS) == (
        '{"filters":{"a":null,"b":true},"limit":3,"query":"weather in Zürich"}'.encode()
    )
    assert hashlib.sha256(canonical_json(ARGUMENTS)).hexdigest() == DIGEST
    spaced = (
        '{ "query" : "weather in Z\\u00fcrich",\n "limit": 3, "filters": {"a": null, "b": true}}'
    )
    assert arguments_json_digest(spaced) == DIGEST
    assert arguments_json_digest('{"limit": 4}') != arguments_json_digest('{"limit": 3}')
    for strict in ('{"a": 1, "a": 2}', '{"a": NaN}', '{"a": Infinity}', "{'a': 1}", ""):
        with pytest.raises(ValueError):  # noqa: PT011 - json's own messages vary
            arguments_json_digest(strict)
    for not_json in ({"a": float("nan")}, {1: "a"}, {"a": {1, 2}}, "\ud800"):
        with pytest.raises(ValueError):  # noqa: PT011 - each has its own message
            canonical_json(not_json)


@pytest.mark.parametrize(
    ("number", "written"),
    [
        # ECMAScript's number to string, as RFC 8785 requires (its appendix B and ES6 7.1.12.1).
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-1.5, "-1.5"),
        (0.002, "0.002"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (123e-20, "1.23e-18"),
        (1e16, "10000000000000000"),
        (1e21, "1e+21"),
        (1.2345678901234568e20, "123456789012345680000"),
        (333333333.3333333, "333333333.3333333"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (4.5, "4.5"),
        (9007199254740991, "9007199254740991"),
        (9007199254740993, "9007199254740992"),
        (10**21, "1e+21"),
        (-(10**25), "-1e+25"),
    ],
)
def test_numbers_are_written_as_rfc_8785_requires(number: float, written: str) -> None:
    assert canonical_json([number]) == f"[{written}]".encode()


def test_keys_are_ordered_by_utf16_code_units_and_strings_escaped_minimally() -> None:
    # U+10000 is D800 DC00 in UTF-16, so it sorts before U+FB33 although its code point is higher.
    assert canonical_json({"\ufb33": 1, "\U00010000": 2, "a": 3, "": 4}) == (
        '{"":4,"a":3,"\U00010000":2,"\ufb33":1}'.encode()
    )
    assert canonical_json('\u20ac$\u000f\n"\\\u007f') == b'"\xe2\x82\xac$\\u000f\\n\\"\\\\\x7f"'
    assert arguments_json_digest('{"b": 1.0, "a": [1e21, 10]}') == arguments_digest(
        {"a": [1e21, 10], "b": 1}
    )


def test_an_approval_matches_its_call() -> None:
    token = _mint()
    approval = _verify(token)
    assert (approval.tenant_id, approval.run_id, approval.step_id) == (
        "tenant-1",
        "run-1",
        "step-4",
    )
    assert (approval.tool_name, approval.arguments_digest) == ("web_search", DIGEST)
    assert approval.expires_at <= datetime.now(UTC) + timedelta(minutes=2, seconds=1)
    assert approval.token_id
    claims = jwt.decode(
        token, DELEGATION_KEYS["orch1"], algorithms=["HS256"], audience=APPROVAL_AUDIENCE
    )
    assert claims["iss"] == "foredeck-orchestrator"
    assert set(claims) == {"iss", "aud", "tid", "rid", "sid", "tool", "args", "iat", "exp", "jti"}
    assert claims["args"] == DIGEST
    # A gateway principal (not tied to a run) may present it too: the request's run decides.
    assert _verify(token, principal=_principal(run_id=None)).run_id == "run-1"


def test_the_current_principal_is_used_by_default() -> None:
    token = _mint()
    verifier = ApprovalTokenVerifier(DELEGATION_KEYS)
    call: dict[str, Any] = {
        "tool_name": "web_search",
        "arguments_digest": DIGEST,
        "run_id": "run-1",
        "step_id": "step-4",
    }
    with principal_scope(_principal()):
        assert verifier.verify(token, **call).step_id == "step-4"
    with pytest.raises(ServiceError) as caught:
        verifier.verify(token, **call)
    assert caught.value.reason == Reason.PRINCIPAL_MISSING


def test_anything_else_than_the_approved_call_is_a_mismatch() -> None:
    token = _mint()
    other_args = arguments_digest({**ARGUMENTS, "limit": 30})
    refusals = {
        "tenant": _refusal(token, principal=_principal(tenant="tenant-2")),
        "principal's run": _refusal(token, principal=_principal(run_id="run-2")),
        "request's run": _refusal(token, run_id="run-2", principal=_principal(run_id=None)),
        "step": _refusal(token, step_id="step-5"),
        "tool": _refusal(token, tool_name="send_email"),
        "arguments": _refusal(token, arguments_digest=other_args),
    }
    assert refusals == {
        "tenant": ("tenant", "mismatch"),
        "principal's run": ("run", "mismatch"),
        "request's run": ("run", "mismatch"),
        "step": ("step", "mismatch"),
        "tool": ("tool", "mismatch"),
        "arguments": ("arguments", "mismatch"),
    }


def test_forged_stale_or_misdirected_tokens_are_refused() -> None:
    now = int(time.time())
    base = jwt.decode(_mint(), options={"verify_signature": False})
    gateway_principal = PrincipalSigner(GATEWAY_KEYS, "gw1").mint(tenant_id="tenant-1", user_id="u")
    delegated_principal = DelegationSigner(DELEGATION_KEYS, "orch1").mint_for_run(
        RunClaims("tenant-1", "user-1"), "run-1"
    )
    refusals = {
        "expired": _refusal(_mint(now=datetime.now(UTC) - timedelta(minutes=10))),
        "gateway key": _refusal(_hand_signed(base, GATEWAY_KEYS)),
        "wrong audience": _refusal(_hand_signed({**base, "aud": "foredeck-internal"})),
        "wrong issuer": _refusal(_hand_signed({**base, "iss": "foredeck-gateway"})),
        "a principal": _refusal(delegated_principal),
        "a gateway principal": _refusal(gateway_principal),
        "six minutes long": _refusal(_hand_signed({**base, "iat": now, "exp": now + 360})),
        "exp in milliseconds": _refusal(_hand_signed({**base, "exp": (now + 60) * 1000})),
        "no step": _refusal(_hand_signed({k: v for k, v in base.items() if k != "sid"})),
        "args not a string": _refusal(_hand_signed({**base, "args": 1})),
        "no token id": _refusal(_hand_signed({k: v for k, v in base.items() if k != "jti"})),
        "garbage": _refusal("garbage"),
        "empty": _refusal(""),
    }
    assert refusals == {
        "expired": ("expiry", "expired"),
        "gateway key": ("signature", "invalid"),
        "wrong audience": ("audience", "invalid"),
        "wrong issuer": ("issuer", "invalid"),
        "a principal": ("audience", "invalid"),
        "a gateway principal": ("signature", "invalid"),
        "six minutes long": ("expiry", "invalid"),
        "exp in milliseconds": ("expiry", "invalid"),
        "no step": ("step", "mismatch"),
        "args not a string": ("arguments", "mismatch"),
        "no token id": ("signature", "invalid"),
        "garbage": ("signature", "invalid"),
        "empty": ("signature", "invalid"),
    }


def test_an_approval_token_is_not_a_principal() -> None:
    verifier = PrincipalVerifier(GATEWAY_KEYS, delegation_keys=DELEGATION_KEYS)
    with pytest.raises(ServiceError) as caught:
        verifier.verify(_mint())
    assert caught.value.reason == Reason.PRINCIPAL_INVALID


def test_lifetimes_are_short_and_capped() -> None:
    with pytest.raises(ValueError, match="approval ttl"):
        _mint(ttl=timedelta(minutes=6))
    with pytest.raises(ValueError, match="approval ttl"):
        ApprovalTokenSigner(DELEGATION_KEYS, "orch1", ttl=timedelta(hours=1))
    with pytest.raises(ValueError, match="hex SHA-256"):
        _mint(arguments_digest="abc")
    with pytest.raises(ValueError, match="hex SHA-256"):
        _mint(arguments_digest=DIGEST.upper())
    with pytest.raises(ValueError, match="required"):
        _mint(step_id="")
    with pytest.raises(ValueError, match="hex SHA-256"):
        _verify(_mint(), arguments_digest="not-a-digest")


def test_the_toolrunner_chooses_its_reason() -> None:
    verifier = ApprovalTokenVerifier(DELEGATION_KEYS, reason="APPROVAL_INVALID")
    with pytest.raises(ServiceError) as caught:
        verifier.verify(
            _mint(),
            tool_name="other",
            arguments_digest=DIGEST,
            run_id="run-1",
            step_id="step-4",
            principal=_principal(),
        )
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "APPROVAL_INVALID",
    )
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        ApprovalTokenVerifier(DELEGATION_KEYS, reason="approval-invalid")


def test_settings_build_approval_signer_and_verifier_from_delegation_keys() -> None:
    settings = ServiceSettings(
        principal_keys=SecretStr(format_keys(GATEWAY_KEYS)),
        delegation_keys=SecretStr(format_keys(DELEGATION_KEYS)),
    )
    token = settings.approval_signer().mint(
        tenant_id="tenant-1",
        run_id="run-1",
        step_id="s",
        tool_name="web_search",
        arguments_digest=DIGEST,
    )
    assert jwt.get_unverified_header(token)["kid"] == "orch1"
    approval = settings.approval_verifier().verify(
        token,
        tool_name="web_search",
        arguments_digest=DIGEST,
        run_id="run-1",
        step_id="s",
        principal=_principal(),
    )
    assert approval.step_id == "s"
