"""Plans with sub-agent steps: offered only to agents that may start sub-agents, checked
against ``allowed_sub_agents`` before anything runs."""

from __future__ import annotations

import json

import pytest

from foredeck.common.v1 import run_event_pb2
from foredeck_orchestrator.domain.loop.plan import PlanRejected, parse_plan, plan_schema
from foredeck_orchestrator.domain.waiting import approval_id_for, run_id_of_approval


def _plan(agent: str, task: str = "count the stars") -> str:
    step = {"kind": "sub_agent", "description": "delegate", "agent_name": agent, "input": task}
    return json.dumps({"steps": [step]})


def test_the_schema_offers_sub_agent_steps_only_when_the_agent_may_start_them() -> None:
    plain = plan_schema(5)["properties"]["steps"]["items"]["properties"]
    with_children = plan_schema(5, sub_agents=True)["properties"]["steps"]["items"]["properties"]
    assert "sub_agent" not in plain["kind"]["enum"]
    assert "sub_agent" in with_children["kind"]["enum"]
    assert "agent_name" in with_children


def test_a_sub_agent_step_names_an_allowed_agent_and_a_task() -> None:
    plan = parse_plan(
        _plan("helper"),
        plan_step_id="s2",
        allowed_tools=(),
        max_steps=5,
        allowed_sub_agents=("helper",),
    )
    (action,) = plan.actions
    assert action.kind == run_event_pb2.STEP_KIND_SUB_AGENT
    assert (action.step_id, action.sub_agent_name) == ("s2.1", "helper")
    assert plan.to_proto().steps[0].sub_agent_input == "count the stars"
    for text in (_plan("stranger"), _plan("helper", task="")):
        with pytest.raises(PlanRejected) as rejected:
            parse_plan(
                text,
                plan_step_id="s2",
                allowed_tools=(),
                max_steps=5,
                allowed_sub_agents=("helper",),
            )
        assert rejected.value.error.reason == "PLAN_INVALID"
    with pytest.raises(PlanRejected):
        parse_plan(_plan("helper"), plan_step_id="s2", allowed_tools=(), max_steps=5)


def test_an_approval_id_names_its_run() -> None:
    run_id = "r_" + "ab" * 16
    assert run_id_of_approval(approval_id_for(run_id, "s2.1")) == run_id
    assert run_id_of_approval(approval_id_for(run_id, "s" * 100)) == run_id
    assert len(approval_id_for(run_id, "s" * 100)) <= 64
    assert run_id_of_approval("a_nothex.s1") is None
    assert run_id_of_approval("r_" + "ab" * 16) is None
