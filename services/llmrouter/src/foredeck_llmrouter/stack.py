"""How `foredeck up` runs the llmrouter: with the stack's Redis, on the port it picks."""

from __future__ import annotations

from foredeck_stack.services import StackContext, StackService


def _env(ctx: StackContext) -> dict[str, str]:
    return {**ctx.server_env(), "FOREDECK_LLMROUTER_REDIS_URL": ctx.redis_url}


SERVICE = StackService(
    name="llmrouter",
    module="foredeck_llmrouter",
    env=_env,
    needs=("redis",),
    health_service="foredeck.llmrouter.v1.LlmRouterService",
)
