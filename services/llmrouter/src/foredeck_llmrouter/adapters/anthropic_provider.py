"""Anthropic Messages API through the official `anthropic` SDK.

The SDK's own retries are off (``max_retries=0``): the router retries, so attempt counts and
fallback follow one policy. Tool call ids pass through unchanged in both directions, and the
streamed ``input_json_delta`` fragments are forwarded as they arrive.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic

from foredeck_llmrouter.adapters.sdk_errors import CLASSIFIED, failure_from_exception
from foredeck_llmrouter.domain.model import (
    Completion,
    FinishReason,
    Image,
    Message,
    OutputFormat,
    ProviderCall,
    ProviderEvent,
    Role,
    StreamEnd,
    StreamStart,
    Text,
    TextChunk,
    ToolArgumentsChunk,
    ToolCall,
    ToolCallBegin,
    ToolCallEnd,
    ToolChoiceMode,
    ToolResult,
    Usage,
    UsageUpdate,
)

_FINISH = {
    "end_turn": FinishReason.STOP,
    "max_tokens": FinishReason.MAX_TOKENS,
    "stop_sequence": FinishReason.STOP_SEQUENCE,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}


def to_anthropic_messages(messages: tuple[Message, ...]) -> tuple[list[str], list[dict[str, Any]]]:
    """(extra system texts, messages) in the Messages API's shape.

    Tool results travel as ``tool_result`` blocks in a user turn; consecutive turns of the same
    role are merged because the API wants user and assistant to alternate.
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role is Role.SYSTEM:
            system.extend(p.text for p in message.parts if isinstance(p, Text))
            continue
        role = "assistant" if message.role is Role.ASSISTANT else "user"
        blocks: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, Text):
                blocks.append({"type": "text", "text": part.text})
            elif isinstance(part, Image):
                source: dict[str, Any] = (
                    {"type": "url", "url": part.url}
                    if part.url
                    else {
                        "type": "base64",
                        "media_type": part.media_type,
                        "data": base64.b64encode(part.data).decode(),
                    }
                )
                blocks.append({"type": "image", "source": source})
            elif isinstance(part, ToolCall):
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": part.call_id,
                        "name": part.name,
                        "input": json.loads(part.arguments_json or "{}"),
                    }
                )
            elif isinstance(part, ToolResult):
                block: dict[str, Any] = {
                    "type": "tool_result",
                    "tool_use_id": part.call_id,
                    "content": part.content,
                }
                if part.is_error:
                    block["is_error"] = True
                blocks.append(block)
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return system, out


def build_params(call: ProviderCall) -> dict[str, Any]:
    """The keyword arguments of ``messages.create`` for one call."""
    request = call.request
    extra_system, messages = to_anthropic_messages(request.messages)
    params: dict[str, Any] = {
        "model": call.provider_model,
        "max_tokens": call.max_output_tokens,
        "messages": messages,
    }
    system_texts = [t for t in (request.system_prompt, *extra_system) if t]
    if system_texts:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": t} for t in system_texts]
        if request.cache_prompt:
            blocks[-1]["cache_control"] = {"type": "ephemeral"}
        params["system"] = blocks
    if request.tools:
        tools: list[dict[str, Any]] = [
            {"name": t.name, "description": t.description, "input_schema": t.parameters}
            for t in request.tools
        ]
        if request.cache_prompt:
            tools[-1]["cache_control"] = {"type": "ephemeral"}
        params["tools"] = tools
        choice = request.tool_choice
        tool_choice: dict[str, Any] = {
            ToolChoiceMode.AUTO: {"type": "auto"},
            ToolChoiceMode.NONE: {"type": "none"},
            ToolChoiceMode.REQUIRED: {"type": "any"},
            ToolChoiceMode.TOOL: {"type": "tool", "name": choice.name},
        }[choice.mode]
        if not request.parallel_tool_calls and choice.mode is not ToolChoiceMode.NONE:
            tool_choice["disable_parallel_tool_use"] = True
        params["tool_choice"] = tool_choice
    # The Messages API of this SDK generation takes no temperature, top_p or top_k; the
    # contract says a provider without a parameter ignores it.
    sampling = request.sampling
    fmt = request.response_format
    if fmt.kind is OutputFormat.JSON_SCHEMA and fmt.schema is not None:
        params["output_config"] = {"format": {"type": "json_schema", "schema": fmt.schema}}
    elif fmt.kind is OutputFormat.JSON_OBJECT:
        params["output_config"] = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    if sampling.stop_sequences:
        params["stop_sequences"] = list(sampling.stop_sequences)
    return params


def _usage(raw: Any) -> Usage:
    return Usage(
        input_tokens=getattr(raw, "input_tokens", 0) or 0,
        output_tokens=getattr(raw, "output_tokens", 0) or 0,
        cache_read_input_tokens=getattr(raw, "cache_read_input_tokens", 0) or 0,
        cache_creation_input_tokens=getattr(raw, "cache_creation_input_tokens", 0) or 0,
    )


class AnthropicProvider:
    """`ChatProvider` for the Anthropic Messages API."""

    def __init__(self, client: anthropic.AsyncAnthropic) -> None:
        self._client = client

    async def complete(self, call: ProviderCall) -> Completion:
        """One non-streaming ``messages.create``."""
        try:
            message = await self._client.messages.create(**build_params(call), timeout=call.timeout)
            parts: list[Text | ToolCall] = []
            for block in message.content:
                if block.type == "text":
                    parts.append(Text(block.text))
                elif block.type == "tool_use":
                    arguments = json.dumps(block.input, separators=(",", ":"), ensure_ascii=False)
                    parts.append(ToolCall(block.id, block.name, arguments))
            return Completion(
                parts=parts,
                finish_reason=_FINISH.get(message.stop_reason or "", FinishReason.OTHER),
                usage=_usage(message.usage),
                provider_response_id=message.id,
                matched_stop_sequence=message.stop_sequence or "",
            )
        except CLASSIFIED as error:
            raise failure_from_exception(error) from None

    async def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """A streaming ``messages.create``, as provider events."""
        stream: Any = None
        try:
            stream = await self._client.messages.create(
                **build_params(call), stream=True, timeout=call.timeout
            )
            usage = Usage()
            async for event in stream:
                kind = event.type
                if kind == "message_start":
                    usage = _usage(event.message.usage)
                    yield StreamStart(event.message.id)
                    yield UsageUpdate(usage)
                elif kind == "content_block_start":
                    block = event.content_block
                    if block.type == "tool_use":
                        yield ToolCallBegin(event.index, block.id, block.name)
                    elif block.type == "text" and block.text:
                        yield TextChunk(block.text)
                elif kind == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta":
                        yield TextChunk(delta.text)
                    elif delta.type == "input_json_delta":
                        yield ToolArgumentsChunk(event.index, delta.partial_json)
                elif kind == "content_block_stop":
                    yield ToolCallEnd(event.index)
                elif kind == "message_delta":
                    update = _usage(event.usage)
                    usage = Usage(
                        update.input_tokens or usage.input_tokens,
                        update.output_tokens or usage.output_tokens,
                        update.cache_read_input_tokens or usage.cache_read_input_tokens,
                        update.cache_creation_input_tokens or usage.cache_creation_input_tokens,
                    )
                    yield UsageUpdate(usage)
                    if event.delta.stop_reason:
                        yield StreamEnd(
                            _FINISH.get(event.delta.stop_reason, FinishReason.OTHER),
                            event.delta.stop_sequence or "",
                        )
                        return
        except CLASSIFIED as error:
            raise failure_from_exception(error) from None
        finally:
            if stream is not None:
                await stream.close()
