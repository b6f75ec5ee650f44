"""The text the loop sends to models: planning, replanning, reasoning and the final answer.

Every prompt is built only from the run, its agent and what the journal holds, with no clock
or random input, so a resumed run sends byte-identical requests and llmrouter answers a
repeated request id from its record instead of generating (and billing) again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from foredeck.common.v1 import chat_pb2, memory_pb2

__all__ = [
    "Observation",
    "planner_system_prompt",
    "planning_message",
    "reasoning_message",
    "synthesis_message",
    "user_message",
]

_PLANNER = """\
You plan how to complete the user's task. Answer with one JSON object:
{"rationale": "<why this plan>", "steps": [<step>, ...]}
Each step is either
  {"kind": "tool_call", "description": "<what it does>", "tool_name": "<tool>", "arguments": {...}}
or
  {"kind": "reason", "description": "<what to work out>"}
Add "replan_after": true to a step when what comes next depends on its result; the plan is then
revised once that step is done. Use at most {max_steps} steps, and only these tools: {tools}.
Return an empty steps list when the task can be answered directly."""


@dataclass(frozen=True, slots=True)
class Observation:
    """What one executed step produced, as later prompts show it."""

    step_id: str
    description: str
    tool_name: str
    content: str
    is_error: bool


def user_message(text: str) -> chat_pb2.ChatMessage:
    """A user turn holding ``text``."""
    return chat_pb2.ChatMessage(
        role=chat_pb2.ROLE_USER, parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))]
    )


def planner_system_prompt(agent_prompt: str, tools: Sequence[str], max_steps: int) -> str:
    """The agent's own instructions followed by the planner's."""
    planner = _PLANNER.replace("{max_steps}", str(max_steps)).replace(
        "{tools}", ", ".join(sorted(tools)) if tools else "(none)"
    )
    return f"{agent_prompt}\n\n{planner}" if agent_prompt else planner


def _memories(memories: Sequence[memory_pb2.RecalledMemory]) -> str:
    if not memories:
        return ""
    lines = "\n".join(f"- {item.memory.content}" for item in memories)
    return f"\n\nWhat you remember that may help:\n{lines}"


def _observations(observations: Sequence[Observation]) -> str:
    if not observations:
        return ""
    lines = []
    for item in observations:
        label = f"{item.description} [{item.tool_name}]" if item.tool_name else item.description
        outcome = "FAILED: " if item.is_error else ""
        lines.append(f"- {item.step_id} {label}: {outcome}{item.content}")
    return "\n\nSteps done so far:\n" + "\n".join(lines)


def planning_message(
    task: str,
    memories: Sequence[memory_pb2.RecalledMemory],
    observations: Sequence[Observation],
    rejections: Sequence[str],
) -> chat_pb2.ChatMessage:
    """The user turn of a PLAN or REPLAN call."""
    text = f"Task:\n{task}{_memories(memories)}{_observations(observations)}"
    if rejections:
        text += "\n\nEarlier plans were rejected:\n" + "\n".join(f"- {r}" for r in rejections)
    if observations or rejections:
        text += "\n\nPlan the remaining steps."
    return user_message(text)


def reasoning_message(
    task: str,
    memories: Sequence[memory_pb2.RecalledMemory],
    observations: Sequence[Observation],
    step: str,
) -> chat_pb2.ChatMessage:
    """The user turn of a REASON step."""
    return user_message(
        f"Task:\n{task}{_memories(memories)}{_observations(observations)}"
        f"\n\nDo this step and answer with its result only:\n{step}"
    )


def synthesis_message(
    task: str,
    memories: Sequence[memory_pb2.RecalledMemory],
    observations: Sequence[Observation],
) -> chat_pb2.ChatMessage:
    """The user turn of the SYNTHESIZE step."""
    return user_message(
        f"Task:\n{task}{_memories(memories)}{_observations(observations)}"
        "\n\nWrite the final answer to the task."
    )


def tool_content(output_json: str) -> str:
    """A tool's JSON output as prompts show it: compact, strings unquoted."""
    try:
        value = json.loads(output_json)
    except ValueError:
        return output_json
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
