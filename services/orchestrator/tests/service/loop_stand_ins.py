"""Scripted llmrouter, toolrunner and memory servers for the agent loop's service tests.

Each is a real grpc.aio server on a free port with the kit's per-RPC handling (principal
verification, error mapping), answering from a script and counting every call it receives,
with the principal it came with. The loop reaches them through the real clients.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
from opentelemetry.sdk.trace import TracerProvider

from foredeck.common.v1 import chat_pb2, memory_pb2, usage_pb2
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as llm
from foredeck.llmrouter.v1 import llmrouter_service_pb2_grpc as llm_grpc
from foredeck.memory.v1 import memory_service_pb2 as mem
from foredeck.memory.v1 import memory_service_pb2_grpc as mem_grpc
from foredeck.toolrunner.v1 import execution_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as tools_grpc
from foredeck_kit.context import current_rpc
from foredeck_kit.errors import ServiceError
from foredeck_kit.principal import Principal
from foredeck_orchestrator.adapters.breaker import BreakerConfig, CircuitBreakers
from foredeck_orchestrator.clients import DownstreamClients
from foredeck_testing.server import RunningServer, fresh_delegation_keys, fresh_keys, running_server

ANSWER = ("Six times seven ", "is ", "42.")
USAGE = usage_pb2.Usage(input_tokens=10, output_tokens=5, cost_usd_micros=3)


@dataclass
class Script:
    """What the stand-ins answer, and what they saw.

    ``plans`` maps a plan step's id to the model's plan text. ``tool_outcomes`` maps a tool
    name to its outcome. ``hold_tools`` makes ExecuteTool wait until cancelled, setting
    ``tool_started`` when it begins and ``tool_cancelled`` when its call is cancelled.
    """

    plans: dict[str, str]
    tool_outcomes: dict[str, execution_pb2.ToolOutcome] = field(default_factory=dict)
    hold_tools: bool = False
    tool_errors: dict[str, ServiceError] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    calls: list[tuple[str, str]] = field(default_factory=list)
    principals: list[Principal] = field(default_factory=list)
    tool_requests: list[tools.ExecuteToolRequest] = field(default_factory=list)
    generate_requests: list[llm.GenerateRequest] = field(default_factory=list)
    remember_requests: list[mem.RememberRequest] = field(default_factory=list)
    tool_started: asyncio.Event = field(default_factory=asyncio.Event)
    tool_cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def seen(self, method: str, key: str) -> None:
        self.counts[method] += 1
        self.calls.append((method, key))
        rpc = current_rpc()
        if rpc is not None and rpc.principal is not None:
            self.principals.append(rpc.principal)


def _assistant(text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(
        role=chat_pb2.ROLE_ASSISTANT,
        parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))],
    )


class LlmStandIn(llm_grpc.LlmRouterServiceServicer):
    """Generate answers plans from the script and reasoning with a fixed text; StreamGenerate
    streams :data:`ANSWER`."""

    def __init__(self, script: Script) -> None:
        self.script = script

    async def Generate(
        self, request: llm.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llm.GenerateResponse:
        self.script.seen("Generate", request.request_id)
        self.script.generate_requests.append(request)
        if request.response_format.json_schema:
            text = self.script.plans.get(request.metadata.step_id)
            if text is None:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "no plan scripted"
                )
        else:
            text = "checked: 6 * 7 = 42"
        return llm.GenerateResponse(
            message=_assistant(text),
            finish_reason=generation_pb2.FINISH_REASON_STOP,
            usage=USAGE,
            provider="scripted",
            model=request.model,
        )

    async def StreamGenerate(
        self, request: llm.StreamGenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[llm.StreamGenerateResponse]:
        self.script.seen("StreamGenerate", request.request_id)
        yield llm.StreamGenerateResponse(
            started=generation_pb2.GenerationStarted(provider="scripted", model=request.model)
        )
        for chunk in ANSWER:
            yield llm.StreamGenerateResponse(
                text_delta=generation_pb2.TextDelta(part_index=0, text=chunk)
            )
        yield llm.StreamGenerateResponse(
            finished=generation_pb2.GenerationFinished(
                finish_reason=generation_pb2.FINISH_REASON_STOP, usage=USAGE
            )
        )


class ToolStandIn(tools_grpc.ToolRunnerServiceServicer):
    """ExecuteTool answers from the script; an unscripted tool is TOOL_PERMISSION_DENIED."""

    def __init__(self, script: Script) -> None:
        self.script = script

    async def ExecuteTool(
        self, request: tools.ExecuteToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools.ExecuteToolResponse:
        self.script.seen("ExecuteTool", request.idempotency_key)
        self.script.tool_requests.append(request)
        if self.script.hold_tools:
            self.script.tool_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.script.tool_cancelled.set()
                raise
        if request.tool_name in self.script.tool_errors:
            raise self.script.tool_errors[request.tool_name]
        outcome = self.script.tool_outcomes.get(request.tool_name)
        if outcome is None:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "TOOL_PERMISSION_DENIED",
                "the caller may not run this tool",
                metadata={"toolName": request.tool_name},
            )
        return tools.ExecuteToolResponse(
            tool_name=request.tool_name, tool_call_id=request.tool_call_id, outcome=outcome
        )


class MemoryStandIn(mem_grpc.LongTermMemoryServiceServicer):
    """Recall returns one memory; Remember stores nothing and returns a fixed id."""

    def __init__(self, script: Script) -> None:
        self.script = script

    async def Recall(
        self, request: mem.RecallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mem.RecallResponse:
        self.script.seen("Recall", request.query)
        return mem.RecallResponse(
            memories=[
                memory_pb2.RecalledMemory(
                    memory=memory_pb2.Memory(memory_id="m1", content="the user likes brevity"),
                    score=0.8,
                )
            ]
        )

    async def Remember(
        self, request: mem.RememberRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mem.RememberResponse:
        self.script.seen("Remember", request.request_id)
        self.script.remember_requests.append(request)
        return mem.RememberResponse(memory=memory_pb2.Memory(memory_id="m-run"))


def tool_output(value: Any) -> execution_pb2.ToolOutcome:
    """A successful tool outcome."""
    return execution_pb2.ToolOutcome(output=execution_pb2.ToolOutput(output_json=json.dumps(value)))


def tool_failure(message: str) -> execution_pb2.ToolOutcome:
    """A tool outcome reporting the tool's own failure."""
    return execution_pb2.ToolOutcome(
        error=execution_pb2.ToolError(
            kind=execution_pb2.TOOL_ERROR_KIND_TOOL_FAILED, message=message
        )
    )


@dataclass
class StandIns:
    """The three running stand-ins and the loop's clients to them."""

    script: Script
    llmrouter: RunningServer
    toolrunner: RunningServer
    memory: RunningServer
    clients: DownstreamClients

    def credentials_for(self, run_id: str) -> Any:
        """What ``RunContext.credentials`` does: a fresh delegated principal per call."""
        return lambda: self.llmrouter.delegated_token(run_id)


@asynccontextmanager
async def stand_ins(
    script: Script,
    *,
    tracer_provider: TracerProvider | None = None,
    breaker: BreakerConfig | None = None,
    toolrunner_address: str | None = None,
) -> AsyncIterator[StandIns]:
    """Start the three stand-ins (sharing keys) and open the loop's clients to them."""
    keys, delegation = fresh_keys(), fresh_delegation_keys()
    llm_servicer = LlmStandIn(script)  # type: ignore[abstract]
    tool_servicer = ToolStandIn(script)
    memory_servicer = MemoryStandIn(script)  # type: ignore[abstract]
    async with AsyncExitStack() as stack:
        servers = []
        for name, domain, register in (
            (
                "foredeck.llmrouter.v1.LlmRouterService",
                "llmrouter.foredeck.dev",
                lambda s: llm_grpc.add_LlmRouterServiceServicer_to_server(llm_servicer, s),
            ),
            (
                "foredeck.toolrunner.v1.ToolRunnerService",
                "toolrunner.foredeck.dev",
                lambda s: tools_grpc.add_ToolRunnerServiceServicer_to_server(tool_servicer, s),
            ),
            (
                "foredeck.memory.v1.LongTermMemoryService",
                "memory.foredeck.dev",
                lambda s: mem_grpc.add_LongTermMemoryServiceServicer_to_server(memory_servicer, s),
            ),
        ):
            servers.append(
                await stack.enter_async_context(
                    running_server(
                        register,
                        service_names=[name],
                        domain=domain,
                        keys=keys,
                        delegation_keys=delegation,
                    )
                )
            )
        llmrouter, toolrunner, memory = servers
        clients = DownstreamClients.open(
            llmrouter_address=llmrouter.address,
            toolrunner_address=toolrunner_address or toolrunner.address,
            memory_address=memory.address,
            tracer_provider=tracer_provider,
            breakers=CircuitBreakers(breaker) if breaker is not None else None,
        )
        try:
            yield StandIns(script, llmrouter, toolrunner, memory, clients)
        finally:
            await clients.close()
