"""What the runtime's service tests share: scripted downstreams, the API server, workers.

The downstream stand-ins are real gRPC servers (the loop tests' scripted llmrouter and memory,
and a toolrunner that keeps an effect ledger by idempotency key, as the real one does). The
API runs in-process on a free port; workers run in-process or as real processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from redis.asyncio import Redis

from foredeck.common.v1 import agent_pb2, run_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2_grpc as llm_grpc
from foredeck.memory.v1 import memory_service_pb2_grpc as mem_grpc
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as pb
from foredeck.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from foredeck.toolrunner.v1 import execution_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tools
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as tools_grpc
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    PrincipalSigner,
    format_keys,
)
from foredeck_kit.telemetry import Telemetry
from foredeck_orchestrator.config import OrchestratorSettings
from foredeck_orchestrator.server import ApiDeps, ApiHost, build_server
from foredeck_orchestrator.worker import WorkerDeps, WorkerHost, build_worker
from foredeck_testing.server import (
    RunningServer,
    fresh_delegation_keys,
    fresh_keys,
    running_server,
)
from services.orchestrator.tests.loop_support import plan_text, tool_step
from services.orchestrator.tests.service.loop_stand_ins import (
    LlmStandIn,
    MemoryStandIn,
    Script,
)

ROOT = Path(__file__).resolve().parents[4]


async def wait_for(
    condition: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        # Polling a condition with a bound, not a fixed wait.
        await asyncio.sleep(0.05)


@dataclass
class Effects:
    """The toolrunner's effect ledger: each idempotency key takes effect once.

    A tool call takes effect when it arrives; its answer is held until ``gate`` is set, so a
    test can stop a worker while calls are in flight. ``cancelled`` counts calls whose
    caller went away while held.
    """

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    executions: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0
    results: dict[str, execution_pb2.ToolOutcome] = field(default_factory=dict)


class EffectTools(tools_grpc.ToolRunnerServiceServicer):
    """ExecuteTool with an effect ledger by idempotency key."""

    def __init__(self, effects: Effects) -> None:
        self.effects = effects

    async def ExecuteTool(
        self, request: tools.ExecuteToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools.ExecuteToolResponse:
        key = request.idempotency_key
        self.effects.calls[key] += 1
        if key not in self.effects.results:
            self.effects.executions[key] += 1
            self.effects.results[key] = execution_pb2.ToolOutcome(
                output=execution_pb2.ToolOutput(output_json=json.dumps(42))
            )
        self.effects.arrived.set()
        try:
            await self.effects.gate.wait()
        except asyncio.CancelledError:
            self.effects.cancelled += 1
            raise
        return tools.ExecuteToolResponse(
            tool_name=request.tool_name,
            tool_call_id=request.tool_call_id,
            outcome=self.effects.results[key],
        )


@dataclass
class Downstreams:
    """The three running stand-ins, sharing principal and delegation keys."""

    script: Script
    effects: Effects
    llmrouter: RunningServer
    toolrunner: RunningServer
    memory: RunningServer
    keys: dict[str, bytes]
    delegation_keys: dict[str, bytes]


def calculator_script() -> Script:
    """Every run plans one calculator call, then synthesises."""
    return Script(plans={"s1": plan_text(tool_step("calculator", {"expression": "6*7"}))})


@asynccontextmanager
async def downstreams(script: Script | None = None) -> AsyncIterator[Downstreams]:
    """Start the scripted llmrouter, toolrunner and memory."""
    script = script or calculator_script()
    effects = Effects()
    keys, delegation = fresh_keys(), fresh_delegation_keys()
    llm = LlmStandIn(script)  # type: ignore[abstract]
    tool = EffectTools(effects)
    memory = MemoryStandIn(script)  # type: ignore[abstract]
    async with AsyncExitStack() as stack:
        servers = []
        for name, domain, register in (
            (
                "foredeck.llmrouter.v1.LlmRouterService",
                "llmrouter.foredeck.dev",
                lambda s: llm_grpc.add_LlmRouterServiceServicer_to_server(llm, s),
            ),
            (
                "foredeck.toolrunner.v1.ToolRunnerService",
                "toolrunner.foredeck.dev",
                lambda s: tools_grpc.add_ToolRunnerServiceServicer_to_server(tool, s),
            ),
            (
                "foredeck.memory.v1.LongTermMemoryService",
                "memory.foredeck.dev",
                lambda s: mem_grpc.add_LongTermMemoryServiceServicer_to_server(memory, s),
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
        llmrouter, toolrunner, memory_server = servers
        yield Downstreams(script, effects, llmrouter, toolrunner, memory_server, keys, delegation)


def settings_for(redis_url: str, ds: Downstreams, **overrides: Any) -> OrchestratorSettings:
    """Settings of both roles for one test."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "drain_seconds": 0.0,
        "grace_period_seconds": 1.0,
        "principal_keys": format_keys(ds.keys),
        "delegation_keys": format_keys(ds.delegation_keys),
        "llmrouter_address": ds.llmrouter.address,
        "toolrunner_address": ds.toolrunner.address,
        "memory_address": ds.memory.address,
        "lease_seconds": 1.5,
        "worker_concurrency": 4,
        "requeue_delay_seconds": 0.02,
    }
    values.update(overrides)
    return OrchestratorSettings(**values)


def env_for(settings: OrchestratorSettings, worker_id: str) -> dict[str, str]:
    """The environment a worker process reads its settings from."""
    prefix = "FOREDECK_ORCHESTRATOR_"
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.update(
        {
            f"{prefix}REDIS_URL": settings.redis_url,
            f"{prefix}PORT": "0",
            f"{prefix}METRICS_PORT": "-1",
            f"{prefix}PRINCIPAL_KEYS": settings.principal_keys.get_secret_value(),
            f"{prefix}DELEGATION_KEYS": settings.delegation_keys.get_secret_value(),
            f"{prefix}LLMROUTER_ADDRESS": settings.llmrouter_address,
            f"{prefix}TOOLRUNNER_ADDRESS": settings.toolrunner_address,
            f"{prefix}MEMORY_ADDRESS": settings.memory_address,
            f"{prefix}LEASE_SECONDS": str(settings.lease_seconds),
            f"{prefix}MAX_DELIVERIES": str(settings.max_deliveries),
            f"{prefix}WORKER_CONCURRENCY": str(settings.worker_concurrency),
            f"{prefix}WORKER_ID": worker_id,
            f"{prefix}GRACE_PERIOD_SECONDS": "1",
            "OTEL_SDK_DISABLED": "true",
        }
    )
    return env


@dataclass
class WorkerProcess:
    """A worker role running as its own process, logging to a file."""

    worker_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            with_cont = [signal.SIGCONT, signal.SIGKILL]
            for signum in with_cont:
                self.process.send_signal(signum)
        self.process.wait(timeout=10)


def spawn_worker(settings: OrchestratorSettings, tmp_path: Path, name: str) -> WorkerProcess:
    """Start ``python -m foredeck_orchestrator.worker`` with ``settings``."""
    worker_id = f"{name}-{uuid.uuid4().hex[:6]}"
    log_path = tmp_path / f"{worker_id}.log"
    handle = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "foredeck_orchestrator.worker"],
        env=env_for(settings, worker_id),
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    handle.close()
    return WorkerProcess(worker_id, process, log_path)


async def consumer_seen(redis: Redis, settings: OrchestratorSettings, worker_id: str) -> bool:
    """Whether ``worker_id`` has read from the queues (it is up and consuming)."""
    queue = f"{settings.key_prefix}:queue:{{low}}"
    try:
        consumers: Any = await redis.xinfo_consumers(queue, "workers")
    except Exception:
        return False
    return any(
        (c.get("name") or c.get(b"name")) in (worker_id, worker_id.encode()) for c in consumers
    )


@dataclass
class Api:
    """The API role in-process, a stub for each service and a way to mint principals."""

    host: ApiHost
    channel: grpc.aio.Channel
    agents: pb_grpc.AgentServiceAsyncStub
    runs: pb_grpc.RunServiceAsyncStub
    signer: PrincipalSigner

    def md(
        self,
        tenant_id: str = "tenant-a",
        user_id: str = "user-a",
        permissions: tuple[str, ...] = ("*",),
    ) -> tuple[tuple[str, str], ...]:
        token = self.signer.mint(tenant_id=tenant_id, user_id=user_id, permissions=permissions)
        return ((PRINCIPAL_METADATA_KEY, token),)

    async def create_agent(
        self,
        name: str = "helper",
        tools: tuple[str, ...] = ("calculator",),
        model: str = "scripted",
        **fields: Any,
    ) -> agent_pb2.Agent:
        agent = agent_pb2.Agent(name=name, model=model, allowed_tools=list(tools), **fields)
        reply = await self.agents.CreateAgent(
            pb.CreateAgentRequest(agent=agent, request_id=uuid.uuid4().hex), metadata=self.md()
        )
        return reply.agent

    async def submit(
        self,
        agent: str = "helper",
        *,
        priority: int = run_pb2.PRIORITY_NORMAL,
        request_id: str = "",
        text: str = "What is 6 times 7?",
        **fields: Any,
    ) -> pb.SubmitRunResponse:
        return await self.runs.SubmitRun(
            pb.SubmitRunRequest(
                agent_name=agent,
                input=text,
                priority=priority,  # type: ignore[arg-type]
                request_id=request_id or uuid.uuid4().hex,
                **fields,
            ),
            metadata=self.md(),
        )

    async def run(self, run_id: str) -> run_pb2.Run:
        return (await self.runs.GetRun(pb.GetRunRequest(run_id=run_id), metadata=self.md())).run

    async def finished(self, run_id: str) -> bool:
        status = (await self.run(run_id)).status
        return status >= run_pb2.RUN_STATUS_SUCCEEDED


@asynccontextmanager
async def api_server(
    settings: OrchestratorSettings, telemetry: Telemetry | None = None
) -> AsyncIterator[Api]:
    """Start the API role on a free port."""
    host = build_server(settings, ApiDeps(telemetry=telemetry))
    await host.start()
    try:
        async with asyncio.timeout(30):
            await host.wait_ready()
        channel = grpc.aio.insecure_channel(host.address)
        keys = {k: v for k, v in _parse(settings.principal_keys.get_secret_value()).items()}
        signer = PrincipalSigner(
            keys,
            next(iter(keys)),
            issuer=settings.principal_issuer,
            audience=settings.principal_audience,
        )
        try:
            yield Api(
                host,
                channel,
                pb_grpc.AgentServiceStub(channel),
                pb_grpc.RunServiceStub(channel),
                signer,
            )
        finally:
            await channel.close(None)
    finally:
        await host.stop(grace=0)


def _parse(spec: str) -> Mapping[str, bytes]:
    from foredeck_kit.principal import parse_keys

    return parse_keys(spec)


@asynccontextmanager
async def worker_in_process(
    settings: OrchestratorSettings, telemetry: Telemetry | None = None
) -> AsyncIterator[WorkerHost]:
    """Start a worker role in this process."""
    host = build_worker(settings, WorkerDeps(telemetry=telemetry))
    await host.start()
    try:
        yield host
    finally:
        await host.stop(grace=0)
