"""The agent a tenant gets without defining one: ``default``, created on its first run.

A run that names no agent runs ``default`` (the gateway fills the name in). When the tenant has
no agent of that name yet, the orchestrator writes this definition as its version 1, the way
CreateAgent would; from then on it is an ordinary agent the tenant can version or archive.
"""

from __future__ import annotations

from foredeck.common.v1 import agent_pb2

__all__ = ["DEFAULT_AGENT_NAME", "DEFAULT_AGENT_REQUEST_ID", "default_agent"]

DEFAULT_AGENT_NAME = "default"
DEFAULT_AGENT_REQUEST_ID = "builtin-default-agent-v1"

_SYSTEM_PROMPT = (
    "You are Foredeck's default assistant. Answer the user's task accurately and briefly. "
    "Use a tool whenever it gives a more reliable answer than reasoning alone: the calculator "
    "for arithmetic, current_time for the date and time, python for short computations. "
    "Facts remembered from earlier runs are given to you; rely on them when they answer the "
    "task."
)


def default_agent() -> agent_pb2.Agent:
    """The built-in definition: the router's default model, the safe built-in tools, memory."""
    return agent_pb2.Agent(
        name=DEFAULT_AGENT_NAME,
        description="Built-in general assistant with a calculator, the clock, sandboxed "
        "Python and long-term memory.",
        system_prompt=_SYSTEM_PROMPT,
        allowed_tools=["calculator", "current_time", "python"],
        memory_policy=agent_pb2.MemoryPolicy(
            recall_enabled=True, recall_limit=5, remember_results=True
        ),
        planner=agent_pb2.PlannerSettings(max_replans=2, max_plan_steps=8),
    )
