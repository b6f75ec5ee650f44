"""JSON form of script steps, for script files and the control endpoint of a running server.

A step is an object with a `kind` (`text`, `tool_calls`, `http_error`, `mid_stream_failure`,
`connection_reset`, `hang`, `delay`) and the fields of its dataclass; a queued step may also
carry `endpoint` and `model`. A script file is `{"default": step, "steps": [step, ...]}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from foredeck_testing.provider.steps import (
    ConnectionReset,
    Delay,
    Endpoint,
    Hang,
    HttpError,
    MidStreamFailure,
    Reply,
    Step,
    TextReply,
    ToolCall,
    ToolCallsReply,
    Usage,
)


@dataclass(frozen=True)
class QueuedStep:
    """A step waiting in the queue, with the endpoint and model it is aimed at (None: any)."""

    step: Step
    endpoint: Endpoint | None = None
    model: str | None = None

    def matches(self, endpoint: Endpoint, model: str | None) -> bool:
        """Whether this step answers a request to `endpoint` for `model`.

        An untargeted step only answers the endpoints that generate output; embeddings,
        models and token counts take only steps aimed at them.
        """
        if self.endpoint is None and not endpoint.generates:
            return False
        if self.endpoint is not None and self.endpoint != endpoint:
            return False
        return self.model is None or self.model == model


@dataclass(frozen=True)
class Script:
    """The content of a script file: an optional default step and the initial queue."""

    default: Step | None = None
    steps: tuple[QueuedStep, ...] = field(default_factory=tuple)


class ScriptError(ValueError):
    """A script or step in JSON form is malformed."""


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ScriptError(f"{what} must be a JSON object")
    return cast(Mapping[str, Any], value)


def _optional(data: Mapping[str, Any], key: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    value = data.get(key)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; a flag where a count is expected is a typo, not a number.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ScriptError(f"{key!r} has the wrong type: {value!r}")
    return value


def _usage(data: Mapping[str, Any]) -> Usage:
    raw = _object(data.get("usage", {}), "'usage'")
    counts = {}
    for key in (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ):
        value = _optional(raw, key, int)
        if value is not None:
            counts[key] = value
    return Usage(**counts)


def _number(data: Mapping[str, Any], key: str, default: float) -> float:
    value = _optional(data, key, (int, float))
    return float(value) if value is not None else default


def _reply(data: Mapping[str, Any]) -> Reply:
    kind = data.get("kind")
    if kind == "text":
        text = data.get("text")
        if not isinstance(text, str):
            raise ScriptError("a text step needs a string 'text'")
        return TextReply(
            text,
            usage=_usage(data),
            truncated=bool(_optional(data, "truncated", bool)),
            delta_interval=_number(data, "delta_interval", 0.0),
        )
    if kind == "tool_calls":
        raw_calls = data.get("calls")
        if not isinstance(raw_calls, list) or not raw_calls:
            raise ScriptError("a tool_calls step needs a non-empty 'calls' array")
        calls = []
        for raw in raw_calls:
            call = _object(raw, "a tool call")
            name = call.get("name")
            if not isinstance(name, str):
                raise ScriptError("a tool call needs a string 'name'")
            arguments = _object(call.get("arguments", {}), "'arguments'")
            calls.append(ToolCall(name, dict(arguments), id=_optional(call, "id", str)))
        fragment = _optional(data, "argument_fragment", int)
        return ToolCallsReply(
            tuple(calls),
            text=_optional(data, "text", str) or "",
            usage=_usage(data),
            delta_interval=_number(data, "delta_interval", 0.0),
            argument_fragment=fragment if fragment is not None else 12,
        )
    raise ScriptError(f"expected a text or tool_calls reply, got kind {kind!r}")


def _http_error(data: Mapping[str, Any]) -> HttpError:
    status = data.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        raise ScriptError("an http_error step needs an integer 'status' from 400 to 599")
    headers = _object(data.get("headers", {}), "'headers'")
    retry_after_ms = _optional(data, "retry_after_ms", (int, float))
    retry_after = _optional(data, "retry_after", (int, float))
    return HttpError(
        status,
        message=_optional(data, "message", str),
        error_type=_optional(data, "error_type", str),
        code=_optional(data, "code", str),
        retry_after=float(retry_after) if retry_after is not None else None,
        retry_after_ms=float(retry_after_ms) if retry_after_ms is not None else None,
        should_retry=_optional(data, "should_retry", bool),
        headers={str(key): str(value) for key, value in headers.items()},
    )


def step_from_dict(data: Mapping[str, Any]) -> Step:
    """Build a step from its JSON form; raises ScriptError when it is malformed."""
    data = _object(data, "a step")
    kind = data.get("kind")
    if kind in ("text", "tool_calls"):
        return _reply(data)
    if kind == "http_error":
        return _http_error(data)
    if kind == "mid_stream_failure":
        mode = data.get("mode", "error")
        if mode not in ("error", "close", "hang"):
            raise ScriptError("'mode' must be 'error', 'close' or 'hang'")
        after = _optional(data, "after_deltas", int)
        error = data.get("error")
        return MidStreamFailure(
            _reply(_object(data.get("reply"), "'reply'")),
            after_deltas=after if after is not None else 1,
            mode=mode,
            error=_http_error(_object(error, "'error'")) if error is not None else HttpError(529),
        )
    if kind == "connection_reset":
        return ConnectionReset()
    if kind == "hang":
        return Hang()
    if kind == "delay":
        seconds = _optional(data, "seconds", (int, float))
        if seconds is None or seconds < 0:
            raise ScriptError("a delay step needs a non-negative 'seconds'")
        then = data.get("then")
        return Delay(float(seconds), step_from_dict(then) if then is not None else None)
    raise ScriptError(f"unknown step kind {kind!r}")


def _usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
    }


def step_to_dict(step: Step) -> dict[str, Any]:
    """The JSON form of a step, which `step_from_dict` turns back into an equal step."""
    match step:
        case TextReply():
            return {
                "kind": "text",
                "text": step.text,
                "usage": _usage_dict(step.usage),
                "truncated": step.truncated,
                "delta_interval": step.delta_interval,
            }
        case ToolCallsReply():
            calls = [
                {"name": call.name, "arguments": dict(call.arguments), "id": call.id}
                for call in step.calls
            ]
            return {
                "kind": "tool_calls",
                "calls": calls,
                "text": step.text,
                "usage": _usage_dict(step.usage),
                "delta_interval": step.delta_interval,
                "argument_fragment": step.argument_fragment,
            }
        case HttpError():
            return {
                "kind": "http_error",
                "status": step.status,
                "message": step.message,
                "error_type": step.error_type,
                "code": step.code,
                "retry_after": step.retry_after,
                "retry_after_ms": step.retry_after_ms,
                "should_retry": step.should_retry,
                "headers": dict(step.headers),
            }
        case MidStreamFailure():
            return {
                "kind": "mid_stream_failure",
                "reply": step_to_dict(step.reply),
                "after_deltas": step.after_deltas,
                "mode": step.mode,
                "error": step_to_dict(step.error),
            }
        case ConnectionReset():
            return {"kind": "connection_reset"}
        case Hang():
            return {"kind": "hang"}
        case Delay():
            then = step_to_dict(step.then) if step.then is not None else None
            return {"kind": "delay", "seconds": step.seconds, "then": then}


def queued_from_dict(data: Mapping[str, Any]) -> QueuedStep:
    """A queued step from its JSON form: a step with optional `endpoint` and `model`."""
    data = _object(data, "a step")
    endpoint = data.get("endpoint")
    try:
        target = Endpoint(endpoint) if endpoint is not None else None
    except ValueError:
        known = ", ".join(e.value for e in Endpoint)
        raise ScriptError(f"unknown endpoint {endpoint!r}; known: {known}") from None
    return QueuedStep(step_from_dict(data), target, _optional(data, "model", str))


def parse_script(data: Any) -> Script:
    """A script from its JSON form."""
    data = _object(data, "a script")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise ScriptError("'steps' must be an array")
    default = data.get("default")
    return Script(
        default=step_from_dict(default) if default is not None else None,
        steps=tuple(queued_from_dict(item) for item in steps),
    )


def load_script(path: str | Path) -> Script:
    """Read a script file (JSON)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ScriptError(f"{path}: not valid JSON: {error}") from error
    return parse_script(data)
