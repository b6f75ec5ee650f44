"""Delegated principals: the orchestrator's issuer and keys, run claims, gateway-only methods."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from pydantic import SecretStr

from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.errors import Reason, ServiceError, error_details
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    Principal,
    PrincipalKind,
    PrincipalSigner,
    PrincipalVerifier,
    current_principal,
    format_keys,
)
from foredeck_kit.server import build_grpc_server
from foredeck_kit.settings import ServiceSettings, SettingsError
from foredeck_testing.echo import SERVICE_NAME, Message, register, unary, unary_call

GATEWAY_KEYS = {"gw1": b"g" * 32, "gw2": b"h" * 32}
DELEGATION_KEYS = {"orch1": b"o" * 32}
CLAIMS = RunClaims(
    tenant_id="tenant-1",
    user_id="user-1",
    permissions=("tools:*", "runs:read"),
    budget_ids=("b-month",),
    kind=PrincipalKind.SERVICE,
)
SUBMIT_ONLY = "/foredeck.orchestrator.v1.OrchestratorService/SubmitRun"


def _verifier(**kwargs: Any) -> PrincipalVerifier:
    return PrincipalVerifier(GATEWAY_KEYS, delegation_keys=DELEGATION_KEYS, **kwargs)


def _delegate(**kwargs: Any) -> DelegationSigner:
    return DelegationSigner(DELEGATION_KEYS, "orch1", **kwargs)


def _fails(token: str, verifier: PrincipalVerifier, **kwargs: Any) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        verifier.verify(token, **kwargs)
    return caught.value


def _hand_signed(claims: dict[str, Any], keys: dict[str, bytes], kid: str) -> str:
    return jwt.encode(claims, keys[kid], algorithm="HS256", headers={"kid": kid})


def _delegated_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "foredeck-orchestrator",
        "aud": "foredeck-internal",
        "sub": "user-1",
        "tid": "tenant-1",
        "act": {"sub": "orchestrator"},
        "rid": "run-1",
        "iat": now,
        "exp": now + 60,
        "jti": "j",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_delegated_principal_carries_the_runs_caller_and_the_actor() -> None:
    token = _delegate().mint_for_run(CLAIMS, "run-42")
    principal = _verifier().verify(token)
    assert (principal.tenant_id, principal.user_id) == ("tenant-1", "user-1")
    assert principal.permissions == frozenset({"tools:*", "runs:read"})
    assert principal.budget_ids == ("b-month",)
    assert principal.kind is PrincipalKind.SERVICE
    assert (principal.actor, principal.run_id, principal.delegated) == (
        "orchestrator",
        "run-42",
        True,
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "foredeck-orchestrator"
    assert claims["act"] == {"sub": "orchestrator"}
    assert claims["rid"] == "run-42"
    assert jwt.get_unverified_header(token)["kid"] == "orch1"


def test_gateway_principals_still_verify_next_to_delegated_ones() -> None:
    gateway = PrincipalSigner(GATEWAY_KEYS, "gw2").mint(tenant_id="t", user_id="u")
    principal = _verifier().verify(gateway)
    assert (principal.user_id, principal.actor, principal.run_id) == ("u", None, None)


def test_each_issuer_is_accepted_only_with_its_own_keys() -> None:
    verifier = _verifier()
    refused = {
        # A gateway key signing what claims to be the orchestrator's principal.
        "gateway key, orchestrator issuer": _hand_signed(_delegated_claims(), GATEWAY_KEYS, "gw1"),
        # The orchestrator's key signing what claims to be the gateway's principal.
        "orchestrator key, gateway issuer": _hand_signed(
            _delegated_claims(iss="foredeck-gateway", act=None, rid=None),
            DELEGATION_KEYS,
            "orch1",
        ),
        "delegated without act": _hand_signed(
            _delegated_claims(act=None), DELEGATION_KEYS, "orch1"
        ),
        "delegated with act not an object": _hand_signed(
            _delegated_claims(act="orchestrator"), DELEGATION_KEYS, "orch1"
        ),
        "delegated without rid": _hand_signed(
            _delegated_claims(rid=None), DELEGATION_KEYS, "orch1"
        ),
        "delegated with an empty actor": _hand_signed(
            _delegated_claims(act={"sub": ""}), DELEGATION_KEYS, "orch1"
        ),
    }
    reasons = {name: _fails(token, verifier).reason for name, token in refused.items()}
    assert reasons == dict.fromkeys(refused, Reason.PRINCIPAL_INVALID)
    # The control: the same claims signed with the orchestrator's key pass.
    assert verifier.verify(_hand_signed(_delegated_claims(), DELEGATION_KEYS, "orch1")).run_id


def test_without_delegation_keys_delegated_principals_are_refused() -> None:
    token = _delegate().mint_for_run(CLAIMS, "run-1")
    error = _fails(token, PrincipalVerifier(GATEWAY_KEYS))
    assert error.reason == Reason.PRINCIPAL_INVALID


def test_key_ids_shared_between_issuers_are_refused() -> None:
    with pytest.raises(ValueError, match="gw1"):
        PrincipalVerifier(GATEWAY_KEYS, delegation_keys={"gw1": b"z" * 32})
    with pytest.raises(ValueError, match="issuer"):
        PrincipalVerifier(
            GATEWAY_KEYS, delegation_keys=DELEGATION_KEYS, delegation_issuer="foredeck-gateway"
        )


def test_gateway_only_methods_refuse_delegated_principals() -> None:
    verifier = _verifier(
        gateway_only_methods=["foredeck.orchestrator.v1.OrchestratorService/SubmitRun"]
    )
    delegated = _delegate().mint_for_run(CLAIMS, "run-1")
    gateway = PrincipalSigner(GATEWAY_KEYS, "gw1").mint(tenant_id="t", user_id="u")
    for _ in range(2):  # the second time from the cache
        error = _fails(delegated, verifier, method=SUBMIT_ONLY)
        assert (error.code, error.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.DELEGATION_NOT_ALLOWED,
        )
        assert verifier.verify(gateway, method=SUBMIT_ONLY).user_id == "u"
        assert verifier.verify(delegated, method="/foredeck.memory.v1.X/Recall").run_id == "run-1"
        assert verifier.verify(delegated).run_id == "run-1"
    assert verifier.requires_gateway(SUBMIT_ONLY.lstrip("/"))


def test_a_delegated_principal_acts_only_for_its_own_run() -> None:
    delegated = _verifier().verify(_delegate().mint_for_run(CLAIMS, "run-1"))
    delegated.require_run("run-1")
    delegated.require_run("")
    delegated.require_run("run-1", required=True)
    for run_id, required in (("run-2", False), ("", True)):
        with pytest.raises(ServiceError) as caught:
            delegated.require_run(run_id, required=required)
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.DELEGATION_NOT_ALLOWED,
        )
    gateway = _verifier().verify(
        PrincipalSigner(GATEWAY_KEYS, "gw1").mint(tenant_id="t", user_id="u")
    )
    gateway.require_run("run-2", required=True)
    gateway.require_run("")


def test_delegated_principals_are_short_lived() -> None:
    with pytest.raises(ValueError, match="maximum lifetime"):
        _delegate().mint_for_run(CLAIMS, "run-1", ttl=timedelta(hours=1))
    with pytest.raises(ValueError, match="run_id"):
        _delegate().mint_for_run(CLAIMS, "")
    now = int(time.time())
    day_long = _hand_signed(_delegated_claims(exp=now + 86400), DELEGATION_KEYS, "orch1")
    assert _fails(day_long, _verifier()).reason == Reason.PRINCIPAL_INVALID


def test_run_claims_round_trip_and_validation() -> None:
    assert RunClaims.from_dict(CLAIMS.to_dict()) == CLAIMS
    assert RunClaims.from_json(CLAIMS.to_json()) == CLAIMS
    assert json.loads(CLAIMS.to_json()) == {
        "tenant_id": "tenant-1",
        "user_id": "user-1",
        "permissions": ["runs:read", "tools:*"],
        "budget_ids": ["b-month"],
        "kind": "service",
    }
    minimal = RunClaims.from_dict({"tenant_id": "t", "user_id": "u"})
    assert (minimal.permissions, minimal.budget_ids, minimal.kind) == ((), (), PrincipalKind.USER)
    principal = _verifier().verify(
        PrincipalSigner(GATEWAY_KEYS, "gw1").mint(
            tenant_id="t",
            user_id="u",
            permissions=["b", "a"],
            budget_ids=["x"],
            kind=PrincipalKind.ADMIN,
        )
    )
    assert RunClaims.from_principal(principal) == RunClaims(
        "t", "u", ("a", "b"), ("x",), PrincipalKind.ADMIN
    )
    for bad in (
        {"user_id": "u"},
        {"tenant_id": "t", "user_id": ""},
        {"tenant_id": "t", "user_id": "u", "permissions": "tools:*"},
        {"tenant_id": "t", "user_id": "u", "permissions": [1]},
        {"tenant_id": "t", "user_id": "u", "permissions": ["a b"]},
        {"tenant_id": "t", "user_id": "u", "budget_ids": [""]},
        {"tenant_id": "t", "user_id": "u", "kind": "root"},
        {"tenant_id": "t", "user_id": "u", "expires": 1},
        ["t", "u"],
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            RunClaims.from_dict(bad)  # type: ignore[arg-type]


# --- settings and a real server ---------------------------------------------------------


def _settings(**overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "principal_keys": SecretStr(format_keys(GATEWAY_KEYS)),
        "delegation_keys": SecretStr(format_keys(DELEGATION_KEYS)),
        "metrics_port": -1,
        "grace_period_seconds": 1.0,
    }
    values.update(overrides)
    return ServiceSettings(**values)


def test_settings_build_a_verifier_for_both_issuers_and_the_signers() -> None:
    settings = _settings()
    verifier = settings.principal_verifier(gateway_only_methods=[SUBMIT_ONLY])
    delegated = settings.delegation_signer().mint_for_run(CLAIMS, "run-9")
    assert verifier.verify(delegated).run_id == "run-9"
    assert _fails(delegated, verifier, method=SUBMIT_ONLY).reason == Reason.DELEGATION_NOT_ALLOWED
    gateway_only = _settings(delegation_keys=SecretStr("")).principal_verifier()
    assert _fails(delegated, gateway_only).reason == Reason.PRINCIPAL_INVALID
    with pytest.raises(SettingsError, match="DELEGATION_KEYS is required"):
        _settings(delegation_keys=SecretStr("")).delegation_signer()


def test_settings_refuse_a_key_id_in_both_sets() -> None:
    clash = _settings(delegation_keys=SecretStr(format_keys({"gw2": b"z" * 32})))
    with pytest.raises(SettingsError, match="gw2") as caught:
        clash.principal_verifier()
    assert "z" * 32 not in str(caught.value)
    with pytest.raises(SettingsError, match="gw2"):
        clash.delegation_signer()


def test_settings_lifetime_applies_to_both_issuers() -> None:
    now = int(time.time())
    hour = _hand_signed(_delegated_claims(exp=now + 3600), DELEGATION_KEYS, "orch1")
    assert _fails(hour, _settings().principal_verifier()).reason == Reason.PRINCIPAL_INVALID
    relaxed = _settings(principal_max_lifetime_seconds=7200).principal_verifier()
    assert relaxed.verify(hour).run_id == "run-1"


async def test_delegated_principal_reaches_a_handler_of_a_real_server() -> None:
    seen: list[Principal] = []

    async def whoami(request: Message, context: Any) -> Message:
        seen.append(current_principal())
        return Message(value="ok")

    settings = _settings()
    host = build_grpc_server(
        settings,
        domain="kittest.foredeck.dev",
        register=register({"WhoAmI": unary(whoami)}),
        service_names=[SERVICE_NAME],
        verifier=settings.principal_verifier(),
    )
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            token = settings.delegation_signer().mint_for_run(CLAIMS, "run-7")
            metadata = ((PRINCIPAL_METADATA_KEY, token),)
            reply = await unary_call(channel, "WhoAmI")(Message(), metadata=metadata, timeout=10)
            assert reply.value == "ok"
            forged = _hand_signed(_delegated_claims(), GATEWAY_KEYS, "gw1")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary_call(channel, "WhoAmI")(
                    Message(), metadata=((PRINCIPAL_METADATA_KEY, forged),), timeout=10
                )
    finally:
        await host.stop(grace=0)
    assert (seen[0].tenant_id, seen[0].actor, seen[0].run_id) == (
        "tenant-1",
        "orchestrator",
        "run-7",
    )
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_details(caught.value).reason == Reason.PRINCIPAL_INVALID
