"""How ``foredeck up`` runs the gateway (loaded only by the stack runner)."""

from __future__ import annotations

from collections.abc import Mapping

from foredeck_stack.services import StackContext, StackService

__all__ = ["SERVICE"]


def gateway_env(ctx: StackContext) -> Mapping[str, str]:
    """The gateway's settings in the local stack: its Redis, its orchestrator, its data dir."""
    env = ctx.server_env()
    env["FOREDECK_GATEWAY_REDIS_URL"] = ctx.redis_url
    env["FOREDECK_GATEWAY_ORCHESTRATOR_ADDRESS"] = ctx.service_address("orchestrator")
    env["FOREDECK_GATEWAY_DATA_DIR"] = str(ctx.data_dir)
    return env


SERVICE = StackService(
    name="gateway",
    module="foredeck_gateway",
    env=gateway_env,
    needs=("redis", "orchestrator"),
    health_service="foredeck.gateway.v1.GatewayService",
)
