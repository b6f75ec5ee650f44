"""Server lifecycle: readiness, health, reflection, options, graceful stop and SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from foredeck_kit.errors import Reason, error_details
from foredeck_kit.logs import configure_logging, flush_logging, reset_logging
from foredeck_kit.principal import format_keys, generate_key
from foredeck_kit.server import build_grpc_server
from foredeck_kit.settings import ServiceSettings, SettingsError, load_settings
from foredeck_stack.stores import RedisProcess
from foredeck_testing.echo import SERVICE_NAME, Message, register, unary, unary_call
from foredeck_testing.server import running_server

DOMAIN = "kittest.foredeck.dev"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _echo(request: Message, context: Any) -> Message:
    return Message(value=request.value)


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(reply.status)


async def test_not_serving_until_readiness_passes() -> None:
    ready = asyncio.Event()
    calls = 0

    async def readiness() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("redis not up yet")
        return ready.is_set()

    async with running_server(
        register({"Echo": unary(_echo)}),
        service_names=[SERVICE_NAME],
        domain=DOMAIN,
        readiness=readiness,
        wait_ready=False,
    ) as srv:
        assert await _status(srv.channel, "") == NOT_SERVING
        assert await _status(srv.channel, SERVICE_NAME) == NOT_SERVING

        async def polled_with_backoff() -> bool:
            return calls >= 3

        await _eventually(polled_with_backoff)
        assert await _status(srv.channel, "") == NOT_SERVING
        ready.set()

        async def serving() -> bool:
            return await _status(srv.channel, SERVICE_NAME) == int(SERVING)

        await _eventually(serving)
        assert await _status(srv.channel, "") == SERVING
        assert srv.host.ready
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _status(srv.channel, "foredeck.unknown.v1.Nope")
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_lists_services(version: str) -> None:
    # The v1 protocol's messages are the v1alpha ones field for field; only the path differs.
    async with running_server(
        register({"Echo": unary(_echo)}), service_names=[SERVICE_NAME], domain=DOMAIN
    ) as srv:
        info = srv.channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        lookup = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.health.v1.Health"
        )
        responses = [r async for r in info(iter([listing, lookup]), timeout=5)]
        names = {s.name for s in responses[0].list_services_response.service}
        assert names == {
            SERVICE_NAME,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
        }
        (health_file,) = responses[1].file_descriptor_response.file_descriptor_proto
        assert b"grpc.health.v1" in health_file


async def test_message_size_limit_applies() -> None:
    async with running_server(
        register({"Echo": unary(_echo)}),
        service_names=[SERVICE_NAME],
        domain=DOMAIN,
        settings=ServiceSettings(max_message_bytes=1024),
    ) as srv:
        echo = unary_call(srv.channel, "Echo")
        assert (await echo(Message(value="x" * 900), metadata=srv.mint(), timeout=5)).value
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await echo(Message(value="x" * 2000), metadata=srv.mint(), timeout=5)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_port_in_use_fails_instead_of_sharing() -> None:
    async with running_server(
        register({"Echo": unary(_echo)}), service_names=[SERVICE_NAME], domain=DOMAIN
    ) as srv:
        second = build_grpc_server(
            ServiceSettings(port=srv.port, metrics_port=-1),
            domain=DOMAIN,
            register=register({"Echo": unary(_echo)}),
            service_names=[SERVICE_NAME],
            verifier=None,
        )
        with pytest.raises(RuntimeError):
            await second.start()
        await second.stop()


async def test_graceful_stop_lets_in_flight_rpc_finish() -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: Message, context: Any) -> Message:
        entered.set()
        await release.wait()
        return Message(value="finished")

    async with running_server(
        register({"Slow": unary(slow), "Echo": unary(_echo)}),
        service_names=[SERVICE_NAME],
        domain=DOMAIN,
    ) as srv:
        in_flight = asyncio.ensure_future(
            unary_call(srv.channel, "Slow")(Message(), metadata=srv.mint(), timeout=30)
        )
        await asyncio.wait_for(entered.wait(), 10)
        stopping = asyncio.create_task(srv.host.stop(grace=30))

        async def refuses_new_calls() -> bool:
            async with grpc.aio.insecure_channel(srv.address) as fresh:
                try:
                    await unary_call(fresh, "Echo")(Message(), metadata=srv.mint(), timeout=2)
                except grpc.aio.AioRpcError as error:
                    return error.code() is grpc.StatusCode.UNAVAILABLE
            return False

        await _eventually(refuses_new_calls)
        assert not in_flight.done()
        assert not stopping.done()
        release.set()
        reply = await asyncio.wait_for(in_flight, 10)
        assert reply.value == "finished"
        await asyncio.wait_for(stopping, 10)


async def test_sigterm_shows_not_serving_then_exits_zero(tmp_path: Any) -> None:
    env = {
        **os.environ,
        "FOREDECK_DEMO_PRINCIPAL_KEYS": format_keys({"k": generate_key()}),
        "FOREDECK_DEMO_DRAIN_SECONDS": "1",
        "FOREDECK_DEMO_GRACE_PERIOD_SECONDS": "5",
        "FOREDECK_DEMO_METRICS_PORT": "-1",
        "OTEL_SDK_DISABLED": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "foredeck_testing.echo",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = await process.stdout.readline()
                assert line, "server exited before listening"
                record = json.loads(line)
                if record.get("event") == "listening":
                    break
            async with grpc.aio.insecure_channel(record["address"]) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                )
                statuses: list[int] = []
                while not statuses or statuses[-1] != SERVING:
                    statuses.append((await watch.read()).status)
                process.send_signal(signal.SIGTERM)
                statuses.append((await watch.read()).status)
                watch.cancel()
            assert statuses[-2:] == [SERVING, NOT_SERVING]
            assert await process.wait() == 0
            rest = [json.loads(raw) for raw in (await process.stdout.read()).splitlines()]
            lifecycle = [r["event"] for r in rest if r["event"] in ("stopping", "stopped")]
            assert lifecycle == ["stopping", "stopped"]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- settings ----------------------------------------------------------------------------


class _MemorySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FOREDECK_MEMORY_")

    service_name: str = "memory"
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL.")


def test_settings_subclass_reads_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOREDECK_MEMORY_PORT", "5001")
    monkeypatch.setenv("FOREDECK_MEMORY_REDIS_URL", "redis://example:6379/1")
    monkeypatch.setenv("FOREDECK_MEMORY_DRAIN_SECONDS", "2.5")
    monkeypatch.setenv("FOREDECK_PORT", "6000")
    settings = load_settings(_MemorySettings)
    assert settings.port == 5001
    assert settings.redis_url == "redis://example:6379/1"
    assert settings.drain_seconds == 2.5
    assert settings.service_name == "memory"
    assert settings.grace_period_seconds == 10.0
    assert settings.max_message_bytes == 4 * 1024 * 1024


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "k" * 40
    monkeypatch.setenv("FOREDECK_MEMORY_PORT", "eighty")
    monkeypatch.setenv("FOREDECK_MEMORY_PRINCIPAL_KEYS", f"k:{secret}")
    monkeypatch.setenv("FOREDECK_MEMORY_LOG_FORMAT", "xml")
    with pytest.raises(SettingsError) as caught:
        load_settings(_MemorySettings)
    message = str(caught.value)
    assert "FOREDECK_MEMORY_PORT" in message
    assert "FOREDECK_MEMORY_LOG_FORMAT" in message
    assert secret not in message


def test_principal_verifier_needs_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="FOREDECK_MEMORY_PRINCIPAL_KEYS"):
        _MemorySettings().principal_verifier()
    monkeypatch.setenv("FOREDECK_MEMORY_PRINCIPAL_KEYS", "k:short")
    with pytest.raises(SettingsError, match="at least 32"):
        _MemorySettings().principal_verifier()
    monkeypatch.setenv("FOREDECK_MEMORY_PRINCIPAL_KEYS", "k:" + "s" * 32)
    assert _MemorySettings().principal_verifier() is not None


# --- health follows the dependencies --------------------------------------------------------


@pytest.fixture
def server_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("kittest", stream=stream)
    yield stream
    reset_logging()


def _events(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    flush_logging()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [r for r in records if r.get("event") == event]


async def _becomes(channel: grpc.aio.Channel, status: int) -> None:
    async def check() -> bool:
        return (
            await _status(channel, SERVICE_NAME) == status and await _status(channel, "") == status
        )

    await _eventually(check)


async def test_health_follows_readiness_after_start(server_log: io.StringIO) -> None:
    healthy = True
    hang = asyncio.Event()

    async def readiness() -> bool:
        if hang.is_set():
            await asyncio.Event().wait()
        return healthy

    async with running_server(
        register({"Echo": unary(_echo)}),
        service_names=[SERVICE_NAME],
        domain=DOMAIN,
        readiness=readiness,
        readiness_interval=0.05,
        readiness_timeout=0.2,
    ) as srv:
        assert await _status(srv.channel, SERVICE_NAME) == SERVING
        healthy = False
        await _becomes(srv.channel, NOT_SERVING)
        assert not srv.host.ready
        healthy = True
        await _becomes(srv.channel, SERVING)
        # A check that never answers counts as failed once its timeout passes.
        hang.set()
        await _becomes(srv.channel, NOT_SERVING)
        hang.clear()
        await _becomes(srv.channel, SERVING)

    changes = [(r["status"], r["level"]) for r in _events(server_log, "health changed")]
    assert changes == [
        ("SERVING", "info"),
        ("NOT_SERVING", "warning"),
        ("SERVING", "info"),
        ("NOT_SERVING", "warning"),
        ("SERVING", "info"),
    ]
    reasons = [r["reason"] for r in _events(server_log, "not ready")]
    assert reasons == ["readiness check returned false", "readiness check timed out after 0.2s"]


async def test_reported_dependencies_hold_health_down(server_log: io.StringIO) -> None:
    async with running_server(
        register({"Echo": unary(_echo)}), service_names=[SERVICE_NAME], domain=DOMAIN
    ) as srv:
        srv.host.report_dependency("redis", healthy=False)
        await _becomes(srv.channel, NOT_SERVING)
        srv.host.report_dependency("memory", healthy=False)
        srv.host.report_dependency("redis", healthy=True)
        srv.host.report_dependency("memory", healthy=True)
        await _becomes(srv.channel, SERVING)

    (down,) = [r for r in _events(server_log, "health changed") if r["status"] == "NOT_SERVING"]
    assert down["dependencies_down"] == ["redis"]
    reports = [(r["dependency"], r["healthy"]) for r in _events(server_log, "dependency reported")]
    assert reports == [("redis", False), ("memory", False), ("redis", True), ("memory", True)]


async def test_health_follows_a_real_redis(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    first = RedisProcess(tmp_path / "redis")
    await first.start()
    port = first.port
    client = Redis.from_url(first.url, socket_timeout=1, socket_connect_timeout=1)
    restarted: RedisProcess | None = None

    async def redis_answers() -> bool:
        return bool(await client.ping())

    try:
        async with running_server(
            register({"Echo": unary(_echo)}),
            service_names=[SERVICE_NAME],
            domain=DOMAIN,
            readiness=redis_answers,
            readiness_interval=0.05,
            readiness_timeout=2,
        ) as srv:
            assert await _status(srv.channel, SERVICE_NAME) == SERVING
            await first.stop()
            await _becomes(srv.channel, NOT_SERVING)
            restarted = RedisProcess(tmp_path / "redis", port=port)
            await restarted.start()
            await _becomes(srv.channel, SERVING)
    finally:
        await client.aclose()
        await first.stop()
        if restarted is not None:
            await restarted.stop()


async def test_watch_streams_end_on_stop_without_waiting_for_the_grace_period() -> None:
    async with running_server(
        register({"Echo": unary(_echo)}),
        service_names=[SERVICE_NAME],
        domain=DOMAIN,
        settings=ServiceSettings(grace_period_seconds=60),
    ) as srv:
        watch = health_pb2_grpc.HealthStub(srv.channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert (await watch.read()).status == SERVING
        async with asyncio.timeout(20):
            # Without the stream ending, stop would wait out the 60 s grace period.
            await srv.host.stop(grace=60)
            statuses = []
            while (reply := await watch.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                statuses.append(reply.status)
        assert statuses == [NOT_SERVING]
        assert await watch.code() is grpc.StatusCode.OK


if TYPE_CHECKING:
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    _GenericHandler = grpc.GenericRpcHandler


class _OneMethod(_GenericHandler):
    """A hand-written generic handler, not one built by grpc's helper."""

    def service(self, handler_call_details: Any) -> Any:
        if handler_call_details.method == f"/{SERVICE_NAME}/Echo":
            return unary(_echo)
        return None


async def test_any_generic_handler_gets_the_kits_handling() -> None:
    def add(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((_OneMethod(),))

    async with running_server(add, service_names=[SERVICE_NAME], domain=DOMAIN) as srv:
        echo = unary_call(srv.channel, "Echo")
        assert (await echo(Message(value="hi"), metadata=srv.mint(), timeout=5)).value == "hi"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await echo(Message(value="hi"), timeout=5)
    # Wrapped like any other handler: no principal, no call.
    assert error_details(caught.value).reason == Reason.PRINCIPAL_MISSING
    assert error_details(caught.value).domain == DOMAIN
