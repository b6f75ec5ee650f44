"""OpenAI Chat Completions and Embeddings through the official `openai` SDK.

The same adapter serves OpenAI itself and any OpenAI-compatible self-hosted server (vLLM,
Ollama, llama.cpp server) reached by base URL; ``compatible`` only changes which token limit
parameter is sent, since older servers know ``max_tokens`` and OpenAI's newer models only
``max_completion_tokens``.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai

from foredeck_llmrouter.adapters.sdk_errors import CLASSIFIED, failure_from_exception
from foredeck_llmrouter.domain.model import (
    Completion,
    EmbeddingResult,
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
    "stop": FinishReason.STOP,
    "length": FinishReason.MAX_TOKENS,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}


def to_openai_messages(system_prompt: str, messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Messages in the Chat Completions shape; each tool result becomes its own tool message."""
    out: list[dict[str, Any]] = []
    if system_prompt:
        out.append({"role": "system", "content": system_prompt})
    for message in messages:
        if message.role is Role.TOOL:
            for part in message.parts:
                if isinstance(part, ToolResult):
                    out.append(
                        {"role": "tool", "tool_call_id": part.call_id, "content": part.content}
                    )
            continue
        texts = [p.text for p in message.parts if isinstance(p, Text)]
        if message.role is Role.ASSISTANT:
            entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
            calls = [p for p in message.parts if isinstance(p, ToolCall)]
            if calls:
                entry["tool_calls"] = [
                    {
                        "id": c.call_id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments_json},
                    }
                    for c in calls
                ]
        else:
            role = "system" if message.role is Role.SYSTEM else "user"
            if any(isinstance(p, Image) for p in message.parts):
                content: list[dict[str, Any]] = []
                for part in message.parts:
                    if isinstance(part, Text):
                        content.append({"type": "text", "text": part.text})
                    elif isinstance(part, Image):
                        url = part.url or (
                            f"data:{part.media_type};base64," + base64.b64encode(part.data).decode()
                        )
                        content.append({"type": "image_url", "image_url": {"url": url}})
                entry = {"role": role, "content": content}
            else:
                entry = {"role": role, "content": "".join(texts)}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def build_params(call: ProviderCall, *, compatible: bool) -> dict[str, Any]:
    """The keyword arguments of ``chat.completions.create`` for one call."""
    request = call.request
    params: dict[str, Any] = {
        "model": call.provider_model,
        "messages": to_openai_messages(request.system_prompt, request.messages),
    }
    params["max_tokens" if compatible else "max_completion_tokens"] = call.max_output_tokens
    if request.tools:
        params["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
            for t in request.tools
        ]
        choice = request.tool_choice
        params["tool_choice"] = {
            ToolChoiceMode.AUTO: "auto",
            ToolChoiceMode.NONE: "none",
            ToolChoiceMode.REQUIRED: "required",
            ToolChoiceMode.TOOL: {"type": "function", "function": {"name": choice.name}},
        }[choice.mode]
        if not request.parallel_tool_calls:
            params["parallel_tool_calls"] = False
    fmt = request.response_format
    if fmt.kind is OutputFormat.JSON_OBJECT:
        params["response_format"] = {"type": "json_object"}
    elif fmt.kind is OutputFormat.JSON_SCHEMA:
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": fmt.schema},
        }
    sampling = request.sampling
    if sampling.temperature is not None:
        params["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        params["top_p"] = sampling.top_p
    if sampling.stop_sequences:
        params["stop"] = list(sampling.stop_sequences)
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    return params


def _usage(raw: Any) -> Usage:
    if raw is None:
        return Usage()
    prompt = raw.prompt_tokens or 0
    details = getattr(raw, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
    return Usage(
        input_tokens=prompt - cached,
        output_tokens=raw.completion_tokens or 0,
        cache_read_input_tokens=cached,
    )


class OpenAiProvider:
    """`ChatProvider` and `EmbeddingProvider` for OpenAI and OpenAI-compatible servers."""

    def __init__(self, client: openai.AsyncOpenAI, *, compatible: bool = False) -> None:
        self._client = client
        self._compatible = compatible

    async def complete(self, call: ProviderCall) -> Completion:
        """One non-streaming ``chat.completions.create``."""
        try:
            response = await self._client.chat.completions.create(
                **build_params(call, compatible=self._compatible), timeout=call.timeout
            )
            choice = response.choices[0]
            parts: list[Text | ToolCall] = []
            if choice.message.content:
                parts.append(Text(choice.message.content))
            for tool_call in choice.message.tool_calls or ():
                function = getattr(tool_call, "function", None)
                if function is None:
                    continue
                parts.append(ToolCall(tool_call.id, function.name, function.arguments))
            return Completion(
                parts=parts,
                finish_reason=_FINISH.get(choice.finish_reason or "", FinishReason.OTHER),
                usage=_usage(response.usage),
                provider_response_id=response.id,
            )
        except CLASSIFIED as error:
            raise failure_from_exception(error) from None

    async def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """A streaming ``chat.completions.create`` with usage, as provider events.

        Tool calls are keyed by the chunk's ``index``; a call's arguments are complete when the
        next call starts or the choice finishes.
        """
        stream: Any = None
        try:
            stream = await self._client.chat.completions.create(
                **build_params(call, compatible=self._compatible),
                stream=True,
                stream_options={"include_usage": True},
                timeout=call.timeout,
            )
            started = False
            open_calls: list[int] = []
            finish: FinishReason | None = None
            async for chunk in stream:
                if not started:
                    started = True
                    yield StreamStart(chunk.id)
                if chunk.usage is not None:
                    yield UsageUpdate(_usage(chunk.usage))
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta is not None and delta.content:
                        yield TextChunk(delta.content)
                    for tool_delta in (delta.tool_calls if delta is not None else None) or ():
                        key = tool_delta.index
                        function = tool_delta.function
                        if key not in open_calls:
                            for previous in open_calls:
                                yield ToolCallEnd(previous)
                            open_calls = [key]
                            yield ToolCallBegin(
                                key, tool_delta.id or "", (function.name if function else "") or ""
                            )
                        if function is not None and function.arguments:
                            yield ToolArgumentsChunk(key, function.arguments)
                    if choice.finish_reason:
                        for previous in open_calls:
                            yield ToolCallEnd(previous)
                        open_calls = []
                        finish = _FINISH.get(choice.finish_reason, FinishReason.OTHER)
            if finish is not None:
                yield StreamEnd(finish)
        except CLASSIFIED as error:
            raise failure_from_exception(error) from None
        finally:
            if stream is not None:
                await stream.close()

    async def embed(
        self, provider_model: str, texts: Sequence[str], dimensions: int, time_limit: float
    ) -> EmbeddingResult:
        """``embeddings.create`` as floats, in input order."""
        params: dict[str, Any] = {"model": provider_model, "input": list(texts)}
        if dimensions:
            params["dimensions"] = dimensions
        try:
            response = await self._client.embeddings.create(**params, timeout=time_limit)
        except CLASSIFIED as error:
            raise failure_from_exception(error) from None
        ordered = sorted(response.data, key=lambda d: d.index)
        vectors = [list(d.embedding) for d in ordered]
        usage = Usage(input_tokens=response.usage.prompt_tokens if response.usage else 0)
        return EmbeddingResult(vectors=vectors, usage=usage)
