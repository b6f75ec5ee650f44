"""StreamGenerate: typed deltas, transparent failover before the first token, and a typed
failure carrying exactly what was sent when the provider breaks after it."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import pytest

from foredeck.common.v1 import chat_pb2, tool_pb2
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck_testing.provider import (
    Endpoint,
    HttpError,
    MidStreamFailure,
    ScriptedProvider,
    TextReply,
    ToolCall,
    ToolCallsReply,
    Usage,
)
from foredeck_testing.server import Metadata, RunningServer

MODELS = {
    "anthropic": ("claude-sonnet-4-6", Endpoint.ANTHROPIC_MESSAGES, "gpt-4o"),
    "openai": ("gpt-4o", Endpoint.OPENAI_CHAT_COMPLETIONS, "claude-sonnet-4-6"),
}
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


def _request(model: str, *, fallback: str = "", tools: bool = False) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest(
        model=model,
        messages=[
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_USER,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="Weather in Paris?"))],
            )
        ],
        tools=[WEATHER] if tools else [],
        fallback_models=[fallback] if fallback else [],
    )


async def _collect(
    stub: LlmRouterServiceAsyncStub, request: pb.StreamGenerateRequest, metadata: Metadata
) -> list[pb.StreamGenerateResponse]:
    return [event async for event in stub.StreamGenerate(request, metadata=metadata, timeout=10)]


def _rebuild(events: list[pb.StreamGenerateResponse]) -> dict[int, str]:
    """Concatenate text and argument deltas by part index."""
    parts: dict[int, str] = {}
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "text_delta":
            parts[event.text_delta.part_index] = (
                parts.get(event.text_delta.part_index, "") + event.text_delta.text
            )
        elif kind == "tool_call_arguments_delta":
            delta = event.tool_call_arguments_delta
            parts[delta.part_index] = (
                parts.get(delta.part_index, "") + delta.arguments_json_fragment
            )
    return parts


@pytest.mark.parametrize("provider", list(MODELS))
async def test_text_stream(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider, provider: str
) -> None:
    model, endpoint, _ = MODELS[provider]
    scripted_provider.enqueue(
        TextReply("one two three four", usage=Usage(input_tokens=12, output_tokens=4)),
        endpoint=endpoint,
    )
    async with router_factory() as (server, stub):
        events = await _collect(stub, _request(model), server.mint())
    kinds = [e.WhichOneof("event") for e in events]
    assert (kinds[0], kinds[-1]) == ("started", "finished")
    assert (events[0].started.model, events[0].started.provider) == (model, provider)
    assert _rebuild(events) == {0: "one two three four"}
    finished = events[-1].finished
    assert finished.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert (finished.usage.input_tokens, finished.usage.output_tokens) == (12, 4)
    # $3 and $15 per million (Sonnet) or $2.5 and $10 (GPT-4o), rounded to micro-dollars.
    expected_cost = {"anthropic": 96, "openai": 70}[provider]
    assert finished.usage.cost_usd_micros == expected_cost
    assert scripted_provider.requests[0].stream


@pytest.mark.parametrize("provider", list(MODELS))
async def test_tool_call_stream_reassembles_fragments(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider, provider: str
) -> None:
    model, endpoint, _ = MODELS[provider]
    arguments = {"city": "Paris", "units": "celsius", "days": [1, 2, 3]}
    scripted_provider.enqueue(
        ToolCallsReply(
            (
                ToolCall("get_weather", arguments, id="call_fixed_1"),
                ToolCall("get_weather", {"city": "Oslo"}, id="call_fixed_2"),
            ),
            text="Let me check.",
            argument_fragment=5,
        ),
        endpoint=endpoint,
    )
    async with router_factory() as (server, stub):
        events = await _collect(stub, _request(model, tools=True), server.mint())
    started = [e.tool_call_started for e in events if e.WhichOneof("event") == "tool_call_started"]
    assert [(s.part_index, s.tool_call_id, s.tool_name) for s in started] == [
        (1, "call_fixed_1", "get_weather"),
        (2, "call_fixed_2", "get_weather"),
    ]
    fragments = [e for e in events if e.WhichOneof("event") == "tool_call_arguments_delta"]
    assert len(fragments) > 4, "arguments arrive in several fragments"
    parts = _rebuild(events)
    assert parts[0] == "Let me check."
    assert json.loads(parts[1]) == arguments
    assert json.loads(parts[2]) == {"city": "Oslo"}
    assert events[-1].finished.finish_reason == generation_pb2.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("mode", ["error", "close"])
@pytest.mark.parametrize("provider", list(MODELS))
async def test_failure_after_first_token_ends_with_typed_failure(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider, provider: str, mode: str
) -> None:
    model, endpoint, fallback = MODELS[provider]
    scripted_provider.enqueue(
        MidStreamFailure(TextReply("alpha beta gamma delta epsilon"), after_deltas=2, mode=mode),  # type: ignore[arg-type]
        endpoint=endpoint,
    )
    async with router_factory() as (server, stub):
        events = await _collect(stub, _request(model, fallback=fallback), server.mint())
    assert events[-1].WhichOneof("event") == "failed"
    failed = events[-1].failed
    assert failed.error.reason == "STREAM_INTERRUPTED"
    assert failed.error.domain == "llmrouter.foredeck.dev"
    assert failed.error.metadata["provider"] == provider
    sent = _rebuild(events)[0]
    assert sent == "alpha beta "
    assert failed.partial_message.parts[0].text.text == sent
    # No failover after output: one request, and nothing sent twice.
    assert len(scripted_provider.requests) == 1
    assert [e.WhichOneof("event") for e in events].count("failed") == 1
    assert failed.attempts[-1].outcome == generation_pb2.ATTEMPT_OUTCOME_FAILED


@pytest.mark.parametrize("provider", list(MODELS))
async def test_tool_call_cut_mid_arguments_is_reported_incomplete(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider, provider: str
) -> None:
    model, endpoint, _ = MODELS[provider]
    reply = ToolCallsReply(
        (ToolCall("get_weather", {"city": "Paris, France"}, id="call_cut"),), argument_fragment=4
    )
    scripted_provider.enqueue(
        MidStreamFailure(reply, after_deltas=2, mode="close"), endpoint=endpoint
    )
    async with router_factory() as (server, stub):
        events = await _collect(stub, _request(model, tools=True), server.mint())
    failed = events[-1].failed
    assert list(failed.incomplete_tool_call_ids) == ["call_cut"]
    call = failed.partial_message.parts[0].tool_call
    assert call.tool_call_id == "call_cut"
    assert call.arguments_json == _rebuild(events)[0]
    assert len(call.arguments_json) == 8


@pytest.mark.parametrize("provider", list(MODELS))
async def test_failure_before_first_token_fails_over(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider, provider: str
) -> None:
    model, endpoint, fallback = MODELS[provider]
    scripted_provider.enqueue(
        MidStreamFailure(
            TextReply("never seen"), after_deltas=0, mode="error", error=HttpError(529)
        ),
        endpoint=endpoint,
    )
    async with router_factory(retry_max_attempts=1) as (server, stub):
        events = await _collect(stub, _request(model, fallback=fallback), server.mint())
    started = events[0].started
    assert started.model == fallback
    assert [a.outcome for a in started.prior_attempts] == [generation_pb2.ATTEMPT_OUTCOME_FELL_BACK]
    assert started.prior_attempts[0].model == model
    assert _rebuild(events) == {0: "Hello from the scripted provider."}
    assert events[-1].WhichOneof("event") == "finished"
