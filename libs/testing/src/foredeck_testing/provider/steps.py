"""Script steps: what the scripted provider does with one request.

Steps are provider-neutral; the Anthropic and OpenAI endpoints render the same step in their own
wire format, so one script can drive either SDK.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal, TypeAlias


class Endpoint(enum.StrEnum):
    """An HTTP endpoint of the scripted provider, used to aim a step at one API."""

    ANTHROPIC_MESSAGES = "anthropic.messages"
    ANTHROPIC_COUNT_TOKENS = "anthropic.count_tokens"
    ANTHROPIC_MODELS = "anthropic.models"
    OPENAI_CHAT_COMPLETIONS = "openai.chat_completions"
    OPENAI_EMBEDDINGS = "openai.embeddings"
    OPENAI_MODELS = "openai.models"

    @property
    def generates(self) -> bool:
        """Whether the endpoint produces model output, and so takes untargeted steps."""
        return self in (Endpoint.ANTHROPIC_MESSAGES, Endpoint.OPENAI_CHAT_COMPLETIONS)


@dataclass(frozen=True, kw_only=True)
class Usage:
    """Token usage of a reply, in Anthropic's terms.

    `input_tokens` excludes cached tokens, as Anthropic reports it; the OpenAI rendering adds
    both cache counts back into `prompt_tokens` and reports `cache_read_input_tokens` as
    `prompt_tokens_details.cached_tokens`.
    """

    input_tokens: int = 10
    output_tokens: int = 5
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(frozen=True)
class TextReply:
    """A successful reply made of text.

    Streamed, the text goes out one word (with its trailing whitespace) per delta, each delta
    preceded by `delta_interval` seconds. `truncated` reports the reply as cut by the token
    limit (`max_tokens` / `length`) rather than a natural stop.
    """

    text: str
    _: KW_ONLY
    usage: Usage = field(default_factory=Usage)
    truncated: bool = False
    delta_interval: float = 0.0


@dataclass(frozen=True)
class ToolCall:
    """One tool call in a reply; `id` defaults to a fresh provider-style id.

    Generated ids look like the provider's own: `toolu_...` for Anthropic, `call_...` for OpenAI.
    """

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    id: str | None = None


@dataclass(frozen=True)
class ToolCallsReply:
    """A successful reply that calls tools, optionally after some text.

    Streamed, `text` goes out word by word and each call's JSON arguments in fragments of
    `argument_fragment` characters, each fragment counting as one delta.
    """

    calls: tuple[ToolCall, ...]
    _: KW_ONLY
    text: str = ""
    usage: Usage = field(default_factory=Usage)
    delta_interval: float = 0.0
    argument_fragment: int = 12


Reply: TypeAlias = TextReply | ToolCallsReply


@dataclass(frozen=True)
class HttpError:
    """An HTTP error answer in the provider's error format.

    `error_type` and `message` default to what the provider sends for `status`; `code` is the
    OpenAI `error.code` (e.g. `insufficient_quota`) and Anthropic's `error.details.error_code`.
    `retry_after` (seconds), `retry_after_ms` and `should_retry` become the `retry-after`,
    `retry-after-ms` and `x-should-retry` headers the SDKs obey.
    """

    status: int
    _: KW_ONLY
    message: str | None = None
    error_type: str | None = None
    code: str | None = None
    retry_after: float | None = None
    retry_after_ms: float | None = None
    should_retry: bool | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def rate_limited(
        cls, *, retry_after: float | None = None, retry_after_ms: float | None = None
    ) -> HttpError:
        """A 429 rate limit, which the SDKs retry after the advertised delay."""
        return cls(429, retry_after=retry_after, retry_after_ms=retry_after_ms)

    @classmethod
    def insufficient_quota(cls) -> HttpError:
        """OpenAI's 429 for an exhausted quota: retrying does not help."""
        return cls(
            429,
            error_type="insufficient_quota",
            code="insufficient_quota",
            message="You exceeded your current quota, please check your plan and billing details.",
        )

    @classmethod
    def overloaded(cls) -> HttpError:
        """Anthropic's 529 overloaded answer."""
        return cls(529)


def _default_stream_error() -> HttpError:
    return HttpError(529)


@dataclass(frozen=True)
class MidStreamFailure:
    """A streamed reply that breaks after `after_deltas` content deltas.

    `mode` says how: `"error"` sends the provider's in-stream error event built from `error`
    (Anthropic `event: error`, OpenAI `data: {"error": ...}`), `"close"` closes the connection
    without finishing the body, `"hang"` stops sending until the client gives up. A request that
    did not ask to stream gets `error` as an HTTP error, half a body then a close, or a hang.
    """

    reply: Reply
    _: KW_ONLY
    after_deltas: int = 1
    mode: Literal["error", "close", "hang"] = "error"
    error: HttpError = field(default_factory=_default_stream_error)


@dataclass(frozen=True)
class ConnectionReset:
    """Reset the TCP connection (RST) before sending any response byte."""


@dataclass(frozen=True)
class Hang:
    """Never answer: hold the request until the client disconnects or the server closes."""


@dataclass(frozen=True)
class Delay:
    """Wait `seconds`, then carry out `then` (the server's default step when `None`).

    The wait ends early when the client disconnects, so a client timeout leaves nothing behind.
    """

    seconds: float
    then: Step | None = None


Step: TypeAlias = (
    TextReply | ToolCallsReply | HttpError | MidStreamFailure | ConnectionReset | Hang | Delay
)
