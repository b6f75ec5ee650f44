"""Authentication matrix: no bad credential is accepted, and none of it reaches the orchestrator."""

from __future__ import annotations

import time
import uuid

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck_gateway.credentials import hash_secret
from foredeck_gateway.errors import DOMAIN
from foredeck_gateway.testing import Gateway, bearer, make_jwt
from foredeck_kit.errors import error_details
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY, PrincipalSigner


async def _reason(call: object) -> tuple[grpc.StatusCode, str | None, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    details = error_details(caught.value)
    assert details.domain == DOMAIN
    return details.code, details.reason, dict(details.metadata)


def _unsigned(token_claims: dict[str, object]) -> str:
    import base64
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(token_claims).encode())}."


async def test_bad_credentials_are_all_refused_before_the_orchestrator(gateway: Gateway) -> None:
    secret, key = await gateway.new_key()
    revoked_secret, revoked = await gateway.new_key(user="gone")
    await gateway.admin.RevokeApiKey(
        gw.RevokeApiKeyRequest(api_key_id=revoked.api_key_id, reason="left"),
        metadata=gateway.admin_md,
    )
    now = int(time.time())
    claims = {
        "iss": "https://idp.test",
        "aud": "foredeck",
        "sub": "jo",
        "tid": "acme",
        "scope": "runs:read",
        "exp": now + 60,
    }
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases: list[tuple[tuple[tuple[str, str], ...], str]] = [
        ((), "CREDENTIALS_MISSING"),
        ((("authorization", "Basic abc"),), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer not-a-credential"),), "CREDENTIALS_MALFORMED"),
        (bearer("fdk_" + "x" * 43), "API_KEY_INVALID"),
        (bearer(secret[:-1] + ("A" if secret[-1] != "A" else "B")), "API_KEY_INVALID"),
        (bearer(revoked_secret), "API_KEY_REVOKED"),
        (bearer(_unsigned(claims)), "JWT_INVALID"),
        (bearer(make_jwt(key="w" * 40)), "JWT_INVALID"),
        (bearer(make_jwt(aud="someone-else")), "JWT_INVALID"),
        (bearer(make_jwt(iss="https://evil.test")), "JWT_INVALID"),
        (bearer(make_jwt(lifetime=-120)), "JWT_EXPIRED"),
        (bearer(make_jwt(nbf=now + 600)), "JWT_INVALID"),
        (
            bearer(
                jwt.encode(
                    claims,
                    other_rsa.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                    algorithm="RS256",
                    headers={"kid": "idp"},
                )
            ),
            "JWT_INVALID",
        ),
    ]
    accepted = 0
    for metadata, reason in cases:
        code, got, _ = await _reason(
            gateway.api.GetRun(gw.GetRunRequest(run_id="run-1"), metadata=metadata, timeout=5)
        )
        if code is not grpc.StatusCode.UNAUTHENTICATED:
            accepted += 1
        assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason), metadata
    assert accepted == 0
    assert gateway.orchestrator.calls == []
    # The good key works, so the refusals above were about the credentials.
    created = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="hi", request_id="r1"), metadata=bearer(secret), timeout=5
    )
    assert created.created
    assert key.api_key_id


async def test_revoked_key_stops_at_once_and_expired_key_is_refused(gateway: Gateway) -> None:
    secret, key = await gateway.new_key()
    await gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=bearer(secret), timeout=5)
    await gateway.admin.RevokeApiKey(
        gw.RevokeApiKeyRequest(api_key_id=key.api_key_id), metadata=gateway.admin_md
    )
    code, reason, metadata = await _reason(
        gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=bearer(secret), timeout=5)
    )
    assert (code, reason, metadata["apiKeyId"]) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_REVOKED",
        key.api_key_id,
    )
    expiring, _ = await gateway.new_key(user="brief")
    state = gateway.host.state
    assert state is not None
    stored = await state.key_for_hash(hash_secret(expiring))
    assert stored is not None
    await gateway.host.redis.hset(  # type: ignore[union-attr]
        f"gw:key:{stored.api_key_id}", "expire_ms", str(int(time.time() * 1000) - 1000)
    )
    code, reason, _ = await _reason(
        gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=bearer(expiring), timeout=5)
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED")


async def test_token_of_another_tenant_cannot_see_a_run(gateway: Gateway) -> None:
    mine = bearer(make_jwt(tenant="acme", user="jo", scope="runs:create runs:read"))
    created = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="task", request_id=uuid.uuid4().hex), metadata=mine, timeout=5
    )
    run_id = created.run.run_id
    theirs = bearer(make_jwt(tenant="globex", user="jo", scope="runs:read runs:all_users"))
    for call in (
        gateway.api.GetRun(gw.GetRunRequest(run_id=run_id), metadata=theirs, timeout=5),
        gateway.api.CancelRun(gw.CancelRunRequest(run_id=run_id), metadata=theirs, timeout=5),
    ):
        code, reason, _ = await _reason(call)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
        assert reason in ("RUN_NOT_FOUND", "PERMISSION_MISSING")
    stream = gateway.api.WatchRun(gw.WatchRunRequest(run_id=run_id), metadata=theirs)
    code, reason, metadata = await _reason(stream.read())
    assert (code, reason, metadata["upstreamReason"]) == (
        grpc.StatusCode.NOT_FOUND,
        "RUN_NOT_FOUND",
        "RUN_NOT_FOUND",
    )
    # The orchestrator saw the other tenant's principal, never a tenant from the request.
    seen = {(c.principal.tenant_id, c.method) for c in gateway.orchestrator.calls}
    assert ("globex", "GetRun") in seen
    assert ("acme", "SubmitRun") in seen


async def test_permissions_and_admin_are_enforced(gateway: Gateway) -> None:
    reader, _ = await gateway.new_key(permissions=["runs:read"])
    code, reason, metadata = await _reason(
        gateway.api.CreateRun(
            gw.CreateRunRequest(input="x", request_id="a"), metadata=bearer(reader), timeout=5
        )
    )
    assert (code, reason, metadata["permission"]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_MISSING",
        "runs:create",
    )
    code, reason, _ = await _reason(
        gateway.admin.ListApiKeys(gw.ListApiKeysRequest(), metadata=bearer(reader), timeout=5)
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    code, reason, _ = await _reason(
        gateway.admin.ListApiKeys(
            gw.ListApiKeysRequest(), metadata=bearer(make_jwt(scope="*")), timeout=5
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    assert gateway.orchestrator.calls == []


async def test_keys_store_only_a_hash_and_list_without_secrets(gateway: Gateway) -> None:
    secret, key = await gateway.new_key()
    assert key.prefix == secret[:12]
    dump = b""
    async for name in gateway.host.redis.scan_iter("*"):  # type: ignore[union-attr]
        kind = await gateway.host.redis.type(name)  # type: ignore[union-attr]
        if kind == b"hash":
            dump += repr(await gateway.host.redis.hgetall(name)).encode()  # type: ignore[union-attr]
        elif kind == b"string":
            dump += repr(await gateway.host.redis.get(name)).encode()  # type: ignore[union-attr]
        dump += name
    assert secret.encode() not in dump
    listed = await gateway.admin.ListApiKeys(
        gw.ListApiKeysRequest(tenant_id="acme"), metadata=gateway.admin_md
    )
    assert [k.api_key_id for k in listed.api_keys] == [key.api_key_id]
    got = await gateway.admin.GetApiKey(
        gw.GetApiKeyRequest(api_key_id=key.api_key_id), metadata=gateway.admin_md
    )
    assert got.api_key.tenant_id == "acme"
    retry = await gateway.admin.CreateApiKey(
        gw.CreateApiKeyRequest(tenant_id="acme", user_id="jo", display_name="k", request_id="same"),
        metadata=gateway.admin_md,
    )
    again = await gateway.admin.CreateApiKey(
        gw.CreateApiKeyRequest(tenant_id="acme", user_id="jo", display_name="k", request_id="same"),
        metadata=gateway.admin_md,
    )
    assert retry.secret
    assert not again.secret
    assert again.secret_withheld
    assert again.api_key.api_key_id == retry.api_key.api_key_id


async def test_a_callers_own_principal_entry_is_ignored(gateway: Gateway) -> None:
    secret, key = await gateway.new_key()
    # Even a genuinely signed principal for another tenant, sent by a public caller, is
    # neither trusted nor forwarded: the gateway mints its own from the credential.
    forged = PrincipalSigner({"gw-test": b"f" * 48}, "gw-test").mint(
        tenant_id="globex", user_id="mallory", permissions=["*"]
    )
    metadata = (*bearer(secret), (PRINCIPAL_METADATA_KEY, forged))
    created = await gateway.api.CreateRun(
        gw.CreateRunRequest(input="x", request_id="p1"), metadata=metadata, timeout=5
    )
    assert created.run.tenant_id == "acme"
    seen = gateway.orchestrator.calls[-1].principal
    assert (seen.tenant_id, seen.user_id) == ("acme", "jo")
    got = await gateway.admin.GetApiKey(
        gw.GetApiKeyRequest(api_key_id=key.api_key_id), metadata=gateway.admin_md
    )
    assert got.api_key.HasField("last_use_time")


async def test_the_configured_admin_digest_opens_only_the_admin_service(gateway: Gateway) -> None:
    await gateway.admin.ListBudgets(gw.ListBudgetsRequest(), metadata=gateway.admin_md, timeout=5)
    code, reason, _ = await _reason(
        gateway.api.WhoAmI(gw.WhoAmIRequest(), metadata=gateway.admin_md, timeout=5)
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
