"""Checks of request fields and the errors the orchestrator answers with."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

import grpc

from foredeck.common.v1 import agent_pb2, usage_pb2
from foredeck_kit.errors import ServiceError

__all__ = [
    "check_agent",
    "check_budget",
    "check_labels",
    "check_name",
    "check_page_size",
    "check_request_id",
    "decode_page_token",
    "encode_page_token",
    "not_found",
    "precondition",
]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_AGENT_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_RUN_ID = re.compile(r"r_[0-9a-f]{32}")
MAX_INPUT_BYTES = 256 * 1024


def invalid(field: str, description: str) -> ServiceError:
    """INVALID_ARGUMENT INVALID_REQUEST naming one field."""
    return ServiceError.invalid_request([(field, description)])


def not_found(reason: str, message: str, **metadata: object) -> ServiceError:
    """NOT_FOUND with the given reason."""
    return ServiceError(grpc.StatusCode.NOT_FOUND, reason, message, metadata=metadata)


def precondition(reason: str, message: str, **metadata: object) -> ServiceError:
    """FAILED_PRECONDITION with the given reason."""
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, metadata=metadata)


def check_request_id(value: str, field: str = "request_id") -> None:
    """1-64 characters of ``[A-Za-z0-9._:-]``."""
    if not _REQUEST_ID.fullmatch(value):
        raise invalid(field, "1-64 characters of [A-Za-z0-9._:-]")


def check_name(value: str, field: str = "agent_name") -> None:
    """An agent name: 1-63 lowercase letters, digits and '-', starting with a letter."""
    if not _AGENT_NAME.fullmatch(value):
        raise invalid(field, "1-63 characters of [a-z0-9-], starting with a letter")


def check_run_id(value: str, field: str = "run_id") -> None:
    """A run id as the orchestrator makes them; anything else names no run."""
    if not value:
        raise invalid(field, "required")
    if not _RUN_ID.fullmatch(value):
        raise not_found("RUN_NOT_FOUND", "run not found", runId=value[:80])


def check_labels(labels: Mapping[str, str], field: str, limit: int = 32) -> None:
    """Label keys and values as the contracts define them."""
    if len(labels) > limit:
        raise invalid(field, f"at most {limit} entries")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise invalid(f"{field}[{key[:64]}]", "key: 1-63 characters of [a-z0-9_.-]")
        if len(value) > 256:
            raise invalid(f"{field}[{key}]", "value: at most 256 characters")


def check_budget(budget: usage_pb2.Budget, field: str) -> None:
    """Every cap zero or positive; BUDGET_INVALID otherwise."""
    bad = [
        name
        for name, value in (
            ("max_steps", budget.max_steps),
            ("max_tokens", budget.max_tokens),
            ("max_cost_usd_micros", budget.max_cost_usd_micros),
            ("max_sub_agent_depth", budget.max_sub_agent_depth),
            ("max_sub_agents", budget.max_sub_agents),
        )
        if value < 0
    ]
    if budget.HasField("max_wall_time") and budget.max_wall_time.ToNanoseconds() < 0:
        bad.append("max_wall_time")
    if bad:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "BUDGET_INVALID",
            "budget caps must be zero or positive",
            field_violations=[(f"{field}.{name}", "must be zero or positive") for name in bad],
        )


def narrow_budget(agent: usage_pb2.Budget, override: usage_pb2.Budget) -> usage_pb2.Budget:
    """The agent's caps tightened by a run's override; BUDGET_INVALID if it loosens one."""
    check_budget(override, "budget")
    effective = usage_pb2.Budget()
    effective.CopyFrom(agent)
    loosened: list[str] = []
    for name in (
        "max_steps",
        "max_tokens",
        "max_cost_usd_micros",
        "max_sub_agent_depth",
        "max_sub_agents",
    ):
        want = getattr(override, name)
        have = getattr(agent, name)
        if want:
            if have and want > have:
                loosened.append(name)
            else:
                setattr(effective, name, want)
    if override.HasField("max_wall_time") and override.max_wall_time.ToNanoseconds() > 0:
        want_ns = override.max_wall_time.ToNanoseconds()
        have_ns = agent.max_wall_time.ToNanoseconds() if agent.HasField("max_wall_time") else 0
        if have_ns and want_ns > have_ns:
            loosened.append("max_wall_time")
        else:
            effective.max_wall_time.CopyFrom(override.max_wall_time)
    if loosened:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "BUDGET_INVALID",
            "a run's budget may tighten the agent's caps, never loosen them",
            field_violations=[
                (f"budget.{name}", "larger than the agent's cap") for name in loosened
            ],
        )
    return effective


def check_agent(agent: agent_pb2.Agent, field: str = "agent") -> None:
    """The settable fields of an agent definition."""
    check_name(agent.name, f"{field}.name")
    if len(agent.description) > 1024:
        raise invalid(f"{field}.description", "at most 1,024 characters")
    if len(agent.system_prompt.encode()) > 64 * 1024:
        raise invalid(f"{field}.system_prompt", "at most 64 KiB")
    if len(agent.model) > 128:
        raise invalid(f"{field}.model", "at most 128 characters")
    if agent.HasField("temperature") and not 0 <= agent.temperature <= 2:
        raise invalid(f"{field}.temperature", "between 0 and 2")
    if agent.max_output_tokens < 0:
        raise invalid(f"{field}.max_output_tokens", "zero or positive")
    tools = list(agent.allowed_tools)
    if len(tools) > 128 or len(set(tools)) != len(tools):
        raise invalid(f"{field}.allowed_tools", "at most 128 distinct names")
    for i, tool in enumerate(tools):
        if not _TOOL_NAME.fullmatch(tool):
            raise invalid(f"{field}.allowed_tools[{i}]", "1-64 characters of [a-zA-Z0-9_-]")
    for i, sub in enumerate(agent.allowed_sub_agents):
        check_name(sub, f"{field}.allowed_sub_agents[{i}]")
    policy = agent.memory_policy
    if policy.recall_limit < 0 or policy.working_memory_max_tokens < 0:
        raise invalid(f"{field}.memory_policy", "limits must be zero or positive")
    planner = agent.planner
    if planner.max_replans < 0 or not 0 <= planner.max_plan_steps <= 100:
        raise invalid(f"{field}.planner", "max_replans >= 0 and max_plan_steps 0-100")
    check_budget(agent.budget, f"{field}.budget")
    for i, tool in enumerate(agent.approval_policy.tool_names):
        if tool not in tools:
            raise invalid(f"{field}.approval_policy.tool_names[{i}]", "not in allowed_tools")
    check_labels(agent.labels, f"{field}.labels")


def check_page_size(size: int, default: int, maximum: int, field: str = "page_size") -> int:
    """AIP-158: 0 is the default, above the maximum is the maximum, negative is invalid."""
    if size < 0:
        raise invalid(field, "must not be negative")
    return min(size or default, maximum)


def encode_page_token(query: str, position: Any) -> str:
    """An opaque token bound to the query it pages."""
    raw = json.dumps({"q": query, "p": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: str) -> Any:
    """The position a token holds; PAGE_TOKEN_INVALID unless it is one of ``query``'s."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if data["q"] != query:
            raise ValueError("another query")
        return data["p"]
    except (ValueError, KeyError, TypeError):
        raise ServiceError.page_token_invalid() from None
