"""The router's own vocabulary: messages, tools, requests, completions and stream events.

These are plain dataclasses, independent of protobuf and of any provider's SDK, so the routing,
retry and accounting logic is written once and each adapter only translates.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.Enum):
    """Who wrote a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True)
class Text:
    """A text content part."""

    text: str


@dataclass(frozen=True)
class Image:
    """An image content part: inline bytes or a URL."""

    media_type: str
    data: bytes = b""
    url: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made; ``arguments_json`` is kept exactly as the provider sent it."""

    call_id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ToolResult:
    """The result of a tool call, sent back to the model in a tool message."""

    call_id: str
    content: str
    is_error: bool = False


Part = Text | Image | ToolCall | ToolResult


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: Role
    parts: tuple[Part, ...]
    name: str = ""


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call; ``parameters`` is a JSON Schema object (already parsed)."""

    name: str
    description: str
    parameters: dict[str, object]


class ToolChoiceMode(enum.Enum):
    """Whether and which tools the model must call."""

    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    TOOL = "tool"


@dataclass(frozen=True)
class ToolChoice:
    """The tool choice of a request; ``name`` is set for ``TOOL``."""

    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str = ""


class OutputFormat(enum.Enum):
    """The shape the output text must have."""

    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True)
class ResponseFormat:
    """The requested output format; ``schema`` is set for ``JSON_SCHEMA``."""

    kind: OutputFormat = OutputFormat.TEXT
    schema: dict[str, object] | None = None
    name: str = "response"


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; ``None`` leaves the provider's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_output_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A validated request for the next assistant message, independent of the model."""

    model: str
    messages: tuple[Message, ...]
    system_prompt: str = ""
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    sampling: Sampling = Sampling()
    response_format: ResponseFormat = ResponseFormat()
    fallback_models: tuple[str, ...] = ()
    disable_fallback: bool = False
    cache_prompt: bool = False
    parallel_tool_calls: bool = True


@dataclass(frozen=True)
class ProviderCall:
    """One request as sent to one provider: the chat request plus the resolved provider model."""

    request: ChatRequest
    provider_model: str
    max_output_tokens: int
    timeout: float
    """Seconds this attempt may take, already bounded by the caller's deadline."""


class FinishReason(enum.Enum):
    """Why the model stopped."""

    STOP = "stop"
    MAX_TOKENS = "max_tokens"
    STOP_SEQUENCE = "stop_sequence"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    OTHER = "other"


@dataclass
class Usage:
    """Tokens of one call, in Anthropic's terms: input excludes cached tokens."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd_micros: int = 0

    def add(self, other: Usage) -> None:
        """Accumulate another call's usage into this one."""
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cost_usd_micros += other.cost_usd_micros


@dataclass
class Completion:
    """A whole answer from a provider."""

    parts: list[Text | ToolCall]
    finish_reason: FinishReason
    usage: Usage
    provider_response_id: str = ""
    matched_stop_sequence: str = ""


# Stream events as adapters produce them. Tool calls are keyed by the provider's own index so
# that argument fragments find their call however the provider interleaves them.


@dataclass(frozen=True)
class TextChunk:
    """More text."""

    text: str


@dataclass(frozen=True)
class ToolCallBegin:
    """A new tool call, with its id and name."""

    key: int
    call_id: str
    name: str


@dataclass(frozen=True)
class ToolArgumentsChunk:
    """A fragment of a tool call's arguments JSON, exactly as the provider streamed it."""

    key: int
    fragment: str


@dataclass(frozen=True)
class ToolCallEnd:
    """The tool call's arguments are complete."""

    key: int


@dataclass(frozen=True)
class UsageUpdate:
    """Cumulative usage so far; later updates replace earlier ones field by field when set."""

    usage: Usage


@dataclass(frozen=True)
class StreamStart:
    """The provider accepted the request; carries its response id."""

    provider_response_id: str


@dataclass(frozen=True)
class StreamEnd:
    """The provider finished normally."""

    finish_reason: FinishReason
    matched_stop_sequence: str = ""


ProviderEvent = (
    TextChunk
    | ToolCallBegin
    | ToolArgumentsChunk
    | ToolCallEnd
    | UsageUpdate
    | StreamStart
    | StreamEnd
)


@dataclass
class EmbeddingResult:
    """Vectors for a batch of texts, in input order."""

    vectors: list[list[float]]
    usage: Usage = field(default_factory=Usage)
