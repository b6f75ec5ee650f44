"""Plan validation: what a model's plan must satisfy before any of it runs."""

from __future__ import annotations

import json

import pytest

from foredeck.common.v1 import run_event_pb2
from foredeck_orchestrator.domain.loop.plan import PlanRejected, parse_plan, plan_schema
from services.orchestrator.tests.loop_support import plan_text, reason_step, tool_step

TOOLS = ("calculator", "search")


def rejection(text: str, max_steps: int = 5) -> PlanRejected:
    with pytest.raises(PlanRejected) as caught:
        parse_plan(text, plan_step_id="s2", allowed_tools=TOOLS, max_steps=max_steps)
    return caught.value


def test_valid_plan_gets_step_ids_derived_from_the_plan_step() -> None:
    plan = parse_plan(
        plan_text(
            tool_step("calculator", {"b": 2, "a": 1}, replan_after=True),
            reason_step("explain the result"),
            rationale="add then explain",
        ),
        plan_step_id="s2",
        allowed_tools=TOOLS,
        max_steps=5,
    )
    assert [a.step_id for a in plan.actions] == ["s2.1", "s2.2"]
    assert [a.kind for a in plan.actions] == [
        run_event_pb2.STEP_KIND_TOOL_CALL,
        run_event_pb2.STEP_KIND_REASON,
    ]
    first = plan.actions[0]
    assert first.tool_name == "calculator"
    assert json.loads(first.arguments_json) == {"a": 1, "b": 2}
    assert first.replan_after is True
    assert plan.actions[1].replan_after is False
    proto = plan.to_proto()
    assert proto.rationale == "add then explain"
    assert [s.step_id for s in proto.steps] == ["s2.1", "s2.2"]


def test_arguments_given_as_json_text_are_accepted() -> None:
    step = tool_step("search", {})
    step["arguments"] = '{"query": "weather"}'
    plan = parse_plan(plan_text(step), plan_step_id="s1", allowed_tools=TOOLS, max_steps=5)
    assert json.loads(plan.actions[0].arguments_json) == {"query": "weather"}


def test_an_empty_plan_is_valid() -> None:
    plan = parse_plan(plan_text(), plan_step_id="s1", allowed_tools=TOOLS, max_steps=5)
    assert plan.actions == ()


def test_a_tool_outside_allowed_tools_is_rejected_as_not_allowed() -> None:
    rejected = rejection(plan_text(tool_step("calculator", {}), tool_step("rm_rf", {"path": "/"})))
    assert rejected.error.reason == "TOOL_NOT_ALLOWED"
    assert rejected.error.domain == "orchestrator.foredeck.dev"
    assert rejected.error.metadata["toolName"] == "rm_rf"
    assert rejected.error.metadata["plannedStep"] == "s2.2"
    # The rejected plan is kept for the journal, so a reader sees what was refused.
    assert rejected.plan is not None
    assert [s.tool_name for s in rejected.plan.steps] == ["calculator", "rm_rf"]


def test_output_that_is_not_json_is_invalid() -> None:
    rejected = rejection("Sure! First I will call the calculator.")
    assert rejected.error.reason == "PLAN_INVALID"
    assert rejected.error.metadata["stepId"] == "s2"


def test_a_step_without_kind_breaks_the_schema() -> None:
    rejected = rejection(json.dumps({"steps": [{"description": "do it"}]}))
    assert rejected.error.reason == "PLAN_INVALID"
    assert rejected.error.metadata["violationPath"] == "/steps/0"


def test_more_steps_than_allowed_is_invalid() -> None:
    rejected = rejection(plan_text(*[reason_step(f"think {i}") for i in range(4)]), max_steps=3)
    assert rejected.error.reason == "PLAN_INVALID"
    assert rejected.error.metadata["maxPlanSteps"] == "3"


@pytest.mark.parametrize("arguments", ["[1, 2]", "not json", "42"])
def test_arguments_that_are_not_a_json_object_are_invalid(arguments: str) -> None:
    step = tool_step("calculator", {})
    step["arguments"] = arguments
    rejected = rejection(plan_text(step))
    assert rejected.error.reason == "PLAN_INVALID"
    assert rejected.error.metadata["plannedStep"] == "s2.1"


def test_a_tool_step_without_a_tool_name_is_invalid() -> None:
    rejected = rejection(plan_text({"kind": "tool_call", "description": "call something"}))
    assert rejected.error.reason == "PLAN_INVALID"


def test_the_schema_caps_the_step_count() -> None:
    assert plan_schema(7)["properties"]["steps"]["maxItems"] == 7
