"""Principal: minting, verification and its enforcement by the server interceptor."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import random
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


def _b64(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    claims: dict[str, Any] = {
        "iss": "foredeck-gateway",
        "aud": "foredeck-internal",
        "sub": "u1",
        "tid": "t1",
        "scope": "runs:read",
        "iat": now,
        "exp": now + 60,
        "jti": "j1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _signed(claims: dict[str, Any], kid: str = "k1", **headers: Any) -> str:
    """A token signed by hand with a stock library, as a forger holding a key would."""
    return jwt.encode(claims, KEYS[kid], algorithm="HS256", headers={"kid": kid, **headers})


def _raw_signed(payload: bytes, header: Any = None) -> str:
    """Sign arbitrary bytes with key k1, for payloads and headers a library refuses to make."""
    header_json = json.dumps(header if header is not None else {"alg": "HS256", "kid": "k1"})
    signing_input = (
        base64.urlsafe_b64encode(header_json.encode()).rstrip(b"=")
        + b"."
        + base64.urlsafe_b64encode(payload).rstrip(b"=")
    )
    signature = hmac.digest(KEYS["k1"], signing_input, "sha256")
    return (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


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
    assert (principal.actor, principal.run_id, principal.delegated) == (None, None, False)
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "kid": "k1"}


def test_tokens_are_standard_jwts_and_compact() -> None:
    token = _signer().mint(tenant_id="t1", user_id="u1", permissions=["b:x", "a:y"])
    # Any stock library verifies them: services in other languages need nothing of ours.
    claims = jwt.decode(token, KEYS["k1"], algorithms=["HS256"], audience="foredeck-internal")
    assert claims["scope"] == "a:y b:x"
    assert claims["exp"] - claims["iat"] == 300
    # Empty claims are left out: every call carries the token.
    assert "bud" not in claims
    assert "kind" not in claims
    assert len(base64.urlsafe_b64decode(claims["jti"] + "==")) == 16
    plain = _verifier().verify(_signer().mint(tenant_id="t", user_id="u"))
    assert (plain.permissions, plain.budget_ids, plain.kind) == (
        frozenset(),
        (),
        PrincipalKind.USER,
    )


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


def test_cache_is_bounded_and_keeps_the_recently_used() -> None:
    verifier = PrincipalVerifier(KEYS, cache_size=2)
    a, b, c = (_signer().mint(tenant_id="t", user_id=u) for u in "abc")
    first_a, first_b = verifier.verify(a), verifier.verify(b)
    assert verifier.verify(a) is first_a  # a is now the most recently used
    verifier.verify(c)  # evicts b, the least recently used
    assert verifier.verify(a) is first_a
    again_b = verifier.verify(b)
    assert again_b == first_b
    assert again_b is not first_b
    uncached = PrincipalVerifier(KEYS, cache_size=0)
    assert uncached.verify(a) is not uncached.verify(a)


def _forgeries() -> dict[str, str]:
    good = _signer().mint(tenant_id="t1", user_id="u1")
    header_b64, payload_b64, signature = good.split(".")
    now = int(time.time())
    forgeries = {
        "wrong key": jwt.encode(_claims(), b"x" * 32, algorithm="HS256", headers={"kid": "k1"}),
        "alg none": f"{_b64({'alg': 'none', 'kid': 'k1', 'typ': 'JWT'})}.{_b64(_claims())}.",
        "alg HS512": jwt.encode(_claims(), b"k" * 64, algorithm="HS512", headers={"kid": "k1"}),
        "unknown kid": jwt.encode(_claims(), KEYS["k1"], algorithm="HS256", headers={"kid": "k9"}),
        "no kid": jwt.encode(_claims(), KEYS["k1"], algorithm="HS256"),
        "crit header": _signed(_claims(), crit=["exp"]),
        "other typ": _signed(_claims(), typ="at+jwt"),
        "tampered payload": f"{header_b64}.{_b64(_claims(tid='other-tenant'))}.{signature}",
        "signature re-spelt": f"{header_b64}.{payload_b64}.{signature[:-1]}"
        + ("B" if signature[-1] == "A" else "A"),
        "two signatures": f"{good}.{signature}",
        "wrong audience": _signer(audience="somebody-else").mint(tenant_id="t", user_id="u"),
        "wrong issuer": _signer(issuer="evil").mint(tenant_id="t", user_id="u"),
        "garbage": "not-a-token",
        "empty": "",
        "oversized": good + "A" * 10_000,
        "just over the cap": f"{header_b64}.{'A' * 2100}.{signature}",
        "payload not an object": _raw_signed(b"[1,2]"),
        "payload not JSON": _raw_signed(b"{exp:1}"),
        "payload not UTF-8": _raw_signed(b'{"sub":"\xff"}'),
        "exp in milliseconds": _signed(_claims(iat=now * 1000, exp=(now + 60) * 1000)),
        "exp in milliseconds, iat in seconds": _signed(_claims(exp=(now + 60) * 1000)),
        "exp overflows": _signed(_claims(exp=10**30)),
        "exp with a thousand digits": _signed(_claims(exp=10**1000)),
        "exp a float": _signed(_claims(exp=now + 60.5)),
        "exp a bool": _signed(_claims(exp=True)),
        "exp a string": _signed(_claims(exp=str(now + 60))),
        "iat negative": _signed(_claims(iat=-1)),
        "ten-year token": _signed(_claims(exp=now + 10 * 365 * 86400)),
        "sixteen-minute token": _signed(_claims(exp=now + 16 * 60)),
        "expires before issued": _signed(_claims(iat=now, exp=now - 1)),
        "issued in the future": _signed(_claims(iat=now + 600, exp=now + 660)),
        "not yet valid": _signed(_claims(nbf=now + 600)),
        "bad kind": _signed(_claims(kind="root")),
        "scope not a string": _signed(_claims(scope=["*"])),
        "budgets not a list": _signed(_claims(bud="b1")),
        "empty tenant": _signed(_claims(tid="")),
        "gateway principal claiming an actor": _signed(_claims(act={"sub": "orchestrator"})),
        "gateway principal claiming a run": _signed(_claims(rid="run-1")),
    }
    claims = json.dumps(_claims()).encode()
    forgeries["kid not a string"] = _raw_signed(claims, {"alg": "HS256", "kid": 1})
    forgeries["header not an object"] = _raw_signed(claims, ["HS256", "k1"])
    forgeries["embedded key"] = _raw_signed(claims, {"alg": "HS256", "kid": "k1", "jwk": {}})
    for claim in ("tid", "sub", "exp", "jti", "aud", "iss", "iat"):
        forgeries[f"missing {claim}"] = _signed(_claims(**{claim: None}))
    return forgeries


def test_forgeries_are_invalid_with_one_message() -> None:
    forgeries = _forgeries()
    results: dict[str, tuple[str, str]] = {}
    for name, token in forgeries.items():
        with pytest.raises(ServiceError) as caught:
            _verifier().verify(token)
        assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED, name
        results[name] = (caught.value.reason, caught.value.message)
    # One fixed message whatever failed: the wire tells a prober nothing about which check.
    expected = (Reason.PRINCIPAL_INVALID, ServiceError.principal_invalid().message)
    assert results == dict.fromkeys(forgeries, expected)


def test_max_lifetime_is_configurable() -> None:
    now = int(time.time())
    hour = _signed(_claims(iat=now, exp=now + 3600))
    assert _reason(hour) == Reason.PRINCIPAL_INVALID
    assert _verifier(max_lifetime=timedelta(hours=1)).verify(hour).tenant_id == "t1"
    with pytest.raises(ValueError, match="maximum lifetime"):
        _signer().mint(tenant_id="t", user_id="u", ttl=timedelta(minutes=16))
    with pytest.raises(ValueError, match="maximum lifetime"):
        PrincipalSigner(KEYS, "k1", ttl=timedelta(hours=1))
    long_lived = PrincipalSigner(
        KEYS, "k1", ttl=timedelta(hours=1), max_lifetime=timedelta(hours=2)
    )
    assert _reason(long_lived.mint(tenant_id="t", user_id="u")) == Reason.PRINCIPAL_INVALID


def test_rejection_cause_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    unknown_kid = jwt.encode(_claims(), KEYS["k1"], algorithm="HS256", headers={"kid": "k9"})
    with caplog.at_level(logging.INFO, logger="foredeck.principal"):
        _reason(unknown_kid)
    assert not caplog.records
    with caplog.at_level(logging.DEBUG, logger="foredeck.principal"):
        _reason(unknown_kid)
    assert [r.getMessage() for r in caplog.records] == ["principal rejected: key id unknown"]


def test_mutated_tokens_never_raise_anything_but_a_service_error() -> None:
    good = _signer().mint(tenant_id="t1", user_id="u1", permissions=["runs:read"])
    alphabet = 'ABCxyz019-_.=+/ é{}"\x00'
    rng = random.Random(7)
    verifier = _verifier(cache_size=0)
    outcomes: set[str] = set()
    for _ in range(2000):
        chars = list(good)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.4:
                chars[position] = rng.choice(alphabet)
            elif action < 0.7:
                del chars[position]
            else:
                chars.insert(position, rng.choice(alphabet))
        mutated = "".join(chars)
        try:
            outcomes.add(verifier.verify(mutated).user_id)
        except ServiceError as error:
            outcomes.add(error.reason)
    # Only a mutation that changed nothing signed (e.g. an appended "=") may pass.
    assert outcomes <= {Reason.PRINCIPAL_INVALID, "u1"}
    assert Reason.PRINCIPAL_INVALID in outcomes


def test_signer_refuses_what_would_not_verify() -> None:
    with pytest.raises(ValueError, match="without spaces"):
        _signer().mint(tenant_id="t", user_id="u", permissions=["runs:read tools:*"])
    with pytest.raises(ValueError, match="without spaces"):
        _signer().mint(tenant_id="t", user_id="u", permissions=[""])
    with pytest.raises(ValueError, match="over 2048"):
        _signer().mint(tenant_id="t", user_id="u", permissions=[f"p:{i:04}" for i in range(300)])
    with pytest.raises(ValueError, match="required"):
        _signer().mint(tenant_id="", user_id="u")


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
