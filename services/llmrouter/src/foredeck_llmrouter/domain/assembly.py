"""Turning a provider's event stream into numbered deltas and the message they build.

Each content part of the assistant message gets a ``part_index``: consecutive text extends one
text part, each tool call is a part of its own. Concatenating the deltas by index rebuilds the
message exactly, which is also how a stream cut short reports what was already sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from foredeck_llmrouter.domain.model import (
    FinishReason,
    Text,
    ToolArgumentsChunk,
    ToolCall,
    ToolCallBegin,
    Usage,
)


@dataclass(frozen=True)
class TextOut:
    """Text appended to part ``part_index``."""

    part_index: int
    text: str


@dataclass(frozen=True)
class ToolStartOut:
    """A tool call started as part ``part_index``."""

    part_index: int
    call_id: str
    name: str


@dataclass(frozen=True)
class ToolArgsOut:
    """A fragment of the arguments of the tool call at ``part_index``."""

    part_index: int
    call_id: str
    fragment: str


@dataclass
class _ToolBuild:
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    ended: bool = False


@dataclass
class Assembler:
    """Numbers a provider's deltas and accumulates the message they form."""

    _parts: list[list[str] | _ToolBuild] = field(default_factory=list)
    _text_open: bool = False
    _tools: dict[int, int] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)

    @property
    def has_output(self) -> bool:
        """Whether any content was produced."""
        return bool(self._parts)

    def text(self, chunk: str) -> TextOut:
        """Append text, to the open text part or a new one."""
        if not self._text_open:
            self._parts.append([])
            self._text_open = True
        part = self._parts[-1]
        assert isinstance(part, list)
        part.append(chunk)
        return TextOut(len(self._parts) - 1, chunk)

    def tool_begin(self, event: ToolCallBegin) -> ToolStartOut:
        """Start a tool call part."""
        self._text_open = False
        self._parts.append(_ToolBuild(event.call_id, event.name))
        index = len(self._parts) - 1
        self._tools[event.key] = index
        return ToolStartOut(index, event.call_id, event.name)

    def tool_arguments(self, event: ToolArgumentsChunk) -> ToolArgsOut | None:
        """Append an arguments fragment to the call the provider's key names."""
        index = self._tools.get(event.key)
        if index is None:
            return None
        build = self._parts[index]
        assert isinstance(build, _ToolBuild)
        build.arguments.append(event.fragment)
        return ToolArgsOut(index, build.call_id, event.fragment)

    def tool_end(self, key: int) -> None:
        """Mark a tool call's arguments complete."""
        index = self._tools.get(key)
        if index is not None:
            build = self._parts[index]
            assert isinstance(build, _ToolBuild)
            build.ended = True

    def end_all(self) -> None:
        """Mark every tool call complete (the provider finished normally)."""
        for part in self._parts:
            if isinstance(part, _ToolBuild):
                part.ended = True

    def message_parts(self) -> list[Text | ToolCall]:
        """The parts built so far; arguments of a call with none streamed are ``{}``."""
        out: list[Text | ToolCall] = []
        for part in self._parts:
            if isinstance(part, _ToolBuild):
                out.append(ToolCall(part.call_id, part.name, "".join(part.arguments) or "{}"))
            else:
                out.append(Text("".join(part)))
        return out

    def incomplete_tool_call_ids(self) -> list[str]:
        """Ids of tool calls whose arguments were still streaming."""
        return [p.call_id for p in self._parts if isinstance(p, _ToolBuild) and not p.ended]

    def update_usage(self, usage: Usage) -> None:
        """Take the latest cumulative usage; zero fields keep what was known."""
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ):
            value = getattr(usage, name)
            if value:
                setattr(self.usage, name, value)


def finish_for_parts(reason: FinishReason, parts: list[Text | ToolCall]) -> FinishReason:
    """A STOP with tool calls in the message is reported as TOOL_CALLS."""
    if reason is FinishReason.STOP and any(isinstance(p, ToolCall) for p in parts):
        return FinishReason.TOOL_CALLS
    return reason
