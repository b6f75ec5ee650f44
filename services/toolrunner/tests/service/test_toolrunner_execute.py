"""ExecuteTool over real gRPC and Redis: checks in order, typed outcomes, limits, the ledger."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping

import grpc
import pytest

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck_kit.approval import arguments_json_digest
from foredeck_kit.errors import error_details
from foredeck_kit.idempotency import tool_effect_key

from .conftest import Runner, approval_signer


def execute(
    name: str, arguments: object, key: str | None = None, **extra: object
) -> svc.ExecuteToolRequest:
    return svc.ExecuteToolRequest(
        tool_name=name,
        arguments_json=json.dumps(arguments),
        idempotency_key=key or uuid.uuid4().hex,
        **extra,  # type: ignore[arg-type]
    )


async def register_builtin(
    runner: Runner, name: str, builtin: str, schema: Mapping[str, object], **policy: object
) -> tool_pb2.Tool:
    tool = tool_pb2.Tool(builtin=tool_pb2.BuiltinRuntime(builtin_name=builtin))
    tool.definition.name = name
    tool.definition.description = f"{builtin} under another policy"
    tool.definition.parameters_json_schema = json.dumps(schema)
    for key, value in policy.items():
        field = getattr(tool.policy, key)
        if hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        elif isinstance(value, list):
            field.extend(value)
        else:
            setattr(tool.policy, key, value)
    reply = await runner.registry.RegisterTool(
        svc.RegisterToolRequest(request_id=uuid.uuid4().hex, tool=tool), metadata=runner.md()
    )
    return reply.tool


async def test_calculator_returns_typed_output(toolrunner: Runner) -> None:
    reply = await toolrunner.runner.ExecuteTool(
        execute("calculator", {"expression": "2 ** 10 + sqrt(16)"}, tool_call_id="call_1"),
        metadata=toolrunner.md("tools:calculator"),
    )
    assert reply.outcome.WhichOneof("outcome") == "output"
    assert json.loads(reply.outcome.output.output_json) == {"result": 1028.0}
    assert reply.tool_call_id == "call_1"
    assert reply.tool_version == 1
    assert not reply.replayed
    value = toolrunner.service.deps.metrics.registry.get_sample_value(
        "agent_tool_calls_total", {"tool_name": "calculator", "success": "true"}
    )
    assert value == 1.0


async def test_calculator_refuses_code_as_a_tool_error(toolrunner: Runner) -> None:
    reply = await toolrunner.runner.ExecuteTool(
        execute("calculator", {"expression": "__import__('os').system('id')"}),
        metadata=toolrunner.md(),
    )
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_TOOL_FAILED


async def test_current_time_in_a_zone(toolrunner: Runner) -> None:
    reply = await toolrunner.runner.ExecuteTool(
        execute("current_time", {"timezone": "Europe/Paris"}), metadata=toolrunner.md()
    )
    output = json.loads(reply.outcome.output.output_json)
    assert output["timezone"] == "Europe/Paris"
    assert output["iso"][-6:] in ("+01:00", "+02:00")


async def test_unknown_tool_is_not_found_only_for_permitted_callers(toolrunner: Runner) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(execute("ghost", {}), metadata=toolrunner.md("tools:*"))
    assert error_details(caught.value).reason == "TOOL_NOT_FOUND"
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    for name in ("ghost", "calculator"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await toolrunner.runner.ExecuteTool(
                execute(name, {"expression": "1"}), metadata=toolrunner.md("tools:other")
            )
        details = error_details(caught.value)
        assert details.code is grpc.StatusCode.PERMISSION_DENIED
        assert details.reason == "TOOL_PERMISSION_DENIED"
        assert details.metadata["permission"] == f"tools:{name}"


async def test_required_permissions_are_checked_before_running(toolrunner: Runner) -> None:
    await register_builtin(
        toolrunner,
        "guarded_calc",
        "calculator",
        {"type": "object", "properties": {"expression": {"type": "string"}}},
        required_permissions=["math:advanced"],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(
            execute("guarded_calc", {"expression": "1+1"}), metadata=toolrunner.md("tools:*")
        )
    details = error_details(caught.value)
    assert details.reason == "TOOL_PERMISSION_DENIED"
    assert details.metadata["permission"] == "math:advanced"
    reply = await toolrunner.runner.ExecuteTool(
        execute("guarded_calc", {"expression": "1+1"}),
        metadata=toolrunner.md("tools:*", "math:advanced"),
    )
    assert json.loads(reply.outcome.output.output_json) == {"result": 2}


async def test_arguments_are_validated_one_violation_per_field(toolrunner: Runner) -> None:
    schema = {
        "type": "object",
        "properties": {
            "expression": {"type": "string"},
            "precision": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["expression", "mode"],
    }
    await register_builtin(toolrunner, "strict_calc", "calculator", schema)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(
            execute("strict_calc", {"expression": 3, "precision": -1, "tags": ["a", 2]}),
            metadata=toolrunner.md(),
        )
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "TOOL_ARGUMENTS_INVALID"
    assert sorted(v.field for v in details.field_violations) == [
        "arguments_json/expression",
        "arguments_json/mode",
        "arguments_json/precision",
        "arguments_json/tags/1",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(
            svc.ExecuteToolRequest(
                tool_name="strict_calc", arguments_json="[1]", idempotency_key="k"
            ),
            metadata=toolrunner.md(),
        )
    assert [v.field for v in error_details(caught.value).field_violations] == ["arguments_json"]


async def test_rate_limit_admits_exactly_n_of_m_concurrent_calls(toolrunner: Runner) -> None:
    limit = tool_pb2.RateLimit(max_calls=5)
    limit.window.FromSeconds(60)
    await register_builtin(
        toolrunner,
        "limited_calc",
        "calculator",
        {"type": "object", "properties": {"expression": {"type": "string"}}},
        rate_limit=limit,
    )

    async def call(tenant: str) -> grpc.StatusCode:
        try:
            await toolrunner.runner.ExecuteTool(
                execute("limited_calc", {"expression": "1"}), metadata=toolrunner.md(tenant=tenant)
            )
        except grpc.aio.AioRpcError as error:
            details = error_details(error)
            assert details.reason == "TOOL_RATE_LIMITED"
            assert details.retry_after is not None
            assert details.quota_violations[0].subject == "tool:limited_calc"
            return error.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(call("tenant-a") for _ in range(20)))
    assert codes.count(grpc.StatusCode.OK) == 5
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 15
    other = await call("tenant-b")
    assert other is grpc.StatusCode.OK


async def test_idempotency_runs_once_for_concurrent_duplicates(toolrunner: Runner) -> None:
    request = execute(
        "python",
        {"code": "import time, random\ntime.sleep(0.3)\nprint(random.random())"},
        key="run-1:step-3",
    )
    replies = await asyncio.gather(
        *(toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md()) for _ in range(4))
    )
    outputs = {r.outcome.output.output_json for r in replies}
    assert len(outputs) == 1
    assert {r.execution_id for r in replies} == {replies[0].execution_id}
    assert sorted(r.replayed for r in replies) == [False, True, True, True]
    later = await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md())
    assert later.replayed
    assert later.outcome.output.output_json in outputs
    changed = svc.ExecuteToolRequest()
    changed.CopyFrom(request)
    changed.arguments_json = json.dumps({"code": "print(2)"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(changed, metadata=toolrunner.md())
    assert error_details(caught.value).reason == "IDEMPOTENCY_KEY_REUSED"
    other_tenant = await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md(tenant="t2"))
    assert not other_tenant.replayed


async def test_an_rpc_error_is_not_recorded(toolrunner: Runner) -> None:
    request = execute("calculator", {"expression": 5}, key="same-key")
    with pytest.raises(grpc.aio.AioRpcError):
        await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md())
    # The failed call left no record under its key, so a corrected retry with it runs.
    request.arguments_json = json.dumps({"expression": "5"})
    reply = await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md())
    assert not reply.replayed
    assert json.loads(reply.outcome.output.output_json) == {"result": 5}


async def test_tool_timeout_is_a_typed_error_in_an_ok_response(toolrunner: Runner) -> None:
    timeout = tool_pb2.ToolPolicy().timeout
    timeout.FromMilliseconds(500)
    await register_builtin(
        toolrunner,
        "slow_python",
        "python",
        {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        timeout=timeout,
    )
    reply = await toolrunner.runner.ExecuteTool(
        execute("slow_python", {"code": "while True:\n    pass"}),
        metadata=toolrunner.md(),
        timeout=10,
    )
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_TIMEOUT
    assert reply.sandbox.termination_signal == 9
    assert reply.duration.ToTimedelta().total_seconds() < 5


async def test_caller_deadline_is_deadline_exceeded(toolrunner: Runner) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(
            execute("python", {"code": "while True:\n    pass"}),
            metadata=toolrunner.md(),
            timeout=0.8,
        )
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_output_over_the_cap_is_truncated(toolrunner: Runner) -> None:
    await register_builtin(
        toolrunner,
        "small_python",
        "python",
        {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        max_output_bytes=2048,
    )
    reply = await toolrunner.runner.ExecuteTool(
        execute("small_python", {"code": "print('é' * 100000)"}), metadata=toolrunner.md()
    )
    output = reply.outcome.output
    assert output.truncated
    assert len(output.output_json.encode()) <= 2048
    assert isinstance(json.loads(output.output_json), str)
    assert output.output_bytes > 2048


async def test_inside_a_run_the_key_must_be_the_tool_effect_key(toolrunner: Runner) -> None:
    request = execute("calculator", {"expression": "1"}, key="not-the-step-key")
    request.run_id, request.step_id = "run-9", "step-2"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md())
    details = error_details(caught.value)
    assert details.reason == "INVALID_REQUEST"
    assert [v.field for v in details.field_violations] == ["idempotency_key"]
    request.idempotency_key = tool_effect_key("run-9", "step-2")
    reply = await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md())
    assert reply.outcome.WhichOneof("outcome") == "output"


async def test_approval_is_required_and_bound_to_the_call(toolrunner: Runner) -> None:
    await register_builtin(
        toolrunner,
        "approved_calc",
        "calculator",
        {"type": "object", "properties": {"expression": {"type": "string"}}},
        requires_approval=True,
    )
    arguments = json.dumps({"expression": "6*7"})

    def request(token: str, step: str) -> svc.ExecuteToolRequest:
        return svc.ExecuteToolRequest(
            tool_name="approved_calc",
            arguments_json=arguments,
            run_id="run-1",
            step_id=step,
            idempotency_key=tool_effect_key("run-1", step),
            approval_token=token,
        )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(request("", "s1"), metadata=toolrunner.md())
    assert error_details(caught.value).reason == "APPROVAL_REQUIRED"
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION

    token = approval_signer().mint(
        tenant_id="tenant-a",
        run_id="run-1",
        step_id="s2",
        tool_name="approved_calc",
        arguments_digest=arguments_json_digest(arguments),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(request(token, "s3"), metadata=toolrunner.md())
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "APPROVAL_INVALID"
    assert details.metadata["check"] == "step"

    reply = await toolrunner.runner.ExecuteTool(request(token, "s2"), metadata=toolrunner.md())
    assert json.loads(reply.outcome.output.output_json) == {"result": 42}


async def test_a_duplicate_waits_no_longer_than_its_deadline(toolrunner: Runner) -> None:
    request = execute("python", {"code": "import time\ntime.sleep(1.5)\nprint('done')"})
    first = asyncio.ensure_future(
        toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md(), timeout=30)
    )
    # The duplicate arrives once the first holds the key (a condition, bounded in time), and
    # its deadline ends first.
    entry = f"toolrunner:{{ledger:tenant-a}}:{request.idempotency_key}"
    redis = toolrunner.service.deps.redis
    async with asyncio.timeout(10):
        while await redis.hget(entry, "state") != b"running":  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md(), timeout=0.4)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    reply = await first
    assert not reply.replayed
    assert json.loads(reply.outcome.output.output_json)["stdout"] == "done\n"
    again = await toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md())
    assert again.replayed
    assert again.execution_id == reply.execution_id
