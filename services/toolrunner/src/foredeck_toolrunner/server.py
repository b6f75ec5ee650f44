"""Wiring: settings + dependencies -> the registry, the executor and the gRPC server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc.aio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from foredeck.toolrunner.v1 import tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as svc_grpc
from foredeck_kit.logs import get_logger
from foredeck_kit.metrics import Metrics
from foredeck_kit.server import ServiceHost, build_grpc_server
from foredeck_kit.telemetry import Telemetry
from foredeck_toolrunner.adapters.builtins import (
    BUILTIN_NAMES,
    SANDBOXED_BUILTINS,
    CalculatorRuntime,
    CurrentTimeRuntime,
    HttpFetchRuntime,
    PythonRuntime,
    SandboxDefaults,
    builtin_tools,
    sandbox_spec,
)
from foredeck_toolrunner.adapters.mcp_client import McpClient
from foredeck_toolrunner.adapters.redis_ledger import RedisEffectLedger, RedisRateLimiter
from foredeck_toolrunner.adapters.redis_registry import RedisRegistryStore
from foredeck_toolrunner.adapters.sandbox import Sandbox, probe
from foredeck_toolrunner.clients import ToolHostClient
from foredeck_toolrunner.config import ToolRunnerSettings
from foredeck_toolrunner.domain.execution import ApprovalVerifier, Executor
from foredeck_toolrunner.domain.mcp_import import McpImporter
from foredeck_toolrunner.domain.ports import ToolRuntime
from foredeck_toolrunner.domain.registry import ToolRegistry
from foredeck_toolrunner.domain.validation import Limits
from foredeck_toolrunner.errors import DOMAIN
from foredeck_toolrunner.observability import ToolMetrics
from foredeck_toolrunner.servicer import RegistryServicer, RunnerServicer

__all__ = [
    "GATEWAY_ONLY_METHODS",
    "SERVICE_NAMES",
    "Deps",
    "ToolRunnerService",
    "build_deps",
    "build_server",
]

GATEWAY_ONLY_METHODS = tuple(
    f"/foredeck.toolrunner.v1.ToolRegistryService/{method}"
    for method in ("RegisterTool", "UpdateTool", "DeregisterTool", "ImportMcpServer")
)
"""Registry writes: a principal the orchestrator minted for a run may not call them."""

SERVICE_NAMES = (
    "foredeck.toolrunner.v1.ToolRegistryService",
    "foredeck.toolrunner.v1.ToolRunnerService",
)


@dataclass
class Deps:
    """What the service runs on; built by :func:`build_deps` in ``main`` or by tests."""

    redis: Redis
    sandbox: Sandbox
    telemetry: Telemetry | None = None
    approval_verifier: ApprovalVerifier | None = None
    metrics: Metrics = field(default_factory=Metrics)


async def build_deps(settings: ToolRunnerSettings, telemetry: Telemetry | None = None) -> Deps:
    """Connect Redis (lazily) and probe the sandbox; logs what isolation works here."""
    capabilities = await probe(settings.sandbox_mode, settings.sandbox_python)
    get_logger("foredeck.toolrunner").info("sandbox", **capabilities.describe())
    sandbox = Sandbox(
        capabilities,
        uid_base=settings.sandbox_uid_base,
        max_concurrent=settings.sandbox_max_concurrent,
        pool_size=settings.sandbox_pool_size,
    )
    verifier = (
        settings.approval_verifier(reason="APPROVAL_INVALID")
        if settings.delegation_keys.get_secret_value()
        else None
    )
    return Deps(
        redis=Redis.from_url(settings.redis_url),
        sandbox=sandbox,
        telemetry=telemetry,
        metrics=telemetry.metrics if telemetry is not None else Metrics(),
        approval_verifier=verifier,
    )


class ToolRunnerService:
    """The service's parts, wired from settings and dependencies."""

    def __init__(self, settings: ToolRunnerSettings, deps: Deps) -> None:
        self.settings = settings
        self.deps = deps
        self.defaults = SandboxDefaults(
            memory_bytes=settings.default_memory_bytes,
            cpu_seconds=settings.default_cpu_seconds,
            processes=settings.default_max_processes,
            open_files=settings.default_max_open_files,
            file_size_bytes=settings.default_max_file_size_bytes,
            work_dir_bytes=settings.default_work_dir_bytes,
        )
        self.hosts = ToolHostClient(settings)
        self.mcp = McpClient(deps.sandbox, self.defaults, settings.secret_values)
        self.store = RedisRegistryStore(deps.redis, settings.key_prefix)
        ttl = timedelta(seconds=settings.request_id_ttl_seconds)
        self.registry = ToolRegistry(
            self.store,
            limits=Limits(settings.max_memory_bytes, settings.max_cpu_seconds),
            builtins=BUILTIN_NAMES,
            sandboxed_builtins=SANDBOXED_BUILTINS,
            remote_check=self._remote_check,
            request_ttl=ttl,
        )
        self._builtins: dict[str, ToolRuntime] = {
            "calculator": CalculatorRuntime(),
            "current_time": CurrentTimeRuntime(),
            "python": PythonRuntime(deps.sandbox, self.defaults),
            "http_fetch": HttpFetchRuntime(settings.http_fetch_max_bytes),
        }
        self.metrics = ToolMetrics(deps.metrics)
        capabilities = deps.sandbox.capabilities
        self.metrics.sandbox(capabilities.kind, capabilities.seccomp is not None)
        tracer = (
            deps.telemetry.tracer_provider.get_tracer("foredeck.toolrunner")
            if deps.telemetry is not None
            else None
        )
        self.executor = Executor(
            self.registry,
            RedisEffectLedger(deps.redis, settings.key_prefix),
            RedisRateLimiter(deps.redis, settings.key_prefix),
            self._runtime,
            ledger_ttl=timedelta(seconds=settings.ledger_ttl_seconds),
            observer=self.metrics,
            approval_verifier=deps.approval_verifier,
            tracer=tracer,
        )
        self.importer = McpImporter(self.registry, self.mcp, ttl)
        self._started = False

    async def _remote_check(self, tool: tool_pb2.Tool) -> None:
        if tool.WhichOneof("runtime") == "grpc_host":
            await self.hosts.check_offers(tool)
        elif tool.WhichOneof("runtime") == "mcp_server":
            runtime = tool.mcp_server
            listed = await self.mcp.list_tools(runtime.server, tool.policy, 30.0)
            remote = runtime.remote_tool_name or tool.definition.name
            if not any(item.name == remote for item in listed):
                from foredeck_toolrunner.domain.errors import ToolRunnerError

                raise ToolRunnerError.remote_tool_not_found(tool.definition.name, remote, "mcp")

    def _runtime(self, tool: tool_pb2.Tool) -> ToolRuntime:
        kind = tool.WhichOneof("runtime")
        if kind == "grpc_host":
            return self.hosts
        if kind == "mcp_server":
            return self.mcp
        return self._builtins[tool.builtin.builtin_name]

    def register(self, server: grpc.aio.Server) -> None:
        """Add both servicers to ``server``."""
        svc_grpc.add_ToolRegistryServiceServicer_to_server(
            RegistryServicer(self.registry, self.importer), server
        )
        svc_grpc.add_ToolRunnerServiceServicer_to_server(RunnerServicer(self.executor), server)

    async def readiness(self) -> bool:
        """SERVING once Redis answers (built-ins registered) and a sandbox can run."""
        if self.deps.sandbox.kind == "none":
            return False
        try:
            await self.deps.redis.ping()
        except RedisError:
            return False
        if not self._started:
            if self.settings.builtin_tools:
                await self.registry.ensure(builtin_tools(), user="toolrunner")
            python = next(t for t in builtin_tools() if t.definition.name == "python")
            await self.deps.sandbox.warm(sandbox_spec(python.policy, self.defaults))
        self._started = True
        return True

    async def close(self) -> None:
        """Close outbound channels and the Redis pool."""
        await self.hosts.close()
        await self.deps.sandbox.close()
        await self.deps.redis.aclose()


def build_server(settings: ToolRunnerSettings, deps: Deps) -> ServiceHost:
    """The gRPC server of the tool runner (nothing binds until ``start``)."""
    service = ToolRunnerService(settings, deps)
    host = build_grpc_server(
        settings,
        domain=DOMAIN,
        register=service.register,
        service_names=SERVICE_NAMES,
        verifier=settings.principal_verifier(gateway_only_methods=GATEWAY_ONLY_METHODS),
        readiness=service.readiness,
        telemetry=deps.telemetry,
    )
    host.toolrunner = service  # type: ignore[attr-defined]
    return host


Register = Callable[[grpc.aio.Server], None]
