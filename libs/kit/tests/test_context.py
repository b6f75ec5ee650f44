"""Detached work: tasks that outlive the RPC that started them, with a context of their own."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from foredeck_kit.channels import open_channel
from foredeck_kit.context import (
    RpcState,
    current_rpc,
    detached_tasks,
    drain_detached,
    outbound_principal_token,
    rpc_scope,
    spawn_detached,
)
from foredeck_kit.logs import configure_logging, reset_logging
from foredeck_kit.principal import Principal, current_principal, optional_principal
from foredeck_testing.echo import SERVICE_NAME, Message, register, unary, unary_call
from foredeck_testing.server import fresh_keys, running_server

DOMAIN = "kittest.foredeck.dev"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("kittest", stream=stream)
    yield stream
    reset_logging()


async def test_detached_work_calls_downstream_after_the_rpc_and_its_deadline() -> None:
    keys = fresh_keys()
    seen: list[Principal] = []

    async def leaf(request: Message, context: Any) -> Message:
        seen.append(current_principal())
        return Message(value="leaf")

    async with running_server(
        register({"Leaf": unary(leaf)}), service_names=[SERVICE_NAME], domain=DOMAIN, keys=keys
    ) as downstream:
        channel = open_channel(downstream.address)
        worker_token = downstream.token("tenant-a", "worker")
        rpc_over = asyncio.Event()
        started: list[asyncio.Task[Message]] = []
        inbound_deadline: list[float] = []

        async def notify() -> Message:
            await rpc_over.wait()
            return await unary_call(channel, "Leaf")(Message())  # type: ignore[no-any-return]

        async def accept(request: Message, context: Any) -> Message:
            state = current_rpc()
            assert state is not None
            assert state.deadline is not None
            inbound_deadline.append(state.deadline)
            started.append(
                spawn_detached(notify, name="notify", timeout=30, principal_token=worker_token)
            )
            # What the kit replaces: a plain task copies the RPC's context, deadline included.
            started.append(asyncio.create_task(notify()))
            return Message(value="accepted")

        try:
            async with running_server(
                register({"Accept": unary(accept)}),
                service_names=[SERVICE_NAME],
                domain=DOMAIN,
                keys=keys,
            ) as upstream:
                caller = upstream.mint("tenant-a", "caller")
                reply = await unary_call(upstream.channel, "Accept")(
                    Message(), metadata=caller, timeout=0.5
                )
                assert reply.value == "accepted"
                # Let the inbound deadline pass: the work must run after it, not merely after
                # the reply.
                await asyncio.sleep(max(0.0, inbound_deadline[0] - time.monotonic()) + 0.05)
                rpc_over.set()
                detached, inherited = started
                assert (await asyncio.wait_for(detached, 10)).value == "leaf"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(inherited, 10)
        finally:
            await channel.close(None)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert [(p.tenant_id, p.user_id) for p in seen] == [("tenant-a", "worker")]


async def test_detached_work_has_a_fresh_context() -> None:
    async def work(observed: dict[str, Any]) -> None:
        state = current_rpc()
        assert state is not None
        observed["method"] = state.method
        observed["remaining"] = state.time_remaining()
        observed["request_id"] = state.request_id
        observed["principal"] = optional_principal()
        observed["token"] = outbound_principal_token()

    bounded: dict[str, Any] = {}
    unbounded: dict[str, Any] = {}
    inbound = RpcState(method="/x.v1.S/M", deadline=time.monotonic() - 1, principal_token="rpc")
    with rpc_scope(inbound):
        first = spawn_detached(
            lambda: work(bounded), name="cleanup", timeout=60, request_id="req-1"
        )
        second = spawn_detached(lambda: work(unbounded), name="forever", principal_token="own")
    await asyncio.gather(first, second)
    assert bounded["method"] == "cleanup"
    assert 0 < bounded["remaining"] <= 60
    assert bounded["request_id"] == "req-1"
    assert bounded["principal"] is None
    assert bounded["token"] is None
    assert unbounded["remaining"] is None
    assert unbounded["request_id"] is None
    assert unbounded["token"] == "own"
    with pytest.raises(ValueError, match="positive"):
        spawn_detached(lambda: work({}), name="x", timeout=0)


async def test_failures_and_timeouts_are_logged_not_lost(log_stream: io.StringIO) -> None:
    async def broken() -> None:
        raise RuntimeError("notification service said no")

    async def stuck() -> None:
        await asyncio.Event().wait()

    failing = spawn_detached(broken, name="notify")
    hanging = spawn_detached(stuck, name="stuck", timeout=0.05)
    done, _ = await asyncio.wait([failing, hanging], timeout=10)
    assert done == {failing, hanging}
    assert isinstance(failing.exception(), RuntimeError)
    assert isinstance(hanging.exception(), TimeoutError)
    records = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    failed = {r["task"]: r for r in records if r["event"] == "detached work failed"}
    assert set(failed) == {"notify", "stuck"}
    assert failed["notify"]["level"] == "error"
    assert "RuntimeError: notification service said no" in failed["notify"]["exception"]
    assert "TimeoutError" in failed["stuck"]["exception"]


async def test_detached_work_starts_a_trace_linked_to_the_current_one() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")

    async def work() -> None:
        tracer.start_span("inside").end()

    with tracer.start_as_current_span("rpc") as rpc_span:
        task = spawn_detached(work, name="detached", tracer_provider=provider)
    await task
    provider.shutdown()
    by_name = {s.name: s for s in spans.get_finished_spans()}
    detached = by_name["detached"]
    rpc_context = rpc_span.get_span_context()
    assert detached.parent is None
    assert detached.context.trace_id != rpc_context.trace_id
    assert [link.context.span_id for link in detached.links] == [rpc_context.span_id]
    assert by_name["inside"].context.trace_id == detached.context.trace_id


async def test_drain_waits_then_cancels() -> None:
    finished = asyncio.Event()

    async def quick() -> None:
        finished.set()

    async def endless() -> None:
        await asyncio.Event().wait()

    spawn_detached(quick, name="quick")
    endless_task = spawn_detached(endless, name="endless")
    assert endless_task in detached_tasks()
    assert await drain_detached(0.05) == 1
    assert finished.is_set()
    assert endless_task.cancelled()
    assert detached_tasks() == []
    assert await drain_detached(0.05) == 0
