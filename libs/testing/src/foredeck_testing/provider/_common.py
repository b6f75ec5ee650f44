"""Pieces shared by both wire formats: ids, SSE events, token estimates, word splitting."""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal

_ALPHANUMERIC = string.ascii_letters + string.digits
_WORD = re.compile(r"\S+\s*|\s+")


def random_id(prefix: str, length: int = 24) -> str:
    """A provider-style id: `prefix` followed by `length` random letters and digits."""
    return prefix + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def estimate_tokens(value: Any) -> int:
    """A rough token count (four characters a token) of a string or any JSON value."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return max(1, math.ceil(len(text) / 4))


def split_words(text: str) -> list[str]:
    """Split text into stream deltas of one word plus the whitespace after it."""
    return _WORD.findall(text)


def split_fragments(text: str, size: int) -> list[str]:
    """Split a JSON string into fragments of `size` characters, as providers stream arguments."""
    size = max(1, size)
    return [text[i : i + size] for i in range(0, len(text), size)]


Phase = Literal["frame", "delta", "tail"]


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event and where it sits in the stream.

    `phase` tells the failure logic apart: `frame` events open or close a message or block, `delta`
    events carry generated content, `tail` events finish the reply.
    """

    data: str
    phase: Phase
    event: str | None = None

    def encode(self) -> bytes:
        """The event as it goes on the wire."""
        prefix = f"event: {self.event}\n" if self.event is not None else ""
        return f"{prefix}data: {self.data}\n\n".encode()


def sse(data: Any, phase: Phase, event: str | None = None) -> SseEvent:
    """An SSE event whose data is `data` as compact JSON."""
    return SseEvent(json.dumps(data, separators=(",", ":")), phase, event)


def arguments_json(arguments: Any) -> str:
    """Tool arguments as the JSON string both providers put on the wire."""
    return json.dumps(arguments, separators=(",", ":"))
