"""Anthropic Messages API wire format: JSON bodies, SSE events and error bodies."""

from __future__ import annotations

import datetime
import http
from collections.abc import Mapping, Sequence
from typing import Any

from foredeck_testing.provider._common import (
    SseEvent,
    arguments_json,
    estimate_tokens,
    random_id,
    split_fragments,
    split_words,
    sse,
)
from foredeck_testing.provider.steps import HttpError, Reply, TextReply, ToolCallsReply

REQUEST_ID_HEADER = "request-id"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_MESSAGES = {
    401: "invalid x-api-key",
    429: "This request would exceed the rate limit for your organization. Please try again later.",
    500: "Internal server error",
    529: "Overloaded",
}


def new_request_id() -> str:
    """A request id in Anthropic's `req_...` form."""
    return random_id("req_011", 21)


def error_type(status: int) -> str:
    """The `error.type` Anthropic sends with an HTTP status."""
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(error: HttpError, request_id: str) -> dict[str, Any]:
    """The JSON body of an Anthropic error: `{"type": "error", "error": {...}, "request_id"}`."""
    detail: dict[str, Any] = {
        "type": error.error_type or error_type(error.status),
        "message": error.message or _default_message(error.status),
    }
    if error.code is not None:
        detail["details"] = {"error_code": error.code}
    return {"type": "error", "error": detail, "request_id": request_id}


def _default_message(status: int) -> str:
    if status in _MESSAGES:
        return _MESSAGES[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"Error {status}"


def _usage(reply: Reply) -> dict[str, Any]:
    usage = reply.usage
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "output_tokens": usage.output_tokens,
        "service_tier": "standard",
    }


def _stop_reason(reply: Reply) -> str:
    if isinstance(reply, ToolCallsReply):
        return "tool_use"
    return "max_tokens" if reply.truncated else "end_turn"


def _tool_ids(reply: Reply) -> list[str]:
    if isinstance(reply, TextReply):
        return []
    return [call.id or random_id("toolu_01", 22) for call in reply.calls]


def _message(reply: Reply, model: str, content: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "id": random_id("msg_01", 22),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": list(content),
        "stop_reason": _stop_reason(reply),
        "stop_sequence": None,
        "usage": _usage(reply),
    }


def reply_body(reply: Reply, model: str) -> dict[str, Any]:
    """The JSON body of a non-streamed Messages reply."""
    text = reply.text
    content: list[dict[str, Any]] = []
    if text:
        content.append({"type": "text", "text": text})
    if isinstance(reply, ToolCallsReply):
        for call, call_id in zip(reply.calls, _tool_ids(reply), strict=True):
            content.append(
                {
                    "type": "tool_use",
                    "id": call_id,
                    "name": call.name,
                    "input": dict(call.arguments),
                }
            )
    return _message(reply, model, content)


def stream_events(reply: Reply, model: str) -> list[SseEvent]:
    """The SSE events of a streamed Messages reply, in the order the API sends them."""
    start = _message(reply, model, [])
    start["stop_reason"] = None
    start["usage"] = {**start["usage"], "output_tokens": 1}
    events = [sse({"type": "message_start", "message": start}, "frame", "message_start")]
    index = 0
    if reply.text or isinstance(reply, TextReply):
        text_block = {"type": "text", "text": ""}
        events += _block(index, text_block, "text_delta", "text", split_words(reply.text))
        index += 1
    if isinstance(reply, ToolCallsReply):
        for call, call_id in zip(reply.calls, _tool_ids(reply), strict=True):
            block = {"type": "tool_use", "id": call_id, "name": call.name, "input": {}}
            fragments = split_fragments(arguments_json(call.arguments), reply.argument_fragment)
            events += _block(index, block, "input_json_delta", "partial_json", fragments)
            index += 1
    # The API pings right after the first block opens; SDKs must skip it.
    events.insert(2, sse({"type": "ping"}, "frame", "ping"))
    usage = _usage(reply)
    del usage["service_tier"]
    delta = {"stop_reason": _stop_reason(reply), "stop_sequence": None}
    events.append(
        sse({"type": "message_delta", "delta": delta, "usage": usage}, "tail", "message_delta")
    )
    events.append(sse({"type": "message_stop"}, "tail", "message_stop"))
    return events


def _block(
    index: int, block: Mapping[str, Any], delta_type: str, field: str, pieces: Sequence[str]
) -> list[SseEvent]:
    events = [
        sse(
            {"type": "content_block_start", "index": index, "content_block": dict(block)},
            "frame",
            "content_block_start",
        )
    ]
    for piece in pieces:
        delta = {"type": delta_type, field: piece}
        events.append(
            sse(
                {"type": "content_block_delta", "index": index, "delta": delta},
                "delta",
                "content_block_delta",
            )
        )
    events.append(
        sse({"type": "content_block_stop", "index": index}, "frame", "content_block_stop")
    )
    return events


def stream_error(error: HttpError, request_id: str) -> SseEvent:
    """The `event: error` Anthropic sends when a stream fails after it started."""
    return sse(error_body(error, request_id), "tail", "error")


def count_tokens_body(request: Mapping[str, Any]) -> dict[str, Any]:
    """A `count_tokens` answer: a rough estimate from the size of the prompt."""
    prompt = {key: request.get(key) for key in ("system", "messages", "tools")}
    return {"input_tokens": estimate_tokens(prompt)}


def models_body(models: Sequence[str]) -> dict[str, Any]:
    """An Anthropic `GET /v1/models` page listing `models`."""
    created = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC).isoformat().replace("+00:00", "Z")
    data = [
        {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": created,
            "lifecycle": "active",
        }
        for model in models
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": models[0] if models else None,
        "last_id": models[-1] if models else None,
    }
