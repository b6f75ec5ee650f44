"""Spans and metrics of tool calls: arguments only for tools safe to log, kills by cause."""

from __future__ import annotations

import json
import uuid

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc

from .conftest import Runner


def spans_named(runner: Runner, name: str) -> list[dict[str, object]]:
    return [
        dict(span.attributes or {})
        for span in runner.spans.get_finished_spans()
        if span.name == name
    ]


async def test_span_records_arguments_only_when_safe_to_log(toolrunner: Runner) -> None:
    await toolrunner.runner.ExecuteTool(
        svc.ExecuteToolRequest(
            tool_name="calculator",
            arguments_json=json.dumps({"expression": "1+1"}),
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=toolrunner.md(),
    )
    secret_code = "print('do not log me')"
    await toolrunner.runner.ExecuteTool(
        svc.ExecuteToolRequest(
            tool_name="python",
            arguments_json=json.dumps({"code": secret_code}),
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=toolrunner.md(),
        timeout=60,
    )
    spans = spans_named(toolrunner, "toolrunner.execute_tool")
    by_tool = {span["tool.name"]: span for span in spans}
    assert by_tool["calculator"]["tool.outcome"] == "success"
    assert by_tool["calculator"]["tool.arguments"] == json.dumps({"expression": "1+1"})
    assert by_tool["python"]["tool.outcome"] == "success"
    assert "tool.arguments" not in by_tool["python"]
    assert all(secret_code not in json.dumps(span, default=str) for span in spans)


async def test_sandbox_kills_are_counted_by_cause(toolrunner: Runner) -> None:
    tool = tool_pb2.Tool(builtin=tool_pb2.BuiltinRuntime(builtin_name="python"))
    tool.definition.name = "quick_python"
    tool.definition.description = "python with a short timeout"
    tool.definition.parameters_json_schema = json.dumps(
        {"type": "object", "properties": {"code": {"type": "string"}}}
    )
    tool.policy.timeout.FromMilliseconds(300)
    await toolrunner.registry.RegisterTool(
        svc.RegisterToolRequest(request_id="r1", tool=tool), metadata=toolrunner.md()
    )
    reply = await toolrunner.runner.ExecuteTool(
        svc.ExecuteToolRequest(
            tool_name="quick_python",
            arguments_json=json.dumps({"code": "while True:\n    pass"}),
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=toolrunner.md(),
        timeout=60,
    )
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_TIMEOUT
    registry = toolrunner.service.deps.metrics.registry
    assert registry.get_sample_value("toolrunner_sandbox_kills_total", {"cause": "timeout"}) == 1.0
    assert (
        registry.get_sample_value(
            "agent_tool_calls_total", {"tool_name": "quick_python", "success": "false"}
        )
        == 1.0
    )
    assert (
        registry.get_sample_value(
            "toolrunner_tool_call_seconds_count",
            {"tool_name": "quick_python", "outcome": "timeout"},
        )
        == 1.0
    )


async def test_the_sandbox_in_use_is_published(toolrunner: Runner) -> None:
    capabilities = toolrunner.service.deps.sandbox.capabilities
    value = toolrunner.service.deps.metrics.registry.get_sample_value(
        "toolrunner_sandbox_info",
        {"kind": capabilities.kind, "seccomp": "true" if capabilities.seccomp else "false"},
    )
    assert value == 1.0
