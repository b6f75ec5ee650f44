"""The plan a model writes: its JSON Schema, and the checks it passes before anything runs.

A plan is structured output: a JSON object with a ``steps`` array, each step a tool call (tool
name plus an arguments object) or a reasoning step. Parsing is deterministic, so a run resumed
from its journal re-reads the recorded model output and gets the same plan back, step ids
included: they are derived from the id of the step that wrote the plan (``<plan step>.<n>``),
never taken from the model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from foredeck.common.v1 import error_pb2, journal_pb2, run_event_pb2
from foredeck_orchestrator.domain.loop.errors import Code, make_error

__all__ = [
    "DEFAULT_MAX_PLAN_STEPS",
    "PlanRejected",
    "PlannedAction",
    "ValidPlan",
    "parse_plan",
    "plan_schema",
]

DEFAULT_MAX_PLAN_STEPS = 20
_MAX_DESCRIPTION = 1024
_MAX_RATIONALE = 4096

STEP_TOOL = "tool_call"
STEP_REASON = "reason"
STEP_SUB_AGENT = "sub_agent"


def plan_schema(max_steps: int, sub_agents: bool = False) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) a plan must satisfy, as sent to llmrouter.

    With ``sub_agents`` (the agent may start some), a step may also be a ``sub_agent`` step
    naming the agent (``agent_name``) and its task (``input``).
    """
    schema = _base_schema(max_steps)
    if sub_agents:
        item = schema["properties"]["steps"]["items"]
        item["properties"]["kind"]["enum"].append(STEP_SUB_AGENT)
        item["properties"]["agent_name"] = {"type": "string"}
        item["properties"]["input"] = {"type": "string"}
    return schema


def _base_schema(max_steps: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "rationale": {"type": "string"},
            "steps": {
                "type": "array",
                "maxItems": max_steps,
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string", "enum": [STEP_TOOL, STEP_REASON]},
                        "description": {"type": "string"},
                        "tool_name": {"type": "string"},
                        # An object; JSON text of one is accepted too, as some models quote it.
                        "arguments": {"type": ["object", "string"]},
                        "replan_after": {"type": "boolean"},
                    },
                    "required": ["kind", "description"],
                },
            },
        },
        "required": ["steps"],
    }


@dataclass(frozen=True, slots=True)
class PlannedAction:
    """One step of a valid plan, ready to execute.

    ``replan_after`` is the model asking to see this step's result before deciding what comes
    next: the run replans once the step is done.
    """

    step_id: str
    kind: run_event_pb2.StepKind.ValueType
    description: str
    tool_name: str = ""
    arguments_json: str = ""
    replan_after: bool = False
    sub_agent_name: str = ""
    sub_agent_input: str = ""


@dataclass(frozen=True, slots=True)
class ValidPlan:
    """A plan that passed every check."""

    actions: tuple[PlannedAction, ...]
    rationale: str

    def to_proto(self) -> journal_pb2.Plan:
        """The plan as the journal records it."""
        return journal_pb2.Plan(
            rationale=self.rationale,
            steps=[
                journal_pb2.PlannedStep(
                    step_id=action.step_id,
                    description=action.description,
                    kind=action.kind,
                    tool_name=action.tool_name,
                    arguments_json=action.arguments_json,
                    sub_agent_name=action.sub_agent_name,
                    sub_agent_input=action.sub_agent_input,
                )
                for action in self.actions
            ],
        )


@functools.lru_cache(maxsize=128)
def _validator(max_steps: int, sub_agents: bool = False) -> Draft202012Validator:
    return Draft202012Validator(plan_schema(max_steps, sub_agents))


class PlanRejected(Exception):
    """The model's plan broke a rule; nothing of it runs. ``plan`` holds what could be read."""

    def __init__(self, error: error_pb2.Error, plan: journal_pb2.Plan | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.plan = plan


def _invalid(step_id: str, message: str, **metadata: str) -> error_pb2.Error:
    return make_error(
        Code.FAILED_PRECONDITION, "PLAN_INVALID", message, {"stepId": step_id, **metadata}
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _arguments(step: dict[str, Any]) -> str | None:
    """The step's arguments as the JSON text of an object, or None when they are not one."""
    value = step.get("arguments", {})
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def parse_plan(
    text: str,
    *,
    plan_step_id: str,
    allowed_tools: Collection[str],
    max_steps: int,
    allowed_sub_agents: Collection[str] = (),
) -> ValidPlan:
    """Read and check the model's plan; raise :class:`PlanRejected` when it must not run.

    Checks, in order: JSON; the plan schema; at most ``max_steps`` steps; every tool step names
    a tool in ``allowed_tools`` (else TOOL_NOT_ALLOWED) and carries an arguments object.
    """
    try:
        document = json.loads(text)
    except ValueError:
        raise PlanRejected(_invalid(plan_step_id, "the plan is not JSON")) from None
    errors = sorted(
        _validator(max_steps, bool(allowed_sub_agents)).iter_errors(document),
        key=lambda error: list(error.absolute_path),
    )
    if errors:
        first = errors[0]
        pointer = "/" + "/".join(str(part) for part in first.absolute_path)
        if first.validator == "maxItems" and list(first.absolute_path) == ["steps"]:
            raise PlanRejected(
                _invalid(
                    plan_step_id,
                    f"the plan has more than {max_steps} steps",
                    maxPlanSteps=str(max_steps),
                )
            )
        raise PlanRejected(
            _invalid(
                plan_step_id,
                f"the plan does not match the plan schema at {pointer}",
                violationPath=pointer,
            )
        )
    allowed = set(allowed_tools)
    actions: list[PlannedAction] = []
    rejection: error_pb2.Error | None = None
    for number, step in enumerate(document["steps"], start=1):
        step_id = f"{plan_step_id}.{number}"
        description = _clip(str(step["description"]), _MAX_DESCRIPTION)
        if step["kind"] == STEP_REASON:
            actions.append(
                PlannedAction(
                    step_id,
                    run_event_pb2.STEP_KIND_REASON,
                    description,
                    replan_after=bool(step.get("replan_after", False)),
                )
            )
            continue
        if step["kind"] == STEP_SUB_AGENT:
            agent_name = str(step.get("agent_name", ""))
            task = str(step.get("input", ""))
            actions.append(
                PlannedAction(
                    step_id,
                    run_event_pb2.STEP_KIND_SUB_AGENT,
                    description,
                    replan_after=bool(step.get("replan_after", False)),
                    sub_agent_name=agent_name,
                    sub_agent_input=task,
                )
            )
            if rejection is None and agent_name not in set(allowed_sub_agents):
                rejection = _invalid(
                    plan_step_id,
                    f"step {number} starts an agent this agent may not start",
                    plannedStep=step_id,
                )
            elif rejection is None and not task:
                rejection = _invalid(
                    plan_step_id, f"step {number} gives its sub-agent no task", plannedStep=step_id
                )
            continue
        tool_name = str(step.get("tool_name", ""))
        arguments = _arguments(step)
        actions.append(
            PlannedAction(
                step_id,
                run_event_pb2.STEP_KIND_TOOL_CALL,
                description,
                tool_name=tool_name,
                arguments_json=arguments if arguments is not None else "",
                replan_after=bool(step.get("replan_after", False)),
            )
        )
        if rejection is not None:
            continue
        if not tool_name:
            rejection = _invalid(
                plan_step_id, f"step {number} calls a tool without naming it", plannedStep=step_id
            )
        elif tool_name not in allowed:
            rejection = make_error(
                Code.PERMISSION_DENIED,
                "TOOL_NOT_ALLOWED",
                f"step {number} calls a tool the agent may not use",
                {"toolName": _clip(tool_name, 64), "stepId": plan_step_id, "plannedStep": step_id},
            )
        elif arguments is None:
            rejection = _invalid(
                plan_step_id,
                f"the arguments of step {number} are not a JSON object",
                plannedStep=step_id,
            )
    plan = ValidPlan(tuple(actions), _clip(str(document.get("rationale", "")), _MAX_RATIONALE))
    if rejection is not None:
        raise PlanRejected(rejection, plan.to_proto())
    return plan
