"""The circuit breaker opens, half-opens and closes, and two routers share it through Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import grpc
import pytest

from foredeck.common.v1 import chat_pb2
from foredeck.llmrouter.v1 import generation_pb2, provider_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck_kit.errors import error_details
from foredeck_testing.provider import Delay, Endpoint, HttpError, ScriptedProvider, TextReply
from foredeck_testing.server import RunningServer, fresh_keys

MODEL = "gpt-4o"
COOLDOWN = 0.4

if TYPE_CHECKING:
    from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceAsyncStub

    RouterFactory = Callable[
        ..., AbstractAsyncContextManager[tuple[RunningServer, LlmRouterServiceAsyncStub]]
    ]


def _request(fallback: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL,
        messages=[
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_USER,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="hi"))],
            )
        ],
        fallback_models=[fallback] if fallback else [],
        disable_fallback=not fallback,
    )


async def _circuit(stub: LlmRouterServiceAsyncStub, server: RunningServer) -> provider_pb2.Circuit:
    health = await stub.GetProviderHealth(
        pb.GetProviderHealthRequest(provider="openai"), metadata=server.mint(), timeout=5
    )
    return next(c for c in health.health.circuits if c.model == MODEL)


async def test_circuit_opens_half_opens_and_closes_across_two_routers(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    keys = fresh_keys()
    settings = {
        "keys": keys,
        "retry_max_attempts": 1,
        "circuit_failure_threshold": 2,
        "circuit_cooldown_seconds": COOLDOWN,
    }
    endpoint = Endpoint.OPENAI_CHAT_COMPLETIONS
    async with router_factory(**settings) as (a, stub_a), router_factory(**settings) as (b, stub_b):
        # Two failures through router A open the circuit.
        scripted_provider.enqueue(HttpError(503), HttpError(503), endpoint=endpoint)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub_a.Generate(_request(), metadata=a.mint(), timeout=5)
            assert error_details(caught.value).reason == "PROVIDER_UNAVAILABLE"
        assert (await _circuit(stub_b, b)).state == provider_pb2.CIRCUIT_STATE_OPEN

        # Router B refuses without calling the provider, and falls back when it can.
        calls = len(scripted_provider.requests)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub_b.Generate(_request(), metadata=b.mint(), timeout=5)
        details = error_details(caught.value)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details.reason == "CIRCUIT_OPEN"
        assert details.metadata == {"models": MODEL}
        assert details.retry_after is not None
        assert 0 < details.retry_after.total_seconds() <= COOLDOWN
        reply = await stub_b.Generate(_request("claude-sonnet-4-6"), metadata=b.mint(), timeout=5)
        assert reply.model == "claude-sonnet-4-6"
        assert reply.attempts[0].outcome == generation_pb2.ATTEMPT_OUTCOME_SKIPPED_CIRCUIT_OPEN
        assert len(scripted_provider.requests_to(endpoint)) == calls

        # After the cool-down one probe goes through; while it runs the circuit is half-open and
        # the other router is still refused.
        open_circuit = await _circuit(stub_a, a)
        wait = (
            open_circuit.next_probe_time.ToMilliseconds() / 1000
            - open_circuit.open_time.ToMilliseconds() / 1000
        )
        assert wait == pytest.approx(COOLDOWN, abs=0.01)
        scripted_provider.enqueue(Delay(30, then=TextReply("probe ok")), endpoint=endpoint)
        probe = asyncio.create_task(_probe_when_allowed(stub_a, a))
        await scripted_provider.wait_for_requests(calls + 2, timeout=10)
        assert (await _circuit(stub_b, b)).state == provider_pb2.CIRCUIT_STATE_HALF_OPEN
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub_b.Generate(_request(), metadata=b.mint(), timeout=5)
        assert error_details(caught.value).reason == "CIRCUIT_OPEN"
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
        await scripted_provider.wait_idle()

        # A cancelled probe gives no verdict (once the router has seen the cancellation the probe
        # is free again); the next successful probe closes the circuit.
        reply = await _probe_when_allowed(stub_b, b)
        assert reply.message.parts[0].text.text == "Hello from the scripted provider."
        closed = await _circuit(stub_a, a)
        assert closed.state == provider_pb2.CIRCUIT_STATE_CLOSED
        assert closed.recent_failure_count == 0
        assert closed.last_failure_reason != 0


async def _probe_when_allowed(
    stub: LlmRouterServiceAsyncStub, server: RunningServer
) -> pb.GenerateResponse:
    """Call until the open circuit lets a probe through (bounded by the cool-down)."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await stub.Generate(_request(), metadata=server.mint(), timeout=60)
            except grpc.aio.AioRpcError as error:
                if error_details(error).reason != "CIRCUIT_OPEN":
                    raise
                # Poll no slower than every 50 ms: a released probe frees the circuit early.
                delay = error_details(error).retry_after
                await asyncio.sleep(min(delay.total_seconds(), 0.05) if delay else 0.05)


async def test_failed_probe_reopens(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    endpoint = Endpoint.OPENAI_CHAT_COMPLETIONS
    async with router_factory(
        retry_max_attempts=1, circuit_failure_threshold=1, circuit_cooldown_seconds=0.2
    ) as (server, stub):
        scripted_provider.enqueue(HttpError(500), HttpError(500), endpoint=endpoint)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(_request(), metadata=server.mint(), timeout=5)
        first_open = await _circuit(stub, server)
        assert first_open.state == provider_pb2.CIRCUIT_STATE_OPEN
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _probe_when_allowed(stub, server)
        assert error_details(caught.value).reason == "PROVIDER_UNAVAILABLE"
        reopened = await _circuit(stub, server)
        assert reopened.state == provider_pb2.CIRCUIT_STATE_OPEN
        assert reopened.open_time.ToNanoseconds() > first_open.open_time.ToNanoseconds()
    assert len(scripted_provider.requests_to(endpoint)) == 2
