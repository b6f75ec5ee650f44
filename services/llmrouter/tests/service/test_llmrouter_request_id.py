"""Generate with a request id answers a repeat from the record instead of calling again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import grpc
import pytest

from foredeck.common.v1 import chat_pb2
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck_kit.errors import error_details
from foredeck_testing.provider import Delay, Endpoint, HttpError, ScriptedProvider, TextReply
from foredeck_testing.server import RunningServer

if TYPE_CHECKING:
    from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceAsyncStub

    RouterFactory = Callable[
        ..., AbstractAsyncContextManager[tuple[RunningServer, LlmRouterServiceAsyncStub]]
    ]


def _request(text: str, request_id: str, run_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-4o",
        messages=[
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_USER,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))],
            )
        ],
        request_id=request_id,
        metadata=generation_pb2.CallMetadata(run_id=run_id),
        disable_fallback=True,
    )


async def test_repeat_is_replayed_and_a_different_request_is_refused(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    scripted_provider.enqueue(TextReply("first answer"), TextReply("second answer"))
    async with router_factory() as (server, stub):
        first = await stub.Generate(_request("hi", "req-1"), metadata=server.mint(), timeout=5)
        # Metadata is not part of the comparison: a retry may carry other labels.
        again = await stub.Generate(
            _request("hi", "req-1", run_id="run-9"), metadata=server.mint(), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(_request("other", "req-1"), metadata=server.mint(), timeout=5)
        other_user = await stub.Generate(
            _request("hi", "req-1"), metadata=server.mint(user_id="user-b"), timeout=5
        )
    assert not first.replayed
    assert again.replayed
    assert again.generation_id == first.generation_id
    assert again.message == first.message
    assert other_user.message.parts[0].text.text == "second answer"
    details = error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (details.reason, details.metadata) == ("REQUEST_ID_REUSED", {"requestId": "req-1"})
    assert len(scripted_provider.requests) == 2


async def test_failed_call_is_not_recorded(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    scripted_provider.enqueue(HttpError(400), endpoint=Endpoint.OPENAI_CHAT_COMPLETIONS)
    async with router_factory() as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(_request("hi", "req-2"), metadata=server.mint(), timeout=5)
        reply = await stub.Generate(_request("hi", "req-2"), metadata=server.mint(), timeout=5)
    assert not reply.replayed
    assert len(scripted_provider.requests) == 2


async def test_concurrent_repeat_waits_for_the_first(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    scripted_provider.enqueue(Delay(0.3, then=TextReply("slow answer")))
    async with router_factory() as (server, stub):

        async def first_call() -> pb.GenerateResponse:
            return await stub.Generate(_request("hi", "req-3"), metadata=server.mint(), timeout=10)

        first = asyncio.create_task(first_call())
        await scripted_provider.wait_for_requests(1)
        second = await stub.Generate(_request("hi", "req-3"), metadata=server.mint(), timeout=10)
        first_reply = await first
    assert second.replayed
    assert second.message.parts[0].text.text == "slow answer"
    assert second.generation_id == first_reply.generation_id
    assert len(scripted_provider.requests) == 1
