"""Principal: minting, verification and its enforcement by the server interceptor."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from foredeck_kit.errors import Reason, ServiceError, error_details
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    Principal,
    PrincipalKind,
    PrincipalSigner,
    PrincipalVerifier,
    current_principal,
    format_keys,
    generate_key,
    optional_principal,
    parse_keys,
)
from foredeck_testing.echo import Message, register, server_stream, unary, unary_call
from foredeck_testing.server import RunningServer, running_server

DOMAIN = "kittest.foredeck.dev"
KEYS = {"k1": b"k" * 32, "k2": b"q" * 40}


def _signer(kid: str = "k1", **kwargs: Any) -> PrincipalSigner:
    return PrincipalSigner(KEYS, kid, **kwargs)


def _verifier(**kwargs: Any) -> PrincipalVerifier:
    return PrincipalVerifier(KEYS, **kwargs)


def _reason(token: str, verifier: PrincipalVerifier | None = None) -> str:
    with pytest.raises(ServiceError) as caught:
        (verifier or _verifier()).verify(token)
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    return caught.value.reason


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    claims: dict[str, Any] = {
        "iss": "foredeck-gateway",
        "aud": "foredeck-internal",
        "sub": "u1",
        "tid": "t1",
        "perms": ["runs:read"],
        "bud": [],
        "kind": "user",
        "iat": now,
        "exp": now + 60,
        "jti": "j1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_round_trip() -> None:
    token = _signer().mint(
        tenant_id="t1",
        user_id="u1",
        permissions=["runs:read", "tools:*"],
        budget_ids=["b1", "b2"],
        kind=PrincipalKind.SERVICE,
    )
    principal = _verifier().verify(token)
    assert principal.tenant_id == "t1"
    assert principal.user_id == "u1"
    assert principal.permissions == frozenset({"runs:read", "tools:*"})
    assert principal.budget_ids == ("b1", "b2")
    assert principal.kind is PrincipalKind.SERVICE
    assert principal.expires_at > datetime.now(UTC)
    assert principal.token_id
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "kid": "k1", "typ": "JWT"}


def test_key_rotation_accepts_every_configured_key() -> None:
    for kid in KEYS:
        token = _signer(kid).mint(tenant_id="t", user_id="u")
        assert _verifier().verify(token).user_id == "u"


def test_permission_wildcards() -> None:
    principal = _verifier().verify(
        _signer().mint(tenant_id="t", user_id="u", permissions=["runs:read", "tools:*"])
    )
    assert principal.has("runs:read")
    assert not principal.has("runs:write")
    assert principal.has("tools:calculator")
    assert principal.has("tools:web:fetch")
    assert not principal.has("toolsx")
    with pytest.raises(ServiceError) as caught:
        principal.require("runs:write")
    assert caught.value.reason == Reason.PERMISSION_MISSING
    admin = _verifier().verify(_signer().mint(tenant_id="t", user_id="u", permissions=["*"]))
    assert admin.has("anything:at:all")


def test_expired_token_is_expired_not_invalid() -> None:
    old = datetime.now(UTC) - timedelta(hours=1)
    token = _signer().mint(tenant_id="t", user_id="u", now=old, ttl=timedelta(minutes=5))
    assert _reason(token) == Reason.PRINCIPAL_EXPIRED
    # Within the leeway a just-expired token still passes (clock skew between pods).
    recent = datetime.now(UTC) - timedelta(seconds=62)
    token = _signer().mint(tenant_id="t", user_id="u", now=recent, ttl=timedelta(seconds=60))
    assert _verifier(leeway=timedelta(seconds=30)).verify(token).user_id == "u"


def test_verified_tokens_are_remembered_until_expiry() -> None:
    now = time.time()
    verifier = PrincipalVerifier(KEYS, leeway=timedelta(seconds=5), cache_size=2, clock=lambda: now)
    token = _signer().mint(tenant_id="t", user_id="u", ttl=timedelta(seconds=60))
    first = verifier.verify(token)
    assert verifier.verify(token) is first
    now += 64  # past expiry but within the leeway
    assert verifier.verify(token) is first
    now += 2
    assert _reason(token, verifier) == Reason.PRINCIPAL_EXPIRED
    others = [_signer().mint(tenant_id="t", user_id=f"u{i}") for i in range(3)]
    now = time.time()
    assert [verifier.verify(t).user_id for t in others] == ["u0", "u1", "u2"]


def test_forgeries_are_invalid() -> None:
    good = _signer().mint(tenant_id="t1", user_id="u1")
    header_b64, _, signature = good.split(".")

    wrong_key = jwt.encode(_claims(), b"x" * 32, algorithm="HS256", headers={"kid": "k1"})
    alg_none = f"{_b64({'alg': 'none', 'kid': 'k1', 'typ': 'JWT'})}.{_b64(_claims())}."
    hs512 = jwt.encode(_claims(), b"k" * 64, algorithm="HS512", headers={"kid": "k1"})
    unknown_kid = jwt.encode(_claims(), KEYS["k1"], algorithm="HS256", headers={"kid": "k9"})
    no_kid = jwt.encode(_claims(), KEYS["k1"], algorithm="HS256")
    tampered = f"{header_b64}.{_b64(_claims(tid='other-tenant'))}.{signature}"
    forgeries = {
        "wrong key": wrong_key,
        "alg none": alg_none,
        "alg HS512": hs512,
        "unknown kid": unknown_kid,
        "no kid": no_kid,
        "tampered payload": tampered,
        "wrong audience": _signer(audience="somebody-else").mint(tenant_id="t", user_id="u"),
        "wrong issuer": _signer(issuer="evil").mint(tenant_id="t", user_id="u"),
        "garbage": "not-a-token",
        "empty": "",
        "oversized": good + "A" * 10_000,
    }
    for claim in ("tid", "sub", "perms", "kind", "exp", "jti", "aud", "iss", "iat"):
        forgeries[f"missing {claim}"] = jwt.encode(
            _claims(**{claim: None}), KEYS["k1"], algorithm="HS256", headers={"kid": "k1"}
        )
    forgeries["bad kind"] = jwt.encode(
        _claims(kind="root"), KEYS["k1"], algorithm="HS256", headers={"kid": "k1"}
    )
    forgeries["perms not a list"] = jwt.encode(
        _claims(perms="*"), KEYS["k1"], algorithm="HS256", headers={"kid": "k1"}
    )
    forgeries["empty tenant"] = jwt.encode(
        _claims(tid=""), KEYS["k1"], algorithm="HS256", headers={"kid": "k1"}
    )
    results = {name: _reason(token) for name, token in forgeries.items()}
    assert results == dict.fromkeys(forgeries, Reason.PRINCIPAL_INVALID)


def test_parse_keys() -> None:
    secret = "s" * 32
    assert parse_keys(f"a:{secret}, b:{secret}x") == {
        "a": secret.encode(),
        "b": (secret + "x").encode(),
    }
    keys = {"a": generate_key(), "b": generate_key()}
    assert parse_keys(format_keys(keys)) == keys
    for bad, match in [
        ("a:short", "at least 32"),
        (f"a:{secret},a:{secret}", "twice"),
        (secret, "kid:secret"),
        (f":{secret}", "kid:secret"),
        ("", "no principal keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_keys(bad)


def test_signer_and_verifier_refuse_weak_setups() -> None:
    with pytest.raises(ValueError, match="32"):
        PrincipalVerifier({"k": b"short"})
    with pytest.raises(ValueError, match="active key"):
        PrincipalSigner(KEYS, "nope")
    with pytest.raises(ValueError, match="ttl"):
        PrincipalSigner(KEYS, "k1", ttl=timedelta(0))


def test_current_principal_outside_rpc_is_missing() -> None:
    assert optional_principal() is None
    with pytest.raises(ServiceError) as caught:
        current_principal()
    assert caught.value.reason == Reason.PRINCIPAL_MISSING


# --- enforced by the server ---------------------------------------------------------------

seen: list[Principal] = []


async def _whoami(request: Message, context: Any) -> Message:
    principal = current_principal()
    seen.append(principal)
    return Message(value=f"{principal.tenant_id}/{principal.user_id}")


async def _public(request: Message, context: Any) -> Message:
    return Message(value="public" if optional_principal() is None else "known")


async def _whoami_stream(request: Message, context: Any) -> AsyncIterator[Message]:
    for _ in range(2):
        yield Message(value=current_principal().user_id)


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[RunningServer]:
    async with running_server(
        register(
            {
                "WhoAmI": unary(_whoami),
                "Public": unary(_public),
                "WhoAmIStream": server_stream(_whoami_stream),
            }
        ),
        service_names=["foredeck.kittest.v1.EchoService"],
        domain=DOMAIN,
        public_methods=["foredeck.kittest.v1.EchoService/Public"],
        keys=KEYS,
    ) as srv:
        yield srv


async def _call_reason(server: RunningServer, metadata: Any) -> str | None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary_call(server.channel, "WhoAmI")(Message(), metadata=metadata, timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    details = error_details(caught.value)
    assert details.domain == DOMAIN
    return details.reason


async def test_call_without_principal_is_missing(server: RunningServer) -> None:
    assert await _call_reason(server, None) == Reason.PRINCIPAL_MISSING


async def test_expired_principal_is_expired(server: RunningServer) -> None:
    token = _signer().mint(tenant_id="t", user_id="u", now=datetime.now(UTC) - timedelta(hours=1))
    assert await _call_reason(server, ((PRINCIPAL_METADATA_KEY, token),)) == (
        Reason.PRINCIPAL_EXPIRED
    )


async def test_forged_principals_are_invalid(server: RunningServer) -> None:
    good = _signer().mint(tenant_id="t1", user_id="u1")
    header_b64, _, signature = good.split(".")
    forged = {
        "wrong key": PrincipalSigner({"k1": b"z" * 32}, "k1").mint(tenant_id="t", user_id="u"),
        "alg none": f"{_b64({'alg': 'none', 'kid': 'k1'})}.{_b64(_claims())}.",
        "wrong audience": _signer(audience="public").mint(tenant_id="t", user_id="u"),
        "tampered": f"{header_b64}.{_b64(_claims(tid='victim'))}.{signature}",
    }
    for token in forged.values():
        assert await _call_reason(server, ((PRINCIPAL_METADATA_KEY, token),)) == (
            Reason.PRINCIPAL_INVALID
        )
    twice = ((PRINCIPAL_METADATA_KEY, good), (PRINCIPAL_METADATA_KEY, good))
    assert await _call_reason(server, twice) == Reason.PRINCIPAL_INVALID


async def test_valid_principal_reaches_the_handler(server: RunningServer) -> None:
    seen.clear()
    metadata = server.mint("tenant-7", "user-9", ["runs:read"], budget_ids=["b"])
    reply = await unary_call(server.channel, "WhoAmI")(Message(), metadata=metadata, timeout=10)
    assert reply.value == "tenant-7/user-9"
    assert seen[0].permissions == frozenset({"runs:read"})
    assert seen[0].budget_ids == ("b",)
    stream = server.channel.unary_stream(
        "/foredeck.kittest.v1.EchoService/WhoAmIStream",
        request_serializer=Message.SerializeToString,
        response_deserializer=Message.FromString,
    )
    assert [m.value async for m in stream(Message(), metadata=metadata)] == ["user-9", "user-9"]


async def test_health_and_public_methods_need_no_principal(server: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    public = await unary_call(server.channel, "Public")(Message(), timeout=10)
    assert public.value == "public"
