"""A tool call round-trips through both providers' formats; a caller's deadline cancels the
upstream request."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import grpc
import pytest

from foredeck.common.v1 import chat_pb2, tool_pb2
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck_testing.provider import (
    Endpoint,
    Hang,
    MidStreamFailure,
    ScriptedProvider,
    TextReply,
    ToolCall,
    ToolCallsReply,
)
from foredeck_testing.server import RunningServer

WEATHER = tool_pb2.ToolDefinition(
    name="get_weather",
    description="Weather in a city.",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)

if TYPE_CHECKING:
    from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceAsyncStub

    RouterFactory = Callable[
        ..., AbstractAsyncContextManager[tuple[RunningServer, LlmRouterServiceAsyncStub]]
    ]


def _text(role: int, text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(
        role=role,  # type: ignore[arg-type]
        parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))],
    )


@pytest.mark.parametrize(
    ("first", "first_endpoint", "second", "second_endpoint"),
    [
        (
            "claude-sonnet-4-6",
            Endpoint.ANTHROPIC_MESSAGES,
            "gpt-4o",
            Endpoint.OPENAI_CHAT_COMPLETIONS,
        ),
        (
            "gpt-4o",
            Endpoint.OPENAI_CHAT_COMPLETIONS,
            "claude-sonnet-4-6",
            Endpoint.ANTHROPIC_MESSAGES,
        ),
    ],
    ids=["anthropic-then-openai", "openai-then-anthropic"],
)
async def test_tool_call_round_trips_between_providers(
    router_factory: RouterFactory,
    scripted_provider: ScriptedProvider,
    first: str,
    first_endpoint: Endpoint,
    second: str,
    second_endpoint: Endpoint,
) -> None:
    arguments = {"city": "Zürich", "when": {"day": 2}}
    scripted_provider.enqueue(
        ToolCallsReply((ToolCall("get_weather", arguments, id="toolu_01AbC"),), text="Checking."),
        endpoint=first_endpoint,
    )
    scripted_provider.enqueue(TextReply("It is sunny."), endpoint=second_endpoint)
    question = _text(chat_pb2.ROLE_USER, "Weather in Zürich?")
    async with router_factory() as (server, stub):
        first_reply = await stub.Generate(
            pb.GenerateRequest(model=first, messages=[question], tools=[WEATHER]),
            metadata=server.mint(),
            timeout=10,
        )
        assert first_reply.finish_reason == generation_pb2.FINISH_REASON_TOOL_CALLS
        text_part, call_part = first_reply.message.parts
        assert text_part.text.text == "Checking."
        call = call_part.tool_call
        assert call.tool_call_id == "toolu_01AbC"
        assert call.tool_name == "get_weather"
        assert json.loads(call.arguments_json) == arguments

        result = chat_pb2.ChatMessage(
            role=chat_pb2.ROLE_TOOL,
            parts=[
                chat_pb2.ContentPart(
                    tool_result=tool_pb2.ToolResult(
                        tool_call_id=call.tool_call_id, content="sunny, 21C"
                    )
                )
            ],
        )
        second_reply = await stub.Generate(
            pb.GenerateRequest(
                model=second,
                messages=[question, first_reply.message, result],
                tools=[WEATHER],
            ),
            metadata=server.mint(),
            timeout=10,
        )
    assert second_reply.message.parts[0].text.text == "It is sunny."
    sent = scripted_provider.requests_to(second_endpoint)[0].body
    if second_endpoint is Endpoint.OPENAI_CHAT_COMPLETIONS:
        assistant, tool = sent["messages"][1], sent["messages"][2]
        assert assistant["role"] == "assistant"
        assert assistant["content"] == "Checking."
        assert assistant["tool_calls"][0]["id"] == "toolu_01AbC"
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == arguments
        assert tool == {"role": "tool", "tool_call_id": "toolu_01AbC", "content": "sunny, 21C"}
        assert sent["tools"][0]["function"]["parameters"] == json.loads(
            WEATHER.parameters_json_schema
        )
    else:
        assistant, tool = sent["messages"][1], sent["messages"][2]
        assert assistant["content"][0] == {"type": "text", "text": "Checking."}
        assert assistant["content"][1]["type"] == "tool_use"
        assert assistant["content"][1]["id"] == "toolu_01AbC"
        assert assistant["content"][1]["input"] == arguments
        assert tool == {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01AbC", "content": "sunny, 21C"}
            ],
        }
        assert sent["tools"][0]["input_schema"] == json.loads(WEATHER.parameters_json_schema)


@pytest.mark.parametrize(
    ("model", "endpoint"),
    [
        ("claude-sonnet-4-6", Endpoint.ANTHROPIC_MESSAGES),
        ("gpt-4o", Endpoint.OPENAI_CHAT_COMPLETIONS),
    ],
)
async def test_caller_deadline_cancels_upstream_request(
    router_factory: RouterFactory,
    scripted_provider: ScriptedProvider,
    model: str,
    endpoint: Endpoint,
) -> None:
    scripted_provider.enqueue(Hang(), endpoint=endpoint)
    async with router_factory(attempt_timeout_seconds=120) as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(
                pb.GenerateRequest(model=model, messages=[_text(chat_pb2.ROLE_USER, "hi")]),
                metadata=server.mint(),
                timeout=0.5,
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The hang ends only when the router closes the connection: the attempt timeout is 120 s.
        await scripted_provider.wait_idle(timeout=5)
    assert len(scripted_provider.requests_to(endpoint)) == 1


async def test_caller_cancelling_a_stream_cancels_upstream(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    scripted_provider.enqueue(
        MidStreamFailure(TextReply("one two three"), after_deltas=1, mode="hang"),
        endpoint=Endpoint.OPENAI_CHAT_COMPLETIONS,
    )
    async with router_factory(attempt_timeout_seconds=120) as (server, stub):
        call = stub.StreamGenerate(
            pb.StreamGenerateRequest(model="gpt-4o", messages=[_text(chat_pb2.ROLE_USER, "hi")]),
            metadata=server.mint(),
            timeout=30,
        )
        seen = []
        async for event in call:
            seen.append(event.WhichOneof("event"))
            if seen[-1] == "text_delta":
                break
        call.cancel()
        await scripted_provider.wait_idle(timeout=5)
    assert seen == ["started", "text_delta"]
