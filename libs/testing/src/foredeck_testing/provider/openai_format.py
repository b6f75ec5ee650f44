"""OpenAI Chat Completions wire format, plus `/v1/models` and `/v1/embeddings`."""

from __future__ import annotations

import base64
import hashlib
import http
import json
import math
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

from foredeck_testing.provider._common import (
    Phase,
    SseEvent,
    arguments_json,
    estimate_tokens,
    random_id,
    split_fragments,
    split_words,
    sse,
)
from foredeck_testing.provider.steps import HttpError, Reply, TextReply, ToolCallsReply

REQUEST_ID_HEADER = "x-request-id"
SYSTEM_FINGERPRINT = "fp_scripted"

_MESSAGES = {
    401: "Incorrect API key provided.",
    429: "Rate limit reached for requests. Please try again later.",
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The server is overloaded or not ready yet.",
}


def new_request_id() -> str:
    """A request id in OpenAI's `req_...` form."""
    return random_id("req_", 32)


def error_type(status: int) -> str:
    """The `error.type` OpenAI sends with an HTTP status."""
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


def _default_code(status: int) -> str | None:
    return {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)


def error_detail(error: HttpError) -> dict[str, Any]:
    """The inner `error` object: message, type, param and code."""
    message = error.message or _MESSAGES.get(error.status)
    if message is None:
        try:
            message = http.HTTPStatus(error.status).phrase
        except ValueError:
            message = f"Error {error.status}"
    return {
        "message": message,
        "type": error.error_type or error_type(error.status),
        "param": None,
        "code": error.code if error.code is not None else _default_code(error.status),
    }


def error_body(error: HttpError, request_id: str) -> dict[str, Any]:
    """The JSON body of an OpenAI error: `{"error": {"message", "type", "param", "code"}}`."""
    del request_id  # OpenAI carries it only in the x-request-id header.
    return {"error": error_detail(error)}


def stream_error(error: HttpError, request_id: str) -> SseEvent:
    """The `data: {"error": ...}` event OpenAI sends when a stream fails after it started."""
    return sse(error_body(error, request_id), "tail")


def _usage(reply: Reply) -> dict[str, Any]:
    usage = reply.usage
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read_input_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _finish_reason(reply: Reply) -> str:
    if isinstance(reply, ToolCallsReply):
        return "tool_calls"
    return "length" if reply.truncated else "stop"


def _tool_ids(reply: Reply) -> list[str]:
    if isinstance(reply, TextReply):
        return []
    return [call.id or random_id("call_", 24) for call in reply.calls]


def reply_body(reply: Reply, model: str) -> dict[str, Any]:
    """The JSON body of a non-streamed chat completion."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text or None,
        "refusal": None,
        "annotations": [],
    }
    if isinstance(reply, ToolCallsReply):
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": arguments_json(call.arguments)},
            }
            for call, call_id in zip(reply.calls, _tool_ids(reply), strict=True)
        ]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": _finish_reason(reply),
    }
    return {
        "id": random_id("chatcmpl-", 29),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(reply),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def stream_events(reply: Reply, model: str, request: Mapping[str, Any]) -> list[SseEvent]:
    """The SSE chunks of a streamed chat completion, ending with `data: [DONE]`.

    With `stream_options.include_usage`, every chunk carries `"usage": null` and a last chunk
    with no choices carries the usage, as the API does.
    """
    options = request.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    completion_id = random_id("chatcmpl-", 29)
    created = int(time.time())

    def chunk(delta: Mapping[str, Any], phase: Phase, finish_reason: str | None = None) -> SseEvent:
        choice = {
            "index": 0,
            "delta": dict(delta),
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [choice],
        }
        if include_usage:
            body["usage"] = None
        return sse(body, phase)

    events = [chunk({"role": "assistant", "content": "", "refusal": None}, "frame")]
    events += [chunk({"content": word}, "delta") for word in split_words(reply.text)]
    if isinstance(reply, ToolCallsReply):
        for index, (call, call_id) in enumerate(zip(reply.calls, _tool_ids(reply), strict=True)):
            opening = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            events.append(chunk({"tool_calls": [opening]}, "frame"))
            fragments = split_fragments(arguments_json(call.arguments), reply.argument_fragment)
            events += [
                chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}, "delta"
                )
                for fragment in fragments
            ]
    events.append(chunk({}, "tail", _finish_reason(reply)))
    if include_usage:
        last = json.loads(chunk({}, "tail").data)
        last["choices"] = []
        last["usage"] = _usage(reply)
        events.append(sse(last, "tail"))
    events.append(SseEvent("[DONE]", "tail"))
    return events


def models_body(models: Sequence[str]) -> dict[str, Any]:
    """An OpenAI `GET /v1/models` list."""
    data = [
        {"id": model, "object": "model", "created": 1735689600, "owned_by": "foredeck"}
        for model in models
    ]
    return {"object": "list", "data": data}


def embedding_vector(text: str, dimensions: int, model: str = "") -> list[float]:
    """A deterministic unit vector derived from a hash of `model` and `text`.

    The vectors carry no meaning: similar texts are not close. They are rounded to float32 so
    that the `float` and `base64` encodings give the same numbers.
    """
    if dimensions < 1:
        raise ValueError("dimensions must be positive")
    values: list[float] = []
    block = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{model}\x00{block}\x00{text}".encode()).digest()
        values += [n / 2**31 - 1.0 for n in struct.unpack("<8I", digest)]
        block += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _inputs(raw: Any) -> list[str]:
    """The texts of an embeddings `input`: a string, strings, token ids or lists of them."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(item, int) for item in raw):
        return [json.dumps(raw)]
    if isinstance(raw, list) and raw:
        return [item if isinstance(item, str) else json.dumps(item) for item in raw]
    raise ValueError("'input' must be a non-empty string, array of strings or array of tokens")


def embeddings_body(request: Mapping[str, Any], default_dimensions: int) -> dict[str, Any]:
    """A `/v1/embeddings` answer with hash-derived vectors; raises ValueError on bad input."""
    model = str(request.get("model", ""))
    texts = _inputs(request.get("input"))
    dimensions = request.get("dimensions")
    if dimensions is None:
        dimensions = default_dimensions
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        raise ValueError("'dimensions' must be a positive integer")
    as_base64 = request.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vector = embedding_vector(text, dimensions, model)
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(estimate_tokens(text) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
