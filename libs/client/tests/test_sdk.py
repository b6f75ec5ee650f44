"""The SDK against a scripted gateway over real gRPC: credentials, typed errors, resumed watches."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from foredeck_client import AsyncClient, Client, resolve_connection
from foredeck_client.errors import (
    ConfigurationError,
    InvalidArgument,
    NotFound,
    RateLimited,
    Unauthenticated,
)

from .scripted_gateway import EVENTS, KEY, ScriptedGateway, start_gateway, threaded_gateway


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, ScriptedGateway]]:
    server, servicer, address = await start_gateway()
    try:
        yield address, servicer
    finally:
        await server.stop(None)


async def test_async_client_creates_runs_with_a_request_id_and_resumes_a_dropped_watch(
    gateway: tuple[str, ScriptedGateway],
) -> None:
    address, servicer = gateway
    async with AsyncClient(address, KEY) as client:
        run = await client.create_run("What is 17 * 23?", agent="calc")
        events = [event async for event in client.watch_run(run.run_id)]
        finished = await client.get_run(run.run_id)

    assert servicer.create_requests[0].agent_name == "calc"
    assert len(servicer.create_requests[0].request_id) == 32
    assert [e.sequence for e in events] == list(range(1, EVENTS + 1))
    assert [r.after_event_id for r in servicer.watch_requests] == ["", "e-2"]
    assert events[-1].run_finished.output == "17 * 23 = 391"
    assert finished.output == "17 * 23 = 391"


async def test_errors_arrive_typed_with_their_details(
    gateway: tuple[str, ScriptedGateway],
) -> None:
    address, _ = gateway
    async with AsyncClient(address, KEY, retries=0) as client:
        with pytest.raises(RateLimited) as limited:
            await client.create_run("too fast")
        with pytest.raises(InvalidArgument) as invalid:
            await client.create_run("")
        with pytest.raises(NotFound) as missing:
            await client.get_run("nope")
    async with AsyncClient(address, "fdk_wrong") as client:
        with pytest.raises(Unauthenticated) as unauthenticated:
            await client.get_run("run-1")

    assert limited.value.reason == "RATE_LIMITED"
    assert limited.value.retry_after == 7.0
    assert [v.subject for v in limited.value.quota_violations] == ["key:k1"]
    assert limited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [(v.field, v.description) for v in invalid.value.field_violations] == [
        ("input", "empty")
    ]
    assert missing.value.reason == "RUN_NOT_FOUND"
    assert missing.value.metadata == {"runId": "r-1"}
    assert missing.value.domain == "gateway.foredeck.dev"
    assert unauthenticated.value.reason == "API_KEY_INVALID"
    assert "FOREDECK_API_KEY" in unauthenticated.value.hint


def test_blocking_client_behaves_like_the_async_one() -> None:
    with threaded_gateway() as (address, servicer), Client(address, KEY) as client:
        run = client.create_run("What is 17 * 23?", request_id="fixed-id")
        events = list(client.watch_run(run.run_id))
        with pytest.raises(NotFound):
            client.get_run("nope")

    assert run.run_id == "run-fixed-id"
    assert [e.event_id for e in events] == [f"e-{n}" for n in range(1, EVENTS + 1)]
    assert servicer.watch_requests[-1].after_event_id == "e-2"


def test_connection_comes_from_arguments_then_environment_then_the_local_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FOREDECK_ADDRESS", raising=False)
    monkeypatch.delenv("FOREDECK_API_KEY", raising=False)
    monkeypatch.delenv("FOREDECK_DATA_DIR", raising=False)
    project = tmp_path / "project"
    nested = project / "src" / "deep"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    with pytest.raises(ConfigurationError, match="FOREDECK_ADDRESS"):
        resolve_connection()

    data = project / ".foredeck"
    data.mkdir()
    stack = {"components": {"gateway": {"address": "127.0.0.1:4321"}}}
    (data / "stack.json").write_text(json.dumps(stack), encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"credentials\.json"):
        resolve_connection()
    credentials = {"developer": {"secret": "fdk_dev"}, "admin": {"secret": "fdk_admin"}}
    gateway_dir = data / "services" / "gateway"
    gateway_dir.mkdir(parents=True)
    (gateway_dir / "credentials.json").write_text(json.dumps(credentials), encoding="utf-8")

    local = resolve_connection()
    assert (local.address, local.api_key, local.tls) == ("127.0.0.1:4321", "fdk_dev", False)
    assert resolve_connection(role="admin").api_key == "fdk_admin"
    assert "fdk_dev" not in repr(local)

    monkeypatch.setenv("FOREDECK_ADDRESS", "https://foredeck.example:443")
    monkeypatch.setenv("FOREDECK_API_KEY", "fdk_env")
    from_env = resolve_connection()
    assert (from_env.address, from_env.api_key, from_env.tls) == (
        "foredeck.example:443",
        "fdk_env",
        True,
    )
    assert resolve_connection("10.0.0.1:1", "fdk_arg").api_key == "fdk_arg"
