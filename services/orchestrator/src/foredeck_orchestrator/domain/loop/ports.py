"""What the agent loop needs from llmrouter, toolrunner and memory.

The loop speaks the contracts' messages but never grpc: ``foredeck_orchestrator.clients``
implements these protocols over the generated stubs, and tests may implement them in memory.
Every method raises :class:`~foredeck_orchestrator.domain.loop.errors.DownstreamError` when the
downstream fails, and lets ``asyncio.CancelledError`` through at once (cancelling the call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from foredeck.llmrouter.v1 import llmrouter_service_pb2 as llm
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools

__all__ = ["CallOptions", "Downstreams", "LlmRouter", "Memory", "ToolRunner"]


@dataclass(frozen=True, slots=True)
class CallOptions:
    """How one downstream call is made.

    ``principal`` is the delegated principal minted for this call (``RunContext.credentials``);
    ``deadline`` is the run's wall-time deadline as a ``time.monotonic()`` instant, which caps
    the call's own timeout.
    """

    principal: str
    deadline: float | None = None


class LlmRouter(Protocol):
    """Model calls through llmrouter."""

    async def generate(
        self, request: llm.GenerateRequest, options: CallOptions
    ) -> llm.GenerateResponse:
        """One whole assistant message."""
        ...

    def stream_generate(
        self, request: llm.StreamGenerateRequest, options: CallOptions
    ) -> AsyncIterator[llm.StreamGenerateResponse]:
        """The assistant message as typed stream events, ending with ``finished`` or ``failed``."""
        ...


class ToolRunner(Protocol):
    """Tool calls through toolrunner."""

    async def execute_tool(
        self, request: tools.ExecuteToolRequest, options: CallOptions
    ) -> tools.ExecuteToolResponse:
        """Run one tool call under its idempotency key."""
        ...


class Memory(Protocol):
    """Long-term memory through the memory service."""

    async def recall(self, request: mem.RecallRequest, options: CallOptions) -> mem.RecallResponse:
        """The memories closest to a query."""
        ...

    async def remember(
        self, request: mem.RememberRequest, options: CallOptions
    ) -> mem.RememberResponse:
        """Store one memory, idempotent by ``request_id``."""
        ...


@dataclass(frozen=True, slots=True)
class Downstreams:
    """The three services a run calls."""

    llm: LlmRouter
    tools: ToolRunner
    memory: Memory
