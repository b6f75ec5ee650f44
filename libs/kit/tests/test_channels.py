"""Outbound channels: deadline capping, identity and request id propagation, retries."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest

from foredeck.llmrouter.v1 import llmrouter_service_pb2
from foredeck.memory.v1 import memory_service_pb2
from foredeck_kit.channels import idempotent_methods, open_channel, retry_service_config
from foredeck_kit.context import REQUEST_ID_METADATA_KEY, RpcState, outbound_principal, rpc_scope
from foredeck_kit.errors import Reason, ServiceError, error_details
from foredeck_kit.logs import configure_logging, flush_logging, reset_logging
from foredeck_kit.principal import Principal, current_principal
from foredeck_testing.echo import (
    SERVICE_NAME,
    Message,
    register,
    server_stream,
    stream_call,
    unary,
    unary_call,
)
from foredeck_testing.server import RunningServer, fresh_keys, running_server

DOMAIN = "kittest.foredeck.dev"
KEYS = fresh_keys()


@dataclass
class Seen:
    """What the downstream observed about each call it served."""

    remaining: list[float | None] = field(default_factory=list)
    deadlines: list[float] = field(default_factory=list)
    """Absolute deadlines on this process's monotonic clock, shared by both servers."""
    principals: list[Principal] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)


def _deadline(context: Any) -> float:
    remaining = context.time_remaining()
    assert remaining is not None
    return time.monotonic() + float(remaining)


def _request_id(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY:
            return str(value)
    return None


@pytest.fixture(scope="module")
async def downstream() -> AsyncIterator[tuple[RunningServer, Seen]]:
    seen = Seen()

    async def record(request: Message, context: Any) -> Message:
        seen.remaining.append(context.time_remaining())
        if context.time_remaining() is not None:
            seen.deadlines.append(_deadline(context))
        seen.principals.append(current_principal())
        seen.request_ids.append(_request_id(context))
        return Message(value=request.value)

    async def record_stream(request: Message, context: Any) -> AsyncIterator[Message]:
        seen.remaining.append(context.time_remaining())
        seen.deadlines.append(_deadline(context))
        seen.principals.append(current_principal())
        yield Message(value="a")
        yield Message(value="b")

    async def flaky(request: Message, context: Any) -> Message:
        count = seen.attempts.get(request.value, 0) + 1
        seen.attempts[request.value] = count
        if count < 3:
            raise ServiceError.store_unavailable("redis")
        return Message(value=f"ok after {count}")

    async def down(request: Message, context: Any) -> Message:
        raise ServiceError.store_unavailable("redis", timedelta(seconds=2))

    async def reject(request: Message, context: Any) -> Message:
        raise ServiceError.invalid_request([("value", "rejected")])

    async def hang(request: Message, context: Any) -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def cancelled(request: Message, context: Any) -> Message:
        await context.abort(grpc.StatusCode.CANCELLED, "gave up")
        raise AssertionError("abort returned")

    async def deadline_exceeded(request: Message, context: Any) -> Message:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "too slow")
        raise AssertionError("abort returned")

    handlers = {
        "Down": unary(down),
        "Reject": unary(reject),
        "Hang": unary(hang),
        "Cancelled": unary(cancelled),
        "DeadlineExceeded": unary(deadline_exceeded),
        "Record": unary(record),
        "RecordStream": server_stream(record_stream),
        "Flaky": unary(flaky),
        "FlakyWrite": unary(flaky),
    }
    async with running_server(
        register(handlers), service_names=[SERVICE_NAME], domain=DOMAIN, keys=KEYS
    ) as srv:
        yield srv, seen


async def test_deadline_principal_and_request_id_propagate(
    downstream: tuple[RunningServer, Seen],
) -> None:
    target, seen = downstream
    inbound: list[float] = []
    channel = open_channel(target.address)

    async def forward(request: Message, context: Any) -> Message:
        inbound.append(_deadline(context))
        # An explicit timeout far beyond the inbound deadline must still be capped.
        await unary_call(channel, "Record")(request, timeout=120)
        await unary_call(channel, "Record")(request)
        values = [m.value async for m in stream_call(channel, "RecordStream")(request)]
        return Message(value="".join(values))

    try:
        async with running_server(
            register({"Forward": unary(forward)}),
            service_names=[SERVICE_NAME],
            domain=DOMAIN,
            keys=KEYS,
        ) as upstream:
            seen.remaining.clear()
            seen.deadlines.clear()
            seen.principals.clear()
            seen.request_ids.clear()
            metadata = upstream.mint("tenant-1", "user-1", ["runs:read"], request_id="req-42")
            reply = await unary_call(upstream.channel, "Forward")(
                Message(value="x"), metadata=metadata, timeout=3.0
            )
    finally:
        await channel.close(None)

    assert reply.value == "ab"
    assert len(seen.deadlines) == 3
    # Every downstream deadline ends no later than the inbound one (the default is 30 s).
    assert all(deadline <= inbound[0] for deadline in seen.deadlines)
    assert all(remaining is not None and remaining < 3.1 for remaining in seen.remaining)
    assert {(p.tenant_id, p.user_id) for p in seen.principals} == {("tenant-1", "user-1")}
    assert len({p.token_id for p in seen.principals}) == 1
    assert seen.request_ids == ["req-42", "req-42"]


async def test_call_after_inbound_deadline_fails_fast(
    downstream: tuple[RunningServer, Seen],
) -> None:
    target, seen = downstream
    calls_before = len(seen.remaining)
    async with open_channel(target.address) as channel:
        expired = RpcState(method="/x/y", deadline=time.monotonic() - 0.5)
        with rpc_scope(expired), pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_call(channel, "Record")(Message(), metadata=target.mint())
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(seen.remaining) == calls_before


async def test_default_timeout_applies_outside_rpcs(
    downstream: tuple[RunningServer, Seen],
) -> None:
    target, seen = downstream
    async with open_channel(target.address, default_timeout=5.0) as channel:
        await unary_call(channel, "Record")(Message(), metadata=target.mint())
    remaining = seen.remaining[-1]
    # gRPC rounds a 1-10 s timeout up to the next 10 ms on the wire.
    assert remaining is not None
    assert 4.0 < remaining <= 5.01


async def test_outbound_principal_sources(downstream: tuple[RunningServer, Seen]) -> None:
    target, seen = downstream
    async with open_channel(target.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_call(channel, "Record")(Message())
        assert error_details(caught.value).reason == Reason.PRINCIPAL_MISSING

        with outbound_principal(target.token("gw-tenant", "gw-user")):
            await unary_call(channel, "Record")(Message())
        assert seen.principals[-1].user_id == "gw-user"

    async with open_channel(
        target.address, principal=lambda: target.token("svc-tenant", "worker")
    ) as channel:
        await unary_call(channel, "Record")(Message())
        assert seen.principals[-1].user_id == "worker"
        # Metadata the caller sets itself wins over every other source.
        await unary_call(channel, "Record")(Message(), metadata=target.mint("t", "explicit"))
        assert seen.principals[-1].user_id == "explicit"


async def test_idempotent_methods_retry_on_unavailable(
    downstream: tuple[RunningServer, Seen],
) -> None:
    target, seen = downstream
    async with open_channel(
        target.address, retry_methods=[(SERVICE_NAME, "Flaky")], max_attempts=4
    ) as channel:
        reply = await unary_call(channel, "Flaky")(Message(value="idem"), metadata=target.mint())
        assert reply.value == "ok after 3"
        assert seen.attempts["idem"] == 3

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_call(channel, "FlakyWrite")(Message(value="write"), metadata=target.mint())
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_details(caught.value).reason == Reason.STORE_UNAVAILABLE
        assert seen.attempts["write"] == 1


async def test_uncaught_downstream_errors_are_mapped_not_forwarded(
    downstream: tuple[RunningServer, Seen],
) -> None:
    target, _ = downstream
    channel = open_channel(target.address)

    async def call_down(request: Message, context: Any) -> Message:
        return await unary_call(channel, request.value)(request)  # type: ignore[no-any-return]

    try:
        async with running_server(
            register({"CallDown": unary(call_down)}),
            service_names=[SERVICE_NAME],
            domain="upstream.foredeck.dev",
            keys=KEYS,
        ) as upstream:
            call = unary_call(upstream.channel, "CallDown")
            with pytest.raises(grpc.aio.AioRpcError) as unavailable:
                await call(Message(value="Down"), metadata=upstream.mint())
            with pytest.raises(grpc.aio.AioRpcError) as rejected:
                await call(Message(value="Reject"), metadata=upstream.mint())
    finally:
        await channel.close(None)

    details = error_details(unavailable.value)
    assert details.code is grpc.StatusCode.UNAVAILABLE
    assert (details.reason, details.domain) == (
        Reason.DOWNSTREAM_UNAVAILABLE,
        "upstream.foredeck.dev",
    )
    assert details.metadata["upstreamReason"] == Reason.STORE_UNAVAILABLE
    # The downstream is named by the service that was called.
    assert details.metadata["downstream"] == SERVICE_NAME
    assert details.retry_after == timedelta(seconds=2)

    # A downstream's INVALID_ARGUMENT is this service's fault: INTERNAL, nothing forwarded.
    details = error_details(rejected.value)
    assert details.code is grpc.StatusCode.INTERNAL
    assert (details.reason, details.message) == (Reason.INTERNAL, "internal error")
    assert not details.field_violations


def test_idempotent_methods_follow_the_contract() -> None:
    memory = memory_service_pb2.DESCRIPTOR.services_by_name["LongTermMemoryService"]
    router = llmrouter_service_pb2.DESCRIPTOR.services_by_name["LlmRouterService"]
    methods = idempotent_methods(memory, router)
    # Reads and request-id-keyed writes are retried.
    assert {
        (memory.full_name, "Recall"),
        (memory.full_name, "Remember"),
        (router.full_name, "ListModels"),
        (router.full_name, "Embed"),
    } <= set(methods)
    # A generation without a request id is billed again on a retry: never retried.
    assert (router.full_name, "Generate") not in methods
    assert (router.full_name, "StreamGenerate") not in methods


def test_retry_service_config_shape() -> None:
    config = json.loads(
        retry_service_config([("a.v1.A", "Get"), ("b.v1.B", "")], initial_backoff=0.05)
    )
    (method_config,) = config["methodConfig"]
    assert method_config["name"] == [{"service": "a.v1.A", "method": "Get"}, {"service": "b.v1.B"}]
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == 4
    assert policy["initialBackoff"] == "0.05s"
    assert json.loads(retry_service_config([])) == {"methodConfig": []}
    with pytest.raises(ValueError, match="attempts"):
        retry_service_config([("a.v1.A", "Get")], max_attempts=9)


@pytest.fixture
def rpc_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("kittest", stream=stream)
    yield stream
    reset_logging()


def _rpc_lines(stream: io.StringIO, method: str) -> list[dict[str, Any]]:
    flush_logging()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [r for r in records if r.get("event") == "rpc" and r["method"].endswith(f"/{method}")]


@asynccontextmanager
async def _upstream(
    target: RunningServer, *, channel_name: str | None = None, call_timeout: float | None = None
) -> AsyncIterator[RunningServer]:
    """A service whose ``CallDown`` calls the downstream method named in the request."""
    channel = open_channel(target.address, name=channel_name)

    async def call_down(request: Message, context: Any) -> Message:
        call = unary_call(channel, request.value)
        return await call(request, timeout=call_timeout)  # type: ignore[no-any-return]

    try:
        async with running_server(
            register({"CallDown": unary(call_down)}),
            service_names=[SERVICE_NAME],
            domain="upstream.foredeck.dev",
            keys=KEYS,
        ) as upstream:
            yield upstream
    finally:
        await channel.close(None)


async def test_downstream_timeout_within_the_callers_deadline_is_a_timeout(
    downstream: tuple[RunningServer, Seen], rpc_log: io.StringIO
) -> None:
    target, _ = downstream
    async with _upstream(target) as upstream:
        # The outbound call's timeout is what the caller's 10 s leave, and the downstream
        # answers DEADLINE_EXCEEDED: the caller's own deadline is what ran out.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_call(upstream.channel, "CallDown")(
                Message(value="DeadlineExceeded"), metadata=upstream.mint(), timeout=10
            )
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert (details.reason, details.domain) == (Reason.DEADLINE_TOO_SHORT, "upstream.foredeck.dev")
    assert details.metadata == {"downstream": SERVICE_NAME}
    (line,) = _rpc_lines(rpc_log, "CallDown")
    # The caller gave up: not a server fault, no traceback, the downstream named.
    assert (line["code"], line["level"]) == ("DEADLINE_EXCEEDED", "info")
    assert (line["downstream"], line["downstream_code"]) == (SERVICE_NAME, "DEADLINE_EXCEEDED")
    assert "exception" not in line


async def test_a_real_timeout_of_the_callers_deadline_is_not_a_server_fault(
    downstream: tuple[RunningServer, Seen], rpc_log: io.StringIO
) -> None:
    target, _ = downstream
    async with _upstream(target) as upstream:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_call(upstream.channel, "CallDown")(
                Message(value="Hang"), metadata=upstream.mint(), timeout=0.5
            )
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

        async def logged() -> bool:
            return bool(_rpc_lines(rpc_log, "CallDown"))

        await _eventually(logged)
    (line,) = _rpc_lines(rpc_log, "CallDown")
    # Whether the outbound call's timeout or the inbound cancellation came first, the RPC is
    # a timeout at info level, never an INTERNAL error with a traceback.
    assert (line["code"], line["level"]) == ("DEADLINE_EXCEEDED", "info")
    assert "exception" not in line
    assert line.get("reason", Reason.DEADLINE_TOO_SHORT) == Reason.DEADLINE_TOO_SHORT


async def test_downstream_timeout_of_a_shorter_call_timeout_is_downstream_unavailable(
    downstream: tuple[RunningServer, Seen], rpc_log: io.StringIO
) -> None:
    target, _ = downstream
    async with _upstream(target, channel_name="memory", call_timeout=0.2) as upstream:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_call(upstream.channel, "CallDown")(
                Message(value="Hang"), metadata=upstream.mint(), timeout=10
            )
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.UNAVAILABLE
    assert details.reason == Reason.DOWNSTREAM_UNAVAILABLE
    assert details.metadata == {"downstream": "memory", "upstreamCode": "DEADLINE_EXCEEDED"}
    assert details.retry_after == timedelta(seconds=1)
    (line,) = _rpc_lines(rpc_log, "CallDown")
    assert (line["code"], line["level"], line["downstream"]) == ("UNAVAILABLE", "warning", "memory")


async def test_downstream_cancelled_is_cancelled(
    downstream: tuple[RunningServer, Seen], rpc_log: io.StringIO
) -> None:
    target, _ = downstream
    async with _upstream(target) as upstream:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary_call(upstream.channel, "CallDown")(
                Message(value="Cancelled"), metadata=upstream.mint(), timeout=10
            )
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.CANCELLED
    assert (details.reason, details.domain) == (
        Reason.DOWNSTREAM_UNAVAILABLE,
        "upstream.foredeck.dev",
    )
    assert details.metadata == {"downstream": SERVICE_NAME, "upstreamCode": "CANCELLED"}
    (line,) = _rpc_lines(rpc_log, "CallDown")
    assert (line["code"], line["level"]) == ("CANCELLED", "info")


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
