"""Domain rules without gRPC or Redis: calculator, validation, output caps, permissions."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from foredeck.toolrunner.v1 import error_reason_pb2, execution_pb2, tool_pb2
from foredeck_kit.errors import missing_shared_reasons
from foredeck_kit.principal import Principal, PrincipalKind
from foredeck_toolrunner.domain import permissions
from foredeck_toolrunner.domain.calculator import CalculatorError, evaluate
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.execution import cap_output
from foredeck_toolrunner.domain.registry import apply_mask, decode_page_token, encode_page_token
from foredeck_toolrunner.domain.validation import Limits, validate_arguments, validate_tool


def principal(*perms: str) -> Principal:
    return Principal(
        tenant_id="t",
        user_id="u",
        permissions=frozenset(perms),
        budget_ids=(),
        kind=PrincipalKind.USER,
        expires_at=datetime.now(UTC),
        token_id="x",
    )


def test_error_reasons_cover_the_shared_ones() -> None:
    assert missing_shared_reasons(error_reason_pb2.ErrorReason.keys()) == []


def test_every_reason_the_domain_raises_is_in_the_enum() -> None:
    names = set(error_reason_pb2.ErrorReason.keys())
    for factory in (
        ToolRunnerError.etag_mismatch("a", "b", 1),
        ToolRunnerError.tool_timeout("a", waiting=True),
        ToolRunnerError.approval_invalid("a"),
        ToolRunnerError.sandbox_unavailable("a"),
        ToolRunnerError.mcp_protocol_error("a"),
        ToolRunnerError.delegation_not_allowed("m", "r"),
    ):
        assert f"ERROR_REASON_{factory.reason}" in names


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 10", 1024),
        ("7 // 2", 3),
        ("-3 % 5", 2),
        ("sqrt(16) + abs(-2)", 6.0),
        ("max(1, 5, 3)", 5),
        ("round(pi, 2)", 3.14),
    ],
)
def test_calculator_evaluates(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('id')",
        "().__class__.__bases__[0].__subclasses__()",
        "open('/etc/passwd')",
        "x",
        "9 ** 9 ** 9",
        "10 ** 100000",
        "1 / 0",
        "'a' * 10",
        "lambda: 1",
        "[1, 2]",
        "sqrt(-1)",
        "1" * 2000,
    ],
)
def test_calculator_refuses(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def tool(schema: object, **runtime: str) -> tool_pb2.Tool:
    result = tool_pb2.Tool(
        builtin=tool_pb2.BuiltinRuntime(builtin_name=runtime.get("b", "calculator"))
    )
    result.definition.name = "calc"
    result.definition.description = "d"
    result.definition.parameters_json_schema = json.dumps(schema)
    return result


LIMITS = Limits(4 << 30, 900)


def test_a_valid_registration_passes() -> None:
    validate_tool(tool({"type": "object"}), LIMITS, ["calculator"], sandboxed=[])


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        ({"type": "string"}, "tool.definition.parameters_json_schema"),
        ({"type": "object", "minProperties": -1}, "tool.definition.parameters_json_schema"),
        (
            {"type": "object", "properties": {"a": {"type": "no-such-type"}}},
            "tool.definition.parameters_json_schema",
        ),
    ],
)
def test_bad_schemas_are_schema_invalid(schema: object, field: str) -> None:
    with pytest.raises(ToolRunnerError) as caught:
        validate_tool(tool(schema), LIMITS, ["calculator"], sandboxed=[])
    assert caught.value.reason == "TOOL_SCHEMA_INVALID"
    assert [f for f, _ in caught.value.field_violations] == [field]


def test_python_never_gets_a_network_grant() -> None:
    python = tool({"type": "object"}, b="python")
    python.policy.network.access = tool_pb2.NETWORK_ACCESS_ALLOWLIST
    python.policy.network.allowed_hosts.append("example.com")
    with pytest.raises(ToolRunnerError) as caught:
        validate_tool(python, LIMITS, ["python"], sandboxed=["python"])
    assert caught.value.reason == "INVALID_REQUEST"
    assert caught.value.field_violations[0][0] == "tool.policy.network"


def test_argument_violations_are_json_pointers() -> None:
    schema = json.dumps(
        {
            "type": "object",
            "properties": {"a/b": {"type": "integer"}, "list": {"items": {"type": "string"}}},
            "required": ["need"],
        }
    )
    with pytest.raises(ToolRunnerError) as caught:
        validate_arguments("calc", schema, {"a/b": "x", "list": ["ok", 3]})
    fields = sorted(f for f, _ in caught.value.field_violations)
    assert fields == ["arguments_json/a~1b", "arguments_json/list/1", "arguments_json/need"]


def output(text: str) -> execution_pb2.ToolOutcome:
    return execution_pb2.ToolOutcome(output=execution_pb2.ToolOutput(output_json=text))


def test_cap_output_truncates_at_a_character_boundary() -> None:
    outcome = output(json.dumps("é" * 5000, ensure_ascii=False))
    cap_output(outcome, tool_pb2.ToolPolicy(max_output_bytes=1024))
    assert outcome.output.truncated
    assert len(outcome.output.output_json.encode()) <= 1024
    assert set(json.loads(outcome.output.output_json)) <= {"é", '"'}
    assert outcome.output.output_bytes > 1024


def test_cap_output_fails_under_the_fail_policy() -> None:
    outcome = output(json.dumps("x" * 5000))
    policy = tool_pb2.ToolPolicy(
        max_output_bytes=1024, output_overflow=tool_pb2.OUTPUT_OVERFLOW_FAIL
    )
    cap_output(outcome, policy)
    assert outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_OUTPUT_TOO_LARGE


def test_permissions_need_the_tool_and_its_requirements() -> None:
    guarded = tool({"type": "object"})
    guarded.policy.required_permissions.append("net:egress")
    assert permissions.missing_tool_permission(principal("tools:calc"), guarded) == "net:egress"
    assert permissions.can_run(principal("tools:ca*", "net:egress"), guarded)
    assert permissions.missing_tool_permission(principal("tools:other"), guarded) == "tools:calc"


def test_apply_mask_changes_only_named_fields() -> None:
    current = tool({"type": "object"})
    current.policy.safe_to_log = True
    current.policy.timeout.FromSeconds(5)
    given = tool_pb2.Tool()
    given.policy.required_permissions.append("p")
    result = apply_mask(current, given, ["policy.required_permissions", "policy.safe_to_log"])
    assert list(result.policy.required_permissions) == ["p"]
    assert not result.policy.safe_to_log
    assert result.policy.timeout.seconds == 5
    assert result.builtin.builtin_name == "calculator"


def test_page_tokens_are_bound_to_their_query() -> None:
    token = encode_page_token("b", "q1")
    assert decode_page_token(token, "q1") == "b"
    for bad, query in ((token, "q2"), ("garbage!", "q1")):
        with pytest.raises(ToolRunnerError) as caught:
            decode_page_token(bad, query)
        assert caught.value.reason == "PAGE_TOKEN_INVALID"


def test_render_speaks_each_providers_tool_format() -> None:
    from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
    from foredeck_toolrunner.domain.registry import render

    tools = [tool({"type": "object", "properties": {"x": {"type": "string"}}})]
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    assert render(tools, svc.TOOL_SCHEMA_FORMAT_UNSPECIFIED) == ""
    assert json.loads(render(tools, svc.TOOL_SCHEMA_FORMAT_ANTHROPIC)) == [
        {"name": "calc", "description": "d", "input_schema": schema}
    ]
    assert json.loads(render(tools, svc.TOOL_SCHEMA_FORMAT_MCP)) == [
        {"name": "calc", "description": "d", "inputSchema": schema}
    ]
    document = json.loads(render(tools, svc.TOOL_SCHEMA_FORMAT_JSON_SCHEMA))
    assert document["$defs"]["calc"] == {**schema, "description": "d"}
