"""How ``foredeck up`` runs the memory service: after Redis and the graph (ArcadeDB over Bolt).

llmrouter is optional: when the stack runs it before memory, summaries go through it.
"""

from __future__ import annotations

from foredeck_stack.services import StackContext, StackService


def _env(ctx: StackContext) -> dict[str, str]:
    env = {
        **ctx.server_env(),
        "FOREDECK_MEMORY_REDIS_URL": ctx.redis_url,
        "FOREDECK_MEMORY_NEO4J_URI": ctx.bolt_uri,
        "FOREDECK_MEMORY_NEO4J_USER": ctx.bolt_user,
        "FOREDECK_MEMORY_NEO4J_PASSWORD": ctx.bolt_password,
        "FOREDECK_MEMORY_NEO4J_DATABASE": ctx.graph_database,
        "FOREDECK_MEMORY_EDGE_PATH": str(ctx.data_dir / "memory" / "vectors"),
    }
    if "llmrouter" in ctx.services:
        env["FOREDECK_MEMORY_LLMROUTER_ADDRESS"] = ctx.services["llmrouter"]
    return env


SERVICE = StackService(
    name="memory",
    module="foredeck_memory",
    needs=("redis", "graph"),
    env=_env,
    health_service="foredeck.memory.v1.LongTermMemoryService",
)
