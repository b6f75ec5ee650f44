"""``python -m foredeck_orchestrator.worker``: the worker role.

It serves only gRPC health (``foredeck.orchestrator.v1.Worker``) and reflection on its port,
and metrics on its own port; its work is the run queue. ``build_worker`` is the factory both
``main()`` and the tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from redis.asyncio import Redis

from foredeck_kit.errors import domain_for
from foredeck_kit.server import ServiceHost, serve
from foredeck_kit.settings import load_settings
from foredeck_kit.telemetry import Telemetry, setup_telemetry
from foredeck_orchestrator.adapters.keys import Keys
from foredeck_orchestrator.adapters.redis_agents import RedisAgents
from foredeck_orchestrator.adapters.redis_runs import RedisRuns, redis_client
from foredeck_orchestrator.clients import ConnectedAgentLoop, DownstreamClients
from foredeck_orchestrator.config import OrchestratorSettings
from foredeck_orchestrator.domain.ports import AgentLoop
from foredeck_orchestrator.runtime import Worker

__all__ = ["WORKER_SERVICE_NAME", "WorkerDeps", "WorkerHost", "build_worker", "main"]

WORKER_SERVICE_NAME = "foredeck.orchestrator.v1.Worker"


@dataclass
class WorkerDeps:
    """What a caller may supply instead of having it built from the settings."""

    telemetry: Telemetry | None = None
    redis: Redis | None = None
    loop: Callable[[], AgentLoop] | None = None


class WorkerHost(ServiceHost):
    """A health-only gRPC server around the queue worker."""

    def __init__(self, settings: OrchestratorSettings, deps: WorkerDeps, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.orchestrator_settings = settings
        self.deps = deps
        self.redis: Redis | None = None
        self.worker: Worker | None = None
        self.agent_loop: AgentLoop | None = None

    def _loop(self) -> AgentLoop:
        if self.deps.loop is not None:
            return self.deps.loop()
        s = self.orchestrator_settings
        tracer = self.telemetry.tracer_provider if self.telemetry else None
        return ConnectedAgentLoop(
            lambda: DownstreamClients.open(
                llmrouter_address=s.llmrouter_address,
                toolrunner_address=s.toolrunner_address,
                memory_address=s.memory_address,
                settings=s,
                tracer_provider=tracer,
                llm_timeout=s.llm_timeout_seconds,
                tool_timeout=s.tool_timeout_seconds,
                memory_timeout=s.memory_timeout_seconds,
            ),
            tracer_provider=tracer,
            metrics=self.metrics,
        )

    async def start(self) -> int:
        s = self.orchestrator_settings
        self.redis = self.deps.redis or redis_client(s)
        keys = Keys(s.key_prefix)
        runs = RedisRuns(
            self.redis, keys, event_retention=s.event_retention, run_ttl_seconds=s.run_ttl_seconds
        )
        agents = RedisAgents(self.redis, keys, idempotency_ttl_seconds=s.idempotency_ttl_seconds)
        self.agent_loop = self._loop()
        self.worker = Worker(
            runs,
            agents,
            self.agent_loop,
            s,
            s.delegation_signer(),
            metrics=self.metrics,
            tracer_provider=self.telemetry.tracer_provider if self.telemetry else None,
        )
        port = await super().start()
        await self.worker.start()
        return port

    async def _stop(self, grace: float | None) -> None:
        if self.worker is not None:
            await self.worker.stop()
        await super()._stop(grace)
        close = getattr(self.agent_loop, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
        if self.redis is not None and self.deps.redis is None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


def build_worker(settings: OrchestratorSettings, deps: WorkerDeps | None = None) -> WorkerHost:
    """Describe the worker; Redis opens, the port binds and consumption starts in start()."""
    deps = deps or WorkerDeps()
    holder: dict[str, WorkerHost] = {}

    def register(server: grpc.aio.Server) -> None:
        return None

    async def readiness() -> bool:
        host = holder["host"]
        assert host.redis is not None
        await host.redis.ping()
        return True

    host = WorkerHost(
        settings,
        deps,
        domain=domain_for("orchestrator"),
        register=register,
        service_names=(WORKER_SERVICE_NAME,),
        # Health and reflection only: there is no method a principal would guard.
        verifier=None,
        readiness=readiness,
        telemetry=deps.telemetry,
    )
    holder["host"] = host
    return host


def main() -> None:
    """Run the worker role until SIGTERM or SIGINT."""
    settings = load_settings(OrchestratorSettings)
    telemetry = setup_telemetry(f"{settings.service_name}-worker", settings)
    try:
        raise SystemExit(
            asyncio.run(serve(build_worker(settings, WorkerDeps(telemetry=telemetry))))
        )
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
