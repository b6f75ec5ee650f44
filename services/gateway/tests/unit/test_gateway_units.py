"""Units: the stack entry, settings, the error catalogue and the credential parser."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from foredeck.gateway.v1 import error_reason_pb2
from foredeck_gateway.admission import AdmissionMetrics, Gate
from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.credentials import JwtVerifier, parse_authorization
from foredeck_gateway.stack import SERVICE
from foredeck_gateway.store import RedisState
from foredeck_kit.context import RpcState, rpc_scope
from foredeck_kit.errors import ServiceError, missing_shared_reasons, reason_to_enum
from foredeck_kit.principal import PrincipalSigner, generate_key
from foredeck_stack.services import StackConfigError, StackContext


def _context(services: dict[str, str]) -> StackContext:
    return StackContext(
        name="gateway",
        host="127.0.0.1",
        port=4242,
        data_dir=Path("/tmp/gw-data"),
        redis_url="redis://127.0.0.1:7000/0",
        bolt_uri="",
        bolt_user="",
        bolt_password="",
        graph_database="",
        graph_http_url="",
        services=services,
        principal_keys={"k1": "s" * 40},
        principal_active_kid="k1",
    )


def test_stack_entry_names_redis_orchestrator_and_data_dir() -> None:
    assert SERVICE.name == "gateway"
    assert SERVICE.needs == ("redis", "orchestrator")
    env = SERVICE.env(_context({"orchestrator": "127.0.0.1:5000"}))
    assert env["FOREDECK_GATEWAY_ORCHESTRATOR_ADDRESS"] == "127.0.0.1:5000"
    assert env["FOREDECK_GATEWAY_REDIS_URL"] == "redis://127.0.0.1:7000/0"
    assert env["FOREDECK_GATEWAY_DATA_DIR"] == "/tmp/gw-data"
    assert env["FOREDECK_GATEWAY_PORT"] == "4242"
    assert env["FOREDECK_GATEWAY_PRINCIPAL_KEYS"].startswith("k1:")
    with pytest.raises(StackConfigError):
        SERVICE.env(_context({}))


def test_settings_read_routes_as_list_or_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOREDECK_GATEWAY_FAIL_OPEN_ROUTES", "GetRun, WatchRun")
    assert GatewaySettings().fail_open_routes == ["GetRun", "WatchRun"]
    monkeypatch.setenv("FOREDECK_GATEWAY_FAIL_OPEN_ROUTES", '["WhoAmI"]')
    assert GatewaySettings().fail_open_routes == ["WhoAmI"]


def test_error_catalogue_has_every_reason_used() -> None:
    names = error_reason_pb2.ErrorReason.keys()
    assert missing_shared_reasons(names) == []
    for reason in ("RATE_LIMITER_UNAVAILABLE", "BUDGET_EXHAUSTED", "ADMIN_REQUIRED"):
        assert reason_to_enum(reason) in names


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "CREDENTIALS_MISSING"),
        ((("authorization", "Bearer"),), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer fdk_short"),), "API_KEY_INVALID"),
    ],
)
def test_authorization_parsing(metadata: tuple[tuple[str, str], ...], reason: str) -> None:
    with pytest.raises(ServiceError) as caught:
        parse_authorization(metadata)
    assert caught.value.reason == reason


async def test_a_spent_deadline_is_refused_before_anything_is_counted() -> None:
    registry = CollectorRegistry()
    # Port 9 (discard) is never dialled: the gate refuses before any Redis call.
    state = RedisState(Redis.from_url("redis://127.0.0.1:9/0"), prefix="gw", timeout=0.1)
    gate = Gate(
        GatewaySettings(),
        state,
        JwtVerifier(hs256_secrets={}, rs256_keys={}),
        PrincipalSigner({"k": generate_key()}, "k"),
        AdmissionMetrics(registry),
    )
    spent = RpcState(method="/x/CreateRun", deadline=time.monotonic() - 1)
    with rpc_scope(spent), pytest.raises(ServiceError) as caught:
        await gate.admit((("authorization", "Bearer fdk_" + "a" * 43),), "CreateRun", "")
    assert caught.value.reason == "DEADLINE_TOO_SHORT"
    assert (
        registry.get_sample_value(
            "gateway_admission_decisions_total", {"outcome": "deadline_too_short"}
        )
        == 1
    )
