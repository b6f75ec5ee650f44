"""How ``foredeck up`` runs the tool runner (loaded only by the stack runner)."""

from __future__ import annotations

from collections.abc import Mapping

from foredeck_stack.services import StackContext, StackService

__all__ = ["SERVICE"]


def _env(ctx: StackContext) -> Mapping[str, str]:
    env = ctx.server_env()
    env["FOREDECK_TOOLRUNNER_REDIS_URL"] = ctx.redis_url
    return env


SERVICE = StackService(
    name="toolrunner",
    module="foredeck_toolrunner",
    env=_env,
    needs=("redis",),
    health_service="foredeck.toolrunner.v1.ToolRunnerService",
)
