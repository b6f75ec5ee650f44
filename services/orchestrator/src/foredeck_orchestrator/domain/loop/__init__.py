"""The agent loop: recall, plan, act, observe, replan, synthesise, remember.

:class:`PlanActLoop` implements :class:`~foredeck_orchestrator.domain.ports.AgentLoop` over the
downstream ports in :mod:`.ports`; :mod:`.plan` holds the plan schema and its validation,
:mod:`.budget` the budget accounting and :mod:`.prompts` the text sent to models.
"""

from foredeck_orchestrator.domain.loop.engine import LoopSettings, PlanActLoop
from foredeck_orchestrator.domain.loop.errors import (
    CircuitOpenError,
    DownstreamError,
    RunFailed,
)
from foredeck_orchestrator.domain.loop.ports import (
    CallOptions,
    Downstreams,
    LlmRouter,
    Memory,
    ToolRunner,
)

__all__ = [
    "CallOptions",
    "CircuitOpenError",
    "DownstreamError",
    "Downstreams",
    "LlmRouter",
    "LoopSettings",
    "Memory",
    "PlanActLoop",
    "RunFailed",
    "ToolRunner",
]
