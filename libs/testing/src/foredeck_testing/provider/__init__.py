"""A scripted LLM provider server speaking the Anthropic and OpenAI wire formats.

Tests drive the real `anthropic` and `openai` SDKs against it: queue steps (replies, tool calls,
HTTP errors, broken streams, resets, delays, hangs), make calls, then assert on what the SDK
parsed and on the requests the server recorded. Run it in-process with `ScriptedProvider` or as
a process with `python -m foredeck_testing.provider`.
"""

from foredeck_testing.provider.openai_format import embedding_vector
from foredeck_testing.provider.script import (
    QueuedStep,
    Script,
    ScriptError,
    load_script,
    parse_script,
    step_from_dict,
    step_to_dict,
)
from foredeck_testing.provider.server import (
    DEFAULT_MODELS,
    DEFAULT_REPLY,
    RecordedRequest,
    ScriptedProvider,
)
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

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_REPLY",
    "ConnectionReset",
    "Delay",
    "Endpoint",
    "Hang",
    "HttpError",
    "MidStreamFailure",
    "QueuedStep",
    "RecordedRequest",
    "Reply",
    "Script",
    "ScriptError",
    "ScriptedProvider",
    "Step",
    "TextReply",
    "ToolCall",
    "ToolCallsReply",
    "Usage",
    "embedding_vector",
    "load_script",
    "parse_script",
    "step_from_dict",
    "step_to_dict",
]
