"""JWT verification: RS256 from a JWKS or PEM file, HS256, algorithm pinning, expiry."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from foredeck_gateway.credentials import JwtVerifier
from foredeck_kit.errors import ServiceError

SECRET = "s" * 40


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"iss": "idp", "aud": "fd", "sub": "jo", "tid": "acme"}
    body["scope"] = "runs:read"
    body.update(iat=now, exp=now + 60)
    body.update(extra)
    return body


def _verifier(tmp_path: Path, key: rsa.RSAPrivateKey, *, jwks: bool) -> JwtVerifier:
    if jwks:
        entry = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        entry.update(kid="rs", alg="RS256", use="sig")
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps({"keys": [entry]}))
        files: dict[str, Path | None] = {"jwks_file": path, "public_keys_file": None}
    else:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps({"rs": _public_pem(key)}))
        files = {"jwks_file": None, "public_keys_file": path}
    return JwtVerifier.from_settings(
        hs256_spec=f"hs:{SECRET}",
        issuer="idp",
        audience="fd",
        leeway=0,
        tenant_claim="tid",
        permissions_claim="scope",
        **files,
    )


def _hmac_token(header: dict[str, Any], claims: dict[str, Any], secret: str) -> str:
    """A token HMAC-signed by hand, as an attacker holding only a public key would sign it."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(mac)}"


def _refusal(verifier: JwtVerifier, token: str) -> tuple[str, str]:
    with pytest.raises(ServiceError) as caught:
        verifier.verify(token)
    return caught.value.reason, caught.value.metadata.get("check", "")


@pytest.mark.parametrize("jwks", [True, False])
def test_rs256_from_files_and_algorithm_pinning(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, jwks: bool
) -> None:
    verifier = _verifier(tmp_path, rsa_key, jwks=jwks)
    good = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rs"})
    identity = verifier.verify(good)
    assert (identity.tenant_id, identity.user_id, identity.permissions) == (
        "acme",
        "jo",
        ("runs:read",),
    )
    # HS256 signed with the RSA public key as its secret: the key id names an RSA key, and
    # an RSA key only ever checks RS256.
    confused = _hmac_token({"alg": "HS256", "kid": "rs"}, _claims(), _public_pem(rsa_key))
    assert _refusal(verifier, confused) == ("JWT_INVALID", "key")
    assert _refusal(verifier, jwt.encode(_claims(), SECRET * 2, "HS384")) == (
        "JWT_INVALID",
        "algorithm",
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(), other, algorithm="RS256", headers={"kid": "rs"})
    assert _refusal(verifier, forged) == ("JWT_INVALID", "signature")


def test_hs256_checks(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = _verifier(tmp_path, rsa_key, jwks=True)

    def hs(**extra: Any) -> str:
        return jwt.encode(_claims(**extra), SECRET, "HS256", headers={"kid": "hs"})

    assert verifier.verify(hs()).tenant_id == "acme"
    assert _refusal(verifier, hs(aud="x")) == ("JWT_INVALID", "audience")
    assert _refusal(verifier, hs(iss="x")) == ("JWT_INVALID", "issuer")
    assert _refusal(verifier, hs(exp=int(time.time()) - 5))[0] == "JWT_EXPIRED"
    assert _refusal(verifier, hs(tid="Not A Tenant")) == ("JWT_INVALID", "claims")
    assert _refusal(verifier, hs(nbf=int(time.time()) + 600)) == ("JWT_INVALID", "notBefore")


def test_a_remembered_token_still_expires(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = _verifier(tmp_path, rsa_key, jwks=True)
    token = jwt.encode(_claims(), SECRET, "HS256", headers={"kid": "hs"})
    verifier.verify(token)
    verifier._cache[token] = (verifier._cache[token][0], time.time() - 1)
    assert _refusal(verifier, token)[0] == "JWT_EXPIRED"
