"""How ``foredeck up`` runs the orchestrator's two roles.

The API needs only Redis. The worker needs Redis and the three services it calls; it listens
on its own port for health, and both roles read ``FOREDECK_ORCHESTRATOR_*``.
"""

from __future__ import annotations

from foredeck_stack.services import StackContext, StackService

PREFIX = "FOREDECK_ORCHESTRATOR_"


def _api_env(ctx: StackContext) -> dict[str, str]:
    return {**ctx.server_env(PREFIX), f"{PREFIX}REDIS_URL": ctx.redis_url}


def _worker_env(ctx: StackContext) -> dict[str, str]:
    return {
        **ctx.server_env(PREFIX),
        f"{PREFIX}REDIS_URL": ctx.redis_url,
        f"{PREFIX}LLMROUTER_ADDRESS": ctx.service_address("llmrouter"),
        f"{PREFIX}TOOLRUNNER_ADDRESS": ctx.service_address("toolrunner"),
        f"{PREFIX}MEMORY_ADDRESS": ctx.service_address("memory"),
    }


API = StackService(
    name="orchestrator",
    module="foredeck_orchestrator",
    needs=("redis",),
    env=_api_env,
    health_service="foredeck.orchestrator.v1.RunService",
)

WORKER = StackService(
    name="orchestrator-worker",
    module="foredeck_orchestrator.worker",
    needs=("redis", "llmrouter", "toolrunner", "memory"),
    env=_worker_env,
    health_service="foredeck.orchestrator.v1.Worker",
)
