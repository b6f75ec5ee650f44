"""Typed async wrappers over the llmrouter, toolrunner and memory stubs, for the agent loop.

Each call carries the delegated principal minted for it (``CallOptions.principal``, from
``RunContext.credentials``), a timeout capped by the run's wall-time deadline, and passes the
downstream's circuit breaker first. A failed call raises the domain's ``DownstreamError`` with
the status code, the downstream's ``ErrorInfo`` reason, domain and metadata and its RetryInfo,
never its message. Cancelling the awaiting task cancels the RPC in flight.

The channels retry nothing themselves: the loop owns the one retry policy, so every retry is
bounded by the run's deadline, counted by the breaker and visible as a run event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio
from opentelemetry.trace import TracerProvider

from foredeck.llmrouter.v1 import llmrouter_service_pb2 as llm
from foredeck.llmrouter.v1 import llmrouter_service_pb2_grpc as llm_grpc
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck.memory.v1 import memory_service_pb2_grpc as mem_grpc
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as tools_grpc
from foredeck_kit.channels import open_channel
from foredeck_kit.errors import error_details
from foredeck_kit.metrics import Metrics
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY
from foredeck_kit.settings import ServiceSettings
from foredeck_orchestrator.adapters.breaker import CircuitBreaker, CircuitBreakers
from foredeck_orchestrator.domain.loop.engine import LoopSettings, PlanActLoop
from foredeck_orchestrator.domain.loop.errors import Code, DownstreamError
from foredeck_orchestrator.domain.loop.ports import CallOptions, Downstreams
from foredeck_orchestrator.domain.ports import RunContext, RunOutcome

__all__ = [
    "ConnectedAgentLoop",
    "DownstreamClients",
    "LlmRouterClient",
    "MemoryClient",
    "ToolRunnerClient",
    "downstream_error",
]

T = TypeVar("T")

LLMROUTER = "llmrouter"
TOOLRUNNER = "toolrunner"
MEMORY = "memory"


def downstream_error(
    name: str, error: grpc.aio.AioRpcError, *, run_deadline: bool = False
) -> DownstreamError:
    """The domain error for a failed call: code, reason, domain, metadata and retry delay."""
    details = error_details(error)
    code = details.code
    return DownstreamError(
        name,
        int(code.value[0]),
        code.name,
        reason=details.reason or "",
        domain=details.domain or "",
        metadata=details.metadata,
        retry_after=(
            details.retry_after.total_seconds() if details.retry_after is not None else None
        ),
        run_deadline=run_deadline and code is grpc.StatusCode.DEADLINE_EXCEEDED,
    )


class _Caller:
    """What every client shares: timeout, principal, breaker and error mapping."""

    def __init__(
        self,
        name: str,
        breaker: CircuitBreaker,
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.breaker = breaker
        self.timeout = timeout
        self.clock = clock

    def prepare(self, options: CallOptions) -> tuple[float, list[tuple[str, str]], bool]:
        """The call's timeout and metadata, and whether the run's deadline set the timeout."""
        timeout = self.timeout
        capped = False
        if options.deadline is not None:
            remaining = options.deadline - self.clock()
            if remaining <= 0:
                raise DownstreamError(
                    self.name, Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", run_deadline=True
                )
            if remaining < timeout:
                timeout, capped = remaining, True
        return timeout, [(PRINCIPAL_METADATA_KEY, options.principal)], capped

    def failed(self, error: grpc.aio.AioRpcError, probe: bool, capped: bool) -> DownstreamError:
        mapped = downstream_error(self.name, error, run_deadline=capped)
        code = error.code()
        # Only failures that say the downstream itself is unwell count: it is unreachable or
        # overloaded, or it let our own timeout pass without a word. A typed refusal, or a
        # timeout it reported itself (a tool running too long), shows it alive.
        unwell = code is grpc.StatusCode.UNAVAILABLE or (
            code is grpc.StatusCode.DEADLINE_EXCEEDED
            and not mapped.reason
            and not mapped.run_deadline
        )
        if unwell:
            self.breaker.record_failure(probe)
        elif code is grpc.StatusCode.CANCELLED:
            self.breaker.release(probe)
        else:
            self.breaker.record_success(probe)
        return mapped

    async def unary(
        self, options: CallOptions, call: Callable[[float, list[tuple[str, str]]], Awaitable[T]]
    ) -> T:
        timeout, metadata, capped = self.prepare(options)
        probe = self.breaker.admit()
        try:
            response = await call(timeout, metadata)
        except grpc.aio.AioRpcError as error:
            raise self.failed(error, probe, capped) from None
        except BaseException:
            self.breaker.release(probe)
            raise
        self.breaker.record_success(probe)
        return response


class LlmRouterClient:
    """llmrouter's Generate and StreamGenerate."""

    def __init__(self, channel: grpc.aio.Channel, caller: _Caller) -> None:
        self._stub = llm_grpc.LlmRouterServiceStub(channel)
        self._caller = caller

    async def generate(
        self, request: llm.GenerateRequest, options: CallOptions
    ) -> llm.GenerateResponse:
        """One whole assistant message."""
        return await self._caller.unary(
            options,
            lambda timeout, metadata: self._stub.Generate(
                request, timeout=timeout, metadata=metadata
            ),
        )

    async def stream_generate(
        self, request: llm.StreamGenerateRequest, options: CallOptions
    ) -> AsyncIterator[llm.StreamGenerateResponse]:
        """The stream's events as they arrive; closing the iterator cancels the call."""
        caller = self._caller
        timeout, metadata, capped = caller.prepare(options)
        probe = caller.breaker.admit()
        call = self._stub.StreamGenerate(request, timeout=timeout, metadata=metadata)
        settled = False
        try:
            async for event in call:
                if not settled:
                    # The first event shows the router answering; the breaker is about the
                    # router, not about how the generation ends.
                    caller.breaker.record_success(probe)
                    settled = True
                yield event
        except grpc.aio.AioRpcError as error:
            if settled:
                raise downstream_error(caller.name, error, run_deadline=capped) from None
            settled = True
            raise caller.failed(error, probe, capped) from None
        finally:
            if not call.done():
                call.cancel()
            if not settled:
                caller.breaker.release(probe)


class ToolRunnerClient:
    """toolrunner's ExecuteTool."""

    def __init__(self, channel: grpc.aio.Channel, caller: _Caller) -> None:
        self._stub = tools_grpc.ToolRunnerServiceStub(channel)
        self._caller = caller

    async def execute_tool(
        self, request: tools.ExecuteToolRequest, options: CallOptions
    ) -> tools.ExecuteToolResponse:
        """Run one tool call under its idempotency key."""
        return await self._caller.unary(
            options,
            lambda timeout, metadata: self._stub.ExecuteTool(
                request, timeout=timeout, metadata=metadata
            ),
        )


class MemoryClient:
    """The memory service's long-term Recall and Remember."""

    def __init__(self, channel: grpc.aio.Channel, caller: _Caller) -> None:
        self._stub = mem_grpc.LongTermMemoryServiceStub(channel)
        self._caller = caller

    async def recall(self, request: mem.RecallRequest, options: CallOptions) -> mem.RecallResponse:
        """The memories closest to a query."""
        return await self._caller.unary(
            options,
            lambda timeout, metadata: self._stub.Recall(
                request, timeout=timeout, metadata=metadata
            ),
        )

    async def remember(
        self, request: mem.RememberRequest, options: CallOptions
    ) -> mem.RememberResponse:
        """Store one memory, idempotent by ``request_id``."""
        return await self._caller.unary(
            options,
            lambda timeout, metadata: self._stub.Remember(
                request, timeout=timeout, metadata=metadata
            ),
        )


class DownstreamClients:
    """The three clients over their channels, with one breaker per downstream.

    ``open`` opens the channels (inside the event loop that will use them); ``close`` closes
    them. The per-call timeouts are the most one call may take; the run's deadline may cut them
    shorter.
    """

    def __init__(
        self,
        *,
        llmrouter: grpc.aio.Channel,
        toolrunner: grpc.aio.Channel,
        memory: grpc.aio.Channel,
        breakers: CircuitBreakers | None = None,
        llm_timeout: float = 120.0,
        tool_timeout: float = 300.0,
        memory_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.breakers = breakers or CircuitBreakers(clock=clock)
        self._channels = (llmrouter, toolrunner, memory)
        self.llm = LlmRouterClient(
            llmrouter, _Caller(LLMROUTER, self.breakers.get(LLMROUTER), llm_timeout, clock)
        )
        self.tools = ToolRunnerClient(
            toolrunner, _Caller(TOOLRUNNER, self.breakers.get(TOOLRUNNER), tool_timeout, clock)
        )
        self.memory = MemoryClient(
            memory, _Caller(MEMORY, self.breakers.get(MEMORY), memory_timeout, clock)
        )

    @classmethod
    def open(
        cls,
        *,
        llmrouter_address: str,
        toolrunner_address: str,
        memory_address: str,
        settings: ServiceSettings | None = None,
        tracer_provider: TracerProvider | None = None,
        breakers: CircuitBreakers | None = None,
        llm_timeout: float = 120.0,
        tool_timeout: float = 300.0,
        memory_timeout: float = 30.0,
    ) -> DownstreamClients:
        """Open a channel to each downstream; every call gets a client span of its own."""

        def channel(address: str, name: str) -> grpc.aio.Channel:
            return open_channel(
                address, settings=settings, tracer_provider=tracer_provider, name=name
            )

        return cls(
            llmrouter=channel(llmrouter_address, LLMROUTER),
            toolrunner=channel(toolrunner_address, TOOLRUNNER),
            memory=channel(memory_address, MEMORY),
            breakers=breakers,
            llm_timeout=llm_timeout,
            tool_timeout=tool_timeout,
            memory_timeout=memory_timeout,
        )

    @property
    def downstreams(self) -> Downstreams:
        """The clients as the loop's ports."""
        return Downstreams(llm=self.llm, tools=self.tools, memory=self.memory)

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels:
            await channel.close(None)


class ConnectedAgentLoop:
    """The agent loop over downstream clients opened on the first run, inside the event loop
    that drives runs (grpc.aio channels belong to the loop they were opened in), so a role can
    be wired before its event loop starts::

        loop = ConnectedAgentLoop(
            lambda: DownstreamClients.open(
                llmrouter_address=..., toolrunner_address=..., memory_address=...,
                settings=settings, tracer_provider=telemetry.tracer_provider,
            ),
            tracer_provider=telemetry.tracer_provider,
            metrics=telemetry.metrics,
        )
    """

    def __init__(
        self,
        connect: Callable[[], DownstreamClients],
        *,
        tracer_provider: TracerProvider | None = None,
        metrics: Metrics | None = None,
        settings: LoopSettings | None = None,
    ) -> None:
        self._connect = connect
        self._tracer_provider = tracer_provider
        self._metrics = metrics
        self._settings = settings
        self.clients: DownstreamClients | None = None
        self._loop: PlanActLoop | None = None

    async def execute(self, ctx: RunContext) -> RunOutcome:
        """Run or resume ``ctx.run`` (see :class:`PlanActLoop`)."""
        if self._loop is None:
            self.clients = self._connect()
            self._loop = PlanActLoop(
                self.clients.downstreams,
                settings=self._settings,
                tracer_provider=self._tracer_provider,
                metrics=self._metrics,
            )
        return await self._loop.execute(ctx)

    async def close(self) -> None:
        """Close the channels, if they were opened."""
        if self.clients is not None:
            await self.clients.close()
            self.clients = None
            self._loop = None
