"""The scripted provider, exercised through the real `anthropic` and `openai` SDKs."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from anthropic.types import (
    Message,
    MessageParam,
    RawMessageStreamEvent,
    TextBlock,
    ToolParam,
    ToolUseBlock,
)
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from foredeck_testing.provider import (
    DEFAULT_REPLY,
    ConnectionReset,
    Delay,
    Endpoint,
    Hang,
    HttpError,
    MidStreamFailure,
    ScriptedProvider,
    ScriptError,
    Step,
    TextReply,
    ToolCall,
    ToolCallsReply,
    Usage,
    embedding_vector,
    step_from_dict,
    step_to_dict,
)

API_KEY = "sk-test"
CLAUDE = "claude-sonnet-4-6"
GPT = "gpt-4o-mini"
ANTHROPIC_PROMPT: list[MessageParam] = [{"role": "user", "content": "What is the weather?"}]
OPENAI_PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather?"}
]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
    "required": ["city"],
}
CACHED_USAGE = Usage(
    input_tokens=12, output_tokens=7, cache_creation_input_tokens=100, cache_read_input_tokens=200
)


@pytest.fixture
async def anthropic_client(
    scripted_provider: ScriptedProvider,
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=scripted_provider.anthropic_base_url, api_key=API_KEY, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def openai_client(scripted_provider: ScriptedProvider) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=scripted_provider.openai_base_url, api_key=API_KEY, max_retries=0
    ) as client:
        yield client


def text_of(message: Message) -> str:
    return "".join(block.text for block in message.content if isinstance(block, TextBlock))


class Ask(Protocol):
    """Sends one prompt through a provider SDK and returns the reply text."""

    def __call__(
        self,
        provider: ScriptedProvider,
        *,
        max_retries: int = 0,
        request_timeout: float = 5.0,
        api_key: str = API_KEY,
    ) -> Awaitable[str]: ...


async def ask_anthropic(
    provider: ScriptedProvider,
    *,
    max_retries: int = 0,
    request_timeout: float = 5.0,
    api_key: str = API_KEY,
) -> str:
    async with anthropic.AsyncAnthropic(
        base_url=provider.anthropic_base_url,
        api_key=api_key,
        max_retries=max_retries,
        timeout=request_timeout,
    ) as client:
        message = await client.messages.create(
            model=CLAUDE, max_tokens=64, messages=ANTHROPIC_PROMPT
        )
    return text_of(message)


async def ask_openai(
    provider: ScriptedProvider,
    *,
    max_retries: int = 0,
    request_timeout: float = 5.0,
    api_key: str = API_KEY,
) -> str:
    async with openai.AsyncOpenAI(
        base_url=provider.openai_base_url,
        api_key=api_key,
        max_retries=max_retries,
        timeout=request_timeout,
    ) as client:
        completion = await client.chat.completions.create(model=GPT, messages=OPENAI_PROMPT)
    return completion.choices[0].message.content or ""


async def anthropic_texts(
    stream: anthropic.AsyncStream[RawMessageStreamEvent], received: list[str]
) -> None:
    """Read a raw Messages stream, appending each text or tool-argument delta as it arrives."""
    async for event in stream:
        if event.type == "content_block_delta":
            if event.delta.type == "text_delta":
                received.append(event.delta.text)
            elif event.delta.type == "input_json_delta":
                received.append(event.delta.partial_json)


async def openai_texts(
    stream: openai.AsyncStream[ChatCompletionChunk], received: list[str]
) -> None:
    """Read a chat completion stream, appending each content delta as it arrives."""
    async for chunk in stream:
        received += [choice.delta.content for choice in chunk.choices if choice.delta.content]


BOTH = [pytest.param(ask_anthropic, id="anthropic"), pytest.param(ask_openai, id="openai")]


# Plain replies


async def test_anthropic_text_reply_with_cache_usage(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    scripted_provider.enqueue(TextReply("Sunny, 21 degrees.", usage=CACHED_USAGE))

    message = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=64, system="Answer in one line.", messages=ANTHROPIC_PROMPT
    )

    assert text_of(message) == "Sunny, 21 degrees."
    assert message.id.startswith("msg_")
    assert message.model == CLAUDE
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 12
    assert message.usage.output_tokens == 7
    assert message.usage.cache_creation_input_tokens == 100
    assert message.usage.cache_read_input_tokens == 200
    (request,) = scripted_provider.requests
    assert request.method == "POST"
    assert request.path == "/v1/messages"
    assert request.endpoint is Endpoint.ANTHROPIC_MESSAGES
    assert request.body["system"] == "Answer in one line."
    assert request.body["messages"] == ANTHROPIC_PROMPT
    assert "anthropic-version" in request.headers
    assert API_KEY in request.headers.get("x-api-key", request.headers.get("authorization", ""))


async def test_openai_text_reply_with_cached_tokens(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    scripted_provider.enqueue(TextReply("Sunny, 21 degrees.", usage=CACHED_USAGE))

    completion = await openai_client.chat.completions.create(model=GPT, messages=OPENAI_PROMPT)

    assert completion.id.startswith("chatcmpl-")
    assert completion.model == GPT
    choice = completion.choices[0]
    assert choice.message.content == "Sunny, 21 degrees."
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == 12 + 100 + 200
    assert usage.completion_tokens == 7
    assert usage.total_tokens == 12 + 100 + 200 + 7
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 200
    (request,) = scripted_provider.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.body["messages"] == OPENAI_PROMPT


@pytest.mark.parametrize("ask", BOTH)
async def test_default_reply_when_nothing_is_queued(
    scripted_provider: ScriptedProvider, ask: Ask
) -> None:
    assert await ask(scripted_provider) == DEFAULT_REPLY.text
    scripted_provider.default = TextReply("changed default")
    assert await ask(scripted_provider) == "changed default"


async def test_truncated_reply_reports_the_token_limit(
    scripted_provider: ScriptedProvider,
    anthropic_client: anthropic.AsyncAnthropic,
    openai_client: openai.AsyncOpenAI,
) -> None:
    scripted_provider.enqueue(TextReply("cut", truncated=True), TextReply("cut", truncated=True))

    message = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=1, messages=ANTHROPIC_PROMPT
    )
    completion = await openai_client.chat.completions.create(model=GPT, messages=OPENAI_PROMPT)

    assert message.stop_reason == "max_tokens"
    assert completion.choices[0].finish_reason == "length"


# Tool calls


async def test_anthropic_tool_calls_round_trip_ids(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    tools: list[ToolParam] = [
        {"name": "get_weather", "description": "Current weather.", "input_schema": WEATHER_SCHEMA}
    ]
    scripted_provider.enqueue(
        ToolCallsReply(
            (
                ToolCall("get_weather", {"city": "Paris", "unit": "C"}, id="toolu_01Fixed"),
                ToolCall("get_weather", {"city": "Oslo"}),
            ),
            text="Let me check.",
        ),
        TextReply("Paris is sunny, Oslo is cold."),
    )

    first = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=256, tools=tools, messages=ANTHROPIC_PROMPT
    )

    assert first.stop_reason == "tool_use"
    assert text_of(first) == "Let me check."
    uses = [block for block in first.content if isinstance(block, ToolUseBlock)]
    assert [use.name for use in uses] == ["get_weather", "get_weather"]
    assert uses[0].id == "toolu_01Fixed"
    assert uses[1].id.startswith("toolu_")
    assert uses[0].input == {"city": "Paris", "unit": "C"}
    assert uses[1].input == {"city": "Oslo"}

    results: list[MessageParam] = [
        *ANTHROPIC_PROMPT,
        first.to_param(),
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "ok"} for use in uses
            ],
        },
    ]
    second = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=256, tools=tools, messages=results
    )

    assert text_of(second) == "Paris is sunny, Oslo is cold."
    sent = scripted_provider.requests
    assert sent[0].body["tools"] == tools
    tool_results = sent[1].body["messages"][2]["content"]
    assert [item["tool_use_id"] for item in tool_results] == [uses[0].id, uses[1].id]


async def test_openai_tool_calls_round_trip_ids(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    tools: list[ChatCompletionToolParam] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather.",
                "parameters": WEATHER_SCHEMA,
            },
        }
    ]
    scripted_provider.enqueue(
        ToolCallsReply(
            (
                ToolCall("get_weather", {"city": "Paris"}, id="call_fixed"),
                ToolCall("get_weather", {"city": "Oslo", "unit": "C"}),
            )
        ),
        TextReply("Paris is sunny, Oslo is cold."),
    )

    first = await openai_client.chat.completions.create(
        model=GPT, messages=OPENAI_PROMPT, tools=tools
    )

    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls)
    functions = [call for call in calls if isinstance(call, ChatCompletionMessageFunctionToolCall)]
    assert functions[0].id == "call_fixed"
    assert functions[1].id.startswith("call_")
    assert [json.loads(call.function.arguments) for call in functions] == [
        {"city": "Paris"},
        {"city": "Oslo", "unit": "C"},
    ]

    follow_up: list[ChatCompletionMessageParam] = [
        *OPENAI_PROMPT,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in functions
            ],
        },
    ]
    follow_up += [{"role": "tool", "tool_call_id": call.id, "content": "ok"} for call in functions]
    second = await openai_client.chat.completions.create(model=GPT, messages=follow_up, tools=tools)

    assert second.choices[0].message.content == "Paris is sunny, Oslo is cold."
    sent = scripted_provider.requests
    assert sent[0].body["tools"] == tools
    assert [m.get("tool_call_id") for m in sent[1].body["messages"][2:]] == [
        functions[0].id,
        functions[1].id,
    ]


# Streaming


async def test_anthropic_stream_events_assemble_text(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    scripted_provider.enqueue(TextReply("Sunny and warm today.", usage=CACHED_USAGE))

    stream = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=64, messages=ANTHROPIC_PROMPT, stream=True
    )
    kinds: list[str] = []
    text = ""
    async for event in stream:
        kinds.append(event.type)
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
        if event.type == "message_delta":
            assert event.delta.stop_reason == "end_turn"
            assert event.usage.output_tokens == 7

    assert text == "Sunny and warm today."
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert scripted_provider.requests[0].stream


async def test_anthropic_messages_stream_final_message(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    scripted_provider.enqueue(TextReply("One two three.", usage=CACHED_USAGE))

    async with anthropic_client.messages.stream(
        model=CLAUDE, max_tokens=64, messages=ANTHROPIC_PROMPT
    ) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()

    assert pieces == ["One ", "two ", "three."]
    assert text_of(final) == "One two three."
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 12
    assert final.usage.output_tokens == 7
    assert final.usage.cache_read_input_tokens == 200
    assert final.usage.cache_creation_input_tokens == 100


async def test_anthropic_streamed_tool_arguments_are_assembled(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    arguments = {"city": "Saint-Pierre-et-Miquelon", "unit": "C", "days": [1, 2, 3]}
    scripted_provider.enqueue(
        ToolCallsReply((ToolCall("get_weather", arguments, id="toolu_01Stream"),), text="Hmm.")
    )

    json_deltas = 0
    async with anthropic_client.messages.stream(
        model=CLAUDE, max_tokens=64, messages=ANTHROPIC_PROMPT
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                json_deltas += 1
        final = await stream.get_final_message()

    assert json_deltas > 1
    assert final.stop_reason == "tool_use"
    assert text_of(final) == "Hmm."
    (use,) = [block for block in final.content if isinstance(block, ToolUseBlock)]
    assert use.id == "toolu_01Stream"
    assert use.name == "get_weather"
    assert use.input == arguments


async def test_openai_stream_chunks_with_usage(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    scripted_provider.enqueue(TextReply("Sunny and warm today.", usage=CACHED_USAGE))

    stream = await openai_client.chat.completions.create(
        model=GPT, messages=OPENAI_PROMPT, stream=True, stream_options={"include_usage": True}
    )
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usages = []
    async for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
            assert chunk.choices == []
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)

    assert pieces == ["Sunny ", "and ", "warm ", "today."]
    assert finish_reasons == ["stop"]
    (usage,) = usages
    assert usage.prompt_tokens == 312
    assert usage.completion_tokens == 7
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 200


async def test_openai_stream_without_usage_option_has_no_usage_chunk(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.chat.completions.create(
        model=GPT, messages=OPENAI_PROMPT, stream=True
    )
    chunks = [chunk async for chunk in stream]

    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY.text


async def test_openai_completions_stream_assembles_tool_arguments(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    arguments = {"city": "Saint-Pierre-et-Miquelon", "unit": "C", "days": [1, 2, 3]}
    scripted_provider.enqueue(
        ToolCallsReply(
            (ToolCall("get_weather", arguments, id="call_stream"), ToolCall("get_time", {})),
            text="Checking.",
        )
    )

    async with openai_client.chat.completions.stream(
        model=GPT, messages=OPENAI_PROMPT, stream_options={"include_usage": True}
    ) as stream:
        argument_deltas = 0
        async for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                argument_deltas += 1
        final = await stream.get_final_completion()

    assert argument_deltas > 1
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    calls = choice.message.tool_calls or []
    assert [(call.id, call.function.name) for call in calls] == [
        ("call_stream", "get_weather"),
        (calls[1].id, "get_time"),
    ]
    assert calls[1].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == arguments
    assert json.loads(calls[1].function.arguments) == {}
    assert final.usage is not None
    assert final.usage.total_tokens == 15


async def test_stream_paces_deltas(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    scripted_provider.enqueue(TextReply("a b c", delta_interval=0.05))

    started = time.monotonic()
    stream = await openai_client.chat.completions.create(
        model=GPT, messages=OPENAI_PROMPT, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert text == "a b c"
    assert time.monotonic() - started >= 0.15


# HTTP errors


@pytest.mark.parametrize(
    ("ask", "error_class"),
    [
        pytest.param(ask_anthropic, anthropic.RateLimitError, id="anthropic"),
        pytest.param(ask_openai, openai.RateLimitError, id="openai"),
    ],
)
async def test_rate_limit_exposes_retry_after(
    scripted_provider: ScriptedProvider, ask: Ask, error_class: type[Exception]
) -> None:
    scripted_provider.enqueue(HttpError.rate_limited(retry_after=7))

    with pytest.raises(error_class) as caught:
        await ask(scripted_provider, max_retries=0)

    error = caught.value
    assert isinstance(error, anthropic.APIStatusError | openai.APIStatusError)
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "7"
    assert error.request_id is not None
    assert error.request_id.startswith("req_")
    assert len(scripted_provider.requests) == 1


async def test_anthropic_error_body_shape(scripted_provider: ScriptedProvider) -> None:
    scripted_provider.enqueue(HttpError.rate_limited(retry_after=1))

    with pytest.raises(anthropic.RateLimitError) as caught:
        await ask_anthropic(scripted_provider)

    assert caught.value.type == "rate_limit_error"
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": caught.value.api_message},
        "request_id": caught.value.request_id,
    }


@pytest.mark.parametrize("ask", BOTH)
async def test_sdk_retries_after_retry_after_ms(
    scripted_provider: ScriptedProvider, ask: Ask
) -> None:
    scripted_provider.enqueue(
        HttpError.rate_limited(retry_after=30, retry_after_ms=20), TextReply("second attempt")
    )

    assert await ask(scripted_provider, max_retries=1) == "second attempt"

    requests = scripted_provider.requests
    assert [request.retry_count for request in requests] == [0, 1]
    assert requests[0].body == requests[1].body
    assert scripted_provider.pending == 0


@pytest.mark.parametrize("ask", BOTH)
async def test_should_retry_false_stops_sdk_retries(
    scripted_provider: ScriptedProvider, ask: Ask
) -> None:
    scripted_provider.enqueue(HttpError(500, should_retry=False), TextReply("never sent"))

    with pytest.raises((anthropic.InternalServerError, openai.InternalServerError)):
        await ask(scripted_provider, max_retries=2)

    assert len(scripted_provider.requests) == 1
    assert scripted_provider.pending == 1


@pytest.mark.parametrize(
    ("ask", "status", "error_class", "error_type"),
    [
        pytest.param(ask_anthropic, 500, anthropic.InternalServerError, "api_error", id="a-500"),
        pytest.param(
            ask_anthropic, 503, anthropic.ServiceUnavailableError, "api_error", id="a-503"
        ),
        pytest.param(ask_anthropic, 529, anthropic.OverloadedError, "overloaded_error", id="a-529"),
        pytest.param(
            ask_anthropic, 400, anthropic.BadRequestError, "invalid_request_error", id="a-400"
        ),
        pytest.param(ask_openai, 500, openai.InternalServerError, "server_error", id="o-500"),
        pytest.param(ask_openai, 503, openai.InternalServerError, "server_error", id="o-503"),
        pytest.param(ask_openai, 529, openai.InternalServerError, "server_error", id="o-529"),
        pytest.param(ask_openai, 404, openai.NotFoundError, "invalid_request_error", id="o-404"),
    ],
)
async def test_error_statuses_map_to_sdk_errors(
    scripted_provider: ScriptedProvider,
    ask: Ask,
    status: int,
    error_class: type[Exception],
    error_type: str,
) -> None:
    scripted_provider.enqueue(HttpError(status))

    with pytest.raises(error_class) as caught:
        await ask(scripted_provider)

    error = caught.value
    assert isinstance(error, anthropic.APIStatusError | openai.APIStatusError)
    assert error.status_code == status
    assert error.type == error_type


async def test_openai_insufficient_quota_code(scripted_provider: ScriptedProvider) -> None:
    scripted_provider.enqueue(HttpError.insufficient_quota())

    with pytest.raises(openai.RateLimitError) as caught:
        await ask_openai(scripted_provider)

    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"
    assert "quota" in caught.value.message


# Broken streams


async def test_anthropic_error_event_mid_stream(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    scripted_provider.enqueue(MidStreamFailure(TextReply("one two three four"), after_deltas=2))

    stream = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=64, messages=ANTHROPIC_PROMPT, stream=True
    )
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        await anthropic_texts(stream, received)

    assert received == ["one ", "two "]
    assert caught.value.type == "overloaded_error"


async def test_openai_error_event_mid_stream(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    failure = HttpError(500, message="The model crashed.", error_type="server_error")
    scripted_provider.enqueue(
        MidStreamFailure(TextReply("one two three four"), after_deltas=3, error=failure)
    )

    stream = await openai_client.chat.completions.create(
        model=GPT, messages=OPENAI_PROMPT, stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        await openai_texts(stream, received)

    assert received == ["one ", "two ", "three "]
    assert caught.value.message == "The model crashed."
    assert caught.value.type == "server_error"


async def test_anthropic_abrupt_close_mid_stream(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    scripted_provider.enqueue(
        MidStreamFailure(
            ToolCallsReply((ToolCall("get_weather", {"city": "Paris, France"}),), text="Hm, ok."),
            after_deltas=3,
            mode="close",
        )
    )

    stream = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=64, messages=ANTHROPIC_PROMPT, stream=True
    )
    received: list[str] = []
    # The Anthropic SDK lets the transport error out of a broken stream unwrapped.
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        await anthropic_texts(stream, received)

    assert received == ["Hm, ", "ok.", '{"city":"Par']


async def test_openai_abrupt_close_mid_stream(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    scripted_provider.enqueue(
        MidStreamFailure(TextReply("one two three"), after_deltas=1, mode="close")
    )

    stream = await openai_client.chat.completions.create(
        model=GPT, messages=OPENAI_PROMPT, stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        await openai_texts(stream, received)

    assert received == ["one "]


async def test_failure_before_first_delta(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    scripted_provider.enqueue(MidStreamFailure(TextReply("never seen"), after_deltas=0))

    stream = await openai_client.chat.completions.create(
        model=GPT, messages=OPENAI_PROMPT, stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError):
        await openai_texts(stream, received)

    assert received == []


async def test_stream_that_stalls_times_out_the_client(
    scripted_provider: ScriptedProvider,
) -> None:
    scripted_provider.enqueue(MidStreamFailure(TextReply("one two"), after_deltas=1, mode="hang"))

    received: list[str] = []
    # Only reading the stream is short: connecting may take longer on a busy machine.
    async with openai.AsyncOpenAI(
        base_url=scripted_provider.openai_base_url,
        api_key=API_KEY,
        max_retries=0,
        timeout=openai.Timeout(10.0, read=0.3),
    ) as client:
        stream = await client.chat.completions.create(
            model=GPT, messages=OPENAI_PROMPT, stream=True
        )
        with pytest.raises(openai.APITimeoutError):
            await openai_texts(stream, received)

    assert received == ["one "]
    await scripted_provider.wait_idle()


@pytest.mark.parametrize(
    ("mode", "ask", "error_class"),
    [
        pytest.param("error", ask_anthropic, anthropic.OverloadedError, id="anthropic-error"),
        pytest.param("close", ask_anthropic, anthropic.APIConnectionError, id="anthropic-close"),
        pytest.param("error", ask_openai, openai.InternalServerError, id="openai-error"),
        pytest.param("close", ask_openai, openai.APIConnectionError, id="openai-close"),
    ],
)
async def test_stream_failure_met_without_streaming(
    scripted_provider: ScriptedProvider,
    mode: Literal["error", "close"],
    ask: Ask,
    error_class: type[Exception],
) -> None:
    scripted_provider.enqueue(MidStreamFailure(TextReply("one two"), mode=mode))

    with pytest.raises(error_class):
        await ask(scripted_provider)


# Connections and time


@pytest.mark.parametrize(
    ("ask", "error_class"),
    [
        pytest.param(ask_anthropic, anthropic.APIConnectionError, id="anthropic"),
        pytest.param(ask_openai, openai.APIConnectionError, id="openai"),
    ],
)
async def test_connection_reset(
    scripted_provider: ScriptedProvider, ask: Ask, error_class: type[Exception]
) -> None:
    scripted_provider.enqueue(ConnectionReset())

    with pytest.raises(error_class):
        await ask(scripted_provider)

    scripted_provider.enqueue(ConnectionReset(), TextReply("recovered"))
    assert await ask(scripted_provider, max_retries=1) == "recovered"
    assert len(scripted_provider.requests) == 3


@pytest.mark.parametrize(
    ("ask", "error_class"),
    [
        pytest.param(ask_anthropic, anthropic.APITimeoutError, id="anthropic"),
        pytest.param(ask_openai, openai.APITimeoutError, id="openai"),
    ],
)
@pytest.mark.parametrize("step", [Delay(60.0), Hang()], ids=["delay", "hang"])
async def test_client_timeout_cancels_the_wait(
    scripted_provider: ScriptedProvider, ask: Ask, error_class: type[Exception], step: Step
) -> None:
    scripted_provider.enqueue(step)

    with pytest.raises(error_class):
        await ask(scripted_provider, request_timeout=0.3)

    # The handler ended with the client's connection, long before the scripted minute.
    await scripted_provider.wait_idle(timeout=2.0)
    assert await ask(scripted_provider) == DEFAULT_REPLY.text


async def test_delay_then_reply(scripted_provider: ScriptedProvider) -> None:
    scripted_provider.enqueue(Delay(0.2, TextReply("late but fine")))

    started = time.monotonic()
    assert await ask_openai(scripted_provider) == "late but fine"
    assert time.monotonic() - started >= 0.2


async def test_closing_the_server_releases_a_hung_request() -> None:
    async with ScriptedProvider(default=Hang()) as provider:
        pending = asyncio.create_task(ask_openai(provider, request_timeout=30.0))
        await provider.wait_for_requests(1)
        assert provider.in_flight == 1

    with pytest.raises(openai.APIConnectionError):
        await pending
    assert provider.in_flight == 0


async def test_wait_for_requests_times_out_with_a_count(
    scripted_provider: ScriptedProvider,
) -> None:
    with pytest.raises(TimeoutError, match="expected 1 requests, received 0"):
        await scripted_provider.wait_for_requests(1, timeout=0.05)


# Routing of queued steps


async def test_steps_aimed_at_endpoints_and_models(
    scripted_provider: ScriptedProvider,
    anthropic_client: anthropic.AsyncAnthropic,
    openai_client: openai.AsyncOpenAI,
) -> None:
    scripted_provider.enqueue(TextReply("for gpt-4o"), model="gpt-4o")
    scripted_provider.enqueue(TextReply("for anthropic"), endpoint=Endpoint.ANTHROPIC_MESSAGES)
    scripted_provider.enqueue(TextReply("for anyone"))

    other_model = await openai_client.chat.completions.create(model=GPT, messages=OPENAI_PROMPT)
    claude = await anthropic_client.messages.create(
        model=CLAUDE, max_tokens=64, messages=ANTHROPIC_PROMPT
    )
    gpt_4o = await openai_client.chat.completions.create(model="gpt-4o", messages=OPENAI_PROMPT)

    assert other_model.choices[0].message.content == "for anyone"
    assert text_of(claude) == "for anthropic"
    assert gpt_4o.choices[0].message.content == "for gpt-4o"
    assert scripted_provider.pending == 0
    assert [r.model for r in scripted_provider.requests] == [GPT, CLAUDE, "gpt-4o"]


# Other endpoints


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    model = "text-embedding-3-small"
    async with (
        ScriptedProvider(embedding_dimensions=12) as provider,
        openai.AsyncOpenAI(
            base_url=provider.openai_base_url, api_key=API_KEY, max_retries=0
        ) as client,
    ):
        by_default = await client.embeddings.create(model=model, input=["alpha", "beta"])
        as_floats = await client.embeddings.create(
            model=model, input="alpha", encoding_format="float"
        )
        shorter = await client.embeddings.create(model=model, input="alpha", dimensions=5)
        requests = provider.requests

    assert [item.index for item in by_default.data] == [0, 1]
    alpha, beta = (item.embedding for item in by_default.data)
    assert len(alpha) == 12
    assert alpha == embedding_vector("alpha", 12, model)
    assert beta == embedding_vector("beta", 12, model)
    assert alpha != beta
    assert as_floats.data[0].embedding == alpha
    assert math.isclose(math.fsum(v * v for v in alpha), 1.0, rel_tol=1e-5)
    assert len(shorter.data[0].embedding) == 5
    assert by_default.usage.prompt_tokens > 0
    assert requests[0].body["encoding_format"] == "base64"
    assert requests[0].endpoint is Endpoint.OPENAI_EMBEDDINGS


async def test_embeddings_take_only_steps_aimed_at_them(
    scripted_provider: ScriptedProvider, openai_client: openai.AsyncOpenAI
) -> None:
    scripted_provider.enqueue(HttpError(500))
    scripted_provider.enqueue(HttpError(429), endpoint=Endpoint.OPENAI_EMBEDDINGS)

    with pytest.raises(openai.RateLimitError):
        await openai_client.embeddings.create(model="text-embedding-3-small", input="x")
    result = await openai_client.embeddings.create(model="text-embedding-3-small", input="x")

    assert len(result.data[0].embedding) == scripted_provider.embedding_dimensions
    assert scripted_provider.pending == 1


async def test_models_lists_in_both_formats(
    scripted_provider: ScriptedProvider,
    anthropic_client: anthropic.AsyncAnthropic,
    openai_client: openai.AsyncOpenAI,
) -> None:
    openai_ids = [model.id async for model in openai_client.models.list()]
    anthropic_ids = [model.id async for model in anthropic_client.models.list()]

    assert openai_ids == list(scripted_provider.models)
    assert anthropic_ids == list(scripted_provider.models)
    assert [r.endpoint for r in scripted_provider.requests] == [
        Endpoint.OPENAI_MODELS,
        Endpoint.ANTHROPIC_MODELS,
    ]


async def test_anthropic_count_tokens(
    scripted_provider: ScriptedProvider, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    short = await anthropic_client.messages.count_tokens(model=CLAUDE, messages=ANTHROPIC_PROMPT)
    longer = await anthropic_client.messages.count_tokens(
        model=CLAUDE, messages=[{"role": "user", "content": "word " * 200}]
    )

    assert 0 < short.input_tokens < longer.input_tokens
    assert scripted_provider.requests[0].endpoint is Endpoint.ANTHROPIC_COUNT_TOKENS


@pytest.mark.parametrize(
    ("ask", "error_class"),
    [
        pytest.param(ask_anthropic, anthropic.AuthenticationError, id="anthropic"),
        pytest.param(ask_openai, openai.AuthenticationError, id="openai"),
    ],
)
async def test_api_key_is_checked_when_configured(ask: Ask, error_class: type[Exception]) -> None:
    async with ScriptedProvider(api_key="sk-right") as provider:
        provider.enqueue(TextReply("kept for the right key"))

        with pytest.raises(error_class) as caught:
            await ask(provider, api_key="sk-wrong")
        answer = await ask(provider, api_key="sk-right")

    assert answer == "kept for the right key"
    error = caught.value
    assert isinstance(error, anthropic.APIStatusError | openai.APIStatusError)
    assert error.status_code == 401
    assert error.type in ("authentication_error", "invalid_request_error")
    assert [r.step for r in provider.requests] == [None, TextReply("kept for the right key")]


async def test_malformed_request_gets_a_provider_error(
    scripted_provider: ScriptedProvider,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{scripted_provider.openai_base_url}/chat/completions", json={"model": GPT}
        ) as response:
            openai_status, openai_body = response.status, await response.json()
        async with session.post(
            f"{scripted_provider.anthropic_base_url}/v1/messages", data=b"{not json"
        ) as response:
            anthropic_status, anthropic_body = response.status, await response.json()

    assert openai_status == 400
    assert openai_body["error"]["message"] == "messages: Field required"
    assert openai_body["error"]["type"] == "invalid_request_error"
    assert anthropic_status == 400
    assert anthropic_body["type"] == "error"
    assert anthropic_body["error"]["type"] == "invalid_request_error"
    assert scripted_provider.requests[1].body == "{not json"
    assert scripted_provider.pending == 0


# Script files and the process mode

ALL_STEPS: list[Step] = [
    TextReply("hi", usage=CACHED_USAGE, truncated=True, delta_interval=0.5),
    ToolCallsReply((ToolCall("f", {"a": [1]}, id="x"), ToolCall("g")), text="t"),
    HttpError(429, retry_after=1.5, retry_after_ms=20, should_retry=True, headers={"a": "b"}),
    HttpError.insufficient_quota(),
    MidStreamFailure(TextReply("a b"), after_deltas=1, mode="close", error=HttpError(500)),
    ConnectionReset(),
    Hang(),
    Delay(1.0),
    Delay(0.5, HttpError(503)),
]


@pytest.mark.parametrize("step", ALL_STEPS)
def test_steps_round_trip_through_json(step: Step) -> None:
    assert step_from_dict(json.loads(json.dumps(step_to_dict(step)))) == step


@pytest.mark.parametrize(
    "data",
    [
        {"kind": "nonsense"},
        {"kind": "text"},
        {"kind": "http_error", "status": 200},
        {"kind": "tool_calls", "calls": []},
        {"kind": "delay", "seconds": -1},
        {"kind": "text", "text": "x", "usage": {"input_tokens": True}},
        {"kind": "mid_stream_failure", "reply": {"kind": "hang"}},
    ],
)
def test_malformed_steps_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ScriptError):
        step_from_dict(data)


async def test_process_mode_serves_a_script(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            {
                "default": {"kind": "text", "text": "default answer"},
                "steps": [
                    {"kind": "text", "text": "scripted", "endpoint": "openai.chat_completions"}
                ],
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "foredeck_testing.provider",
        "--port",
        "0",
        "--script",
        str(script),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            url = (await process.stdout.readline()).decode().strip()
        assert url.startswith("http://127.0.0.1:")

        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=API_KEY, max_retries=0
        ) as openai_sdk:
            completion = await openai_sdk.chat.completions.create(model=GPT, messages=OPENAI_PROMPT)
        async with aiohttp.ClientSession() as session:
            added = {"steps": [{"kind": "http_error", "status": 529}]}
            async with session.post(f"{url}/_scripted/steps", json=added) as response:
                assert response.status == 200
            async with anthropic.AsyncAnthropic(
                base_url=url, api_key=API_KEY, max_retries=0
            ) as anthropic_sdk:
                with pytest.raises(anthropic.OverloadedError):
                    await anthropic_sdk.messages.create(
                        model=CLAUDE, max_tokens=8, messages=ANTHROPIC_PROMPT
                    )
                message = await anthropic_sdk.messages.create(
                    model=CLAUDE, max_tokens=8, messages=ANTHROPIC_PROMPT
                )
            async with session.get(f"{url}/_scripted/requests") as response:
                recorded = (await response.json())["requests"]
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(10):
            await process.wait()

    assert completion.choices[0].message.content == "scripted"
    assert text_of(message) == "default answer"
    assert [r["endpoint"] for r in recorded] == [
        "openai.chat_completions",
        "anthropic.messages",
        "anthropic.messages",
    ]
    assert recorded[1]["step"]["status"] == 529
    assert process.returncode == 0
