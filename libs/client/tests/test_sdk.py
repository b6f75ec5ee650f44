"""The SDK against a scripted gateway over real gRPC: credentials, typed errors, resumed watches."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from foredeck.common.v1 import run_event_pb2, run_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from foredeck_client import AsyncClient, Client, resolve_connection
from foredeck_client.errors import (
    ConfigurationError,
    InvalidArgument,
    NotFound,
    RateLimited,
    Unauthenticated,
)

KEY = "fdk_test_key"
EVENTS = 6


def _status(
    code: int, reason: str, message: str, *extra: object
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain="gateway.foredeck.dev", metadata={"runId": "r-1"}
    )
    details = []
    for detail in (info, *extra):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    status = status_pb2.Status(code=code, message=message, details=details)
    grpc_code = next(c for c in grpc.StatusCode if c.value[0] == code)
    return grpc_code, message, (("grpc-status-details-bin", status.SerializeToString()),)


class ScriptedGateway(gw_grpc.GatewayServiceServicer):
    """Answers like the gateway for the calls the SDK tests make; drops every watch stream once."""

    def __init__(self) -> None:
        self.create_requests: list[gw.CreateRunRequest] = []
        self.watch_requests: list[gw.WatchRunRequest] = []
        self.dropped: set[str] = set()

    @staticmethod
    async def _check_key(context: grpc.aio.ServicerContext[object, object]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {KEY}":
            code, message, trailers = _status(
                code_pb2.UNAUTHENTICATED, "API_KEY_INVALID", "invalid credentials"
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)

    async def CreateRun(
        self, request: gw.CreateRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> gw.CreateRunResponse:
        await self._check_key(context)
        self.create_requests.append(request)
        if request.input == "too fast":
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=7))
            quota = error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(subject="key:k1")]
            )
            code, message, trailers = _status(
                code_pb2.RESOURCE_EXHAUSTED, "RATE_LIMITED", "rate limited", retry, quota
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        if request.input == "":
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="input", description="empty")
                ]
            )
            code, message, trailers = _status(
                code_pb2.INVALID_ARGUMENT, "INVALID_REQUEST", "invalid request", bad
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        run = run_pb2.Run(run_id=f"run-{request.request_id}", input=request.input)
        return gw.CreateRunResponse(run=run, created=True)

    async def GetRun(
        self, request: gw.GetRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> gw.GetRunResponse:
        await self._check_key(context)
        if not request.run_id.startswith("run-"):
            code, message, trailers = _status(code_pb2.NOT_FOUND, "RUN_NOT_FOUND", "no such run")
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        run = run_pb2.Run(run_id=request.run_id, status=run_pb2.RUN_STATUS_SUCCEEDED, output="391")
        return gw.GetRunResponse(run=run)

    async def WatchRun(
        self, request: gw.WatchRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[gw.WatchRunResponse]:
        await self._check_key(context)
        self.watch_requests.append(request)
        start = int(request.after_event_id.split("-")[1]) + 1 if request.after_event_id else 1
        for sequence in range(start, EVENTS + 1):
            if sequence == 3 and request.run_id not in self.dropped:
                self.dropped.add(request.run_id)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            event = run_event_pb2.RunEvent(
                event_id=f"e-{sequence}", run_id=request.run_id, sequence=sequence
            )
            if sequence == EVENTS:
                event.run_finished.status = run_pb2.RUN_STATUS_SUCCEEDED
            else:
                event.step_started.step_index = sequence
            yield gw.WatchRunResponse(event=event)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, ScriptedGateway]]:
    server, servicer, address = await _start_gateway()
    try:
        yield address, servicer
    finally:
        await server.stop(None)


async def _start_gateway() -> tuple[grpc.aio.Server, ScriptedGateway, str]:
    server = grpc.aio.server()
    servicer = ScriptedGateway()  # type: ignore[abstract]  # answers only what the tests call
    gw_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


@pytest.fixture
def threaded_gateway() -> Iterator[tuple[str, ScriptedGateway]]:
    """The scripted gateway on an event loop of its own, for the blocking client's tests."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, servicer, address = asyncio.run_coroutine_threadsafe(_start_gateway(), loop).result(30)
    try:
        yield address, servicer
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


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
    assert finished.output == "391"


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


def test_blocking_client_behaves_like_the_async_one(
    threaded_gateway: tuple[str, ScriptedGateway],
) -> None:
    address, servicer = threaded_gateway
    with Client(address, KEY) as client:
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
    credentials = {"developer": {"api_key": "fdk_dev"}, "admin": {"api_key": "fdk_admin"}}
    (data / "credentials.json").write_text(json.dumps(credentials), encoding="utf-8")

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
