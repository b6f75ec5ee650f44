"""``build_server(settings, deps)``: the API role's server, for ``main()`` and the tests."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import grpc
from redis.asyncio import Redis

from foredeck.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from foredeck_kit.errors import domain_for
from foredeck_kit.server import ServiceHost
from foredeck_kit.telemetry import Telemetry
from foredeck_orchestrator.adapters.keys import Keys
from foredeck_orchestrator.adapters.redis_agents import RedisAgents
from foredeck_orchestrator.adapters.redis_runs import RedisRuns, redis_client
from foredeck_orchestrator.config import OrchestratorSettings
from foredeck_orchestrator.servicer import (
    AGENT_SERVICE,
    GATEWAY_ONLY_METHODS,
    RUN_SERVICE,
    AgentServicer,
    RunServicer,
)

__all__ = ["SERVICE_NAMES", "ApiDeps", "ApiHost", "build_server"]

SERVICE_NAMES = (AGENT_SERVICE, RUN_SERVICE)


@dataclass
class ApiDeps:
    """What a caller may supply instead of having it built from the settings."""

    telemetry: Telemetry | None = None
    redis: Redis | None = None


class ApiHost(ServiceHost):
    """The kit's host plus the Redis client the servicers share."""

    def __init__(self, settings: OrchestratorSettings, deps: ApiDeps, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.orchestrator_settings = settings
        self.deps = deps
        self.redis: Redis | None = None
        self.watch_redis: Redis | None = None
        self.runs: RedisRuns | None = None
        self.agents: RedisAgents | None = None

    async def start(self) -> int:
        s = self.orchestrator_settings
        self.redis = self.deps.redis or redis_client(s)
        if self.deps.redis is None:
            self.watch_redis = redis_client(s, s.redis_watch_connections)
        keys = Keys(s.key_prefix)
        self.runs = RedisRuns(
            self.redis,
            keys,
            event_retention=s.event_retention,
            run_ttl_seconds=s.run_ttl_seconds,
            watch_redis=self.watch_redis,
        )
        self.agents = RedisAgents(
            self.redis, keys, idempotency_ttl_seconds=s.idempotency_ttl_seconds
        )
        return await super().start()

    async def _stop(self, grace: float | None) -> None:
        await super()._stop(grace)
        if self.deps.redis is None:
            for client in (self.redis, self.watch_redis):
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.aclose()


def build_server(settings: OrchestratorSettings, deps: ApiDeps | None = None) -> ApiHost:
    """Describe the API role's server; Redis opens and the port binds in ``start()``."""
    deps = deps or ApiDeps()
    holder: dict[str, ApiHost] = {}

    def register(server: grpc.aio.Server) -> None:
        host = holder["host"]
        assert host.runs is not None
        assert host.agents is not None
        pb_grpc.add_AgentServiceServicer_to_server(AgentServicer(host.agents), server)
        pb_grpc.add_RunServiceServicer_to_server(
            RunServicer(
                host.runs,
                host.agents,
                max_queue_length=settings.max_queue_length,
                stopping=host.stopping,
                tracer_provider=host.telemetry.tracer_provider if host.telemetry else None,
            ),
            server,
        )

    async def readiness() -> bool:
        host = holder["host"]
        assert host.redis is not None
        await host.redis.ping()
        return True

    host = ApiHost(
        settings,
        deps,
        domain=domain_for("orchestrator"),
        register=register,
        service_names=SERVICE_NAMES,
        verifier=settings.principal_verifier(gateway_only_methods=GATEWAY_ONLY_METHODS),
        readiness=readiness,
        telemetry=deps.telemetry,
    )
    holder["host"] = host
    return host
