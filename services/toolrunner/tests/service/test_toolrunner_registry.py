"""Registry RPCs over real gRPC and Redis: validation, permissions, versions, idempotency."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from foredeck.toolrunner.v1 import tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck_kit.errors import error_details

from .conftest import Runner

SCHEMA = json.dumps(
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
)


def calculator_tool(name: str = "calc", **policy: object) -> tool_pb2.Tool:
    tool = tool_pb2.Tool(builtin=tool_pb2.BuiltinRuntime(builtin_name="calculator"))
    tool.definition.name = name
    tool.definition.description = "adds numbers"
    tool.definition.parameters_json_schema = SCHEMA
    for key, value in policy.items():
        setattr(tool.policy, key, value)
    return tool


async def register(runner: Runner, tool: tool_pb2.Tool, request_id: str = "r1") -> tool_pb2.Tool:
    reply = await runner.registry.RegisterTool(
        svc.RegisterToolRequest(request_id=request_id, tool=tool), metadata=runner.md()
    )
    return reply.tool


async def test_builtins_are_registered_at_start(toolrunner: Runner) -> None:
    reply = await toolrunner.registry.ListTools(svc.ListToolsRequest(), metadata=toolrunner.md())
    assert [t.definition.name for t in reply.tools] == ["calculator", "current_time", "python"]


async def test_register_then_get_returns_version_one(toolrunner: Runner) -> None:
    stored = await register(toolrunner, calculator_tool())
    assert stored.version == 1
    assert stored.created_by == "user-a"
    got = await toolrunner.registry.GetTool(
        svc.GetToolRequest(tool_name="calc"), metadata=toolrunner.md("tools:calc")
    )
    assert got.tool == stored


async def test_invalid_schema_is_schema_invalid_with_a_violation(toolrunner: Runner) -> None:
    tool = calculator_tool()
    tool.definition.parameters_json_schema = json.dumps({"type": "object", "properties": 3})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, tool)
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "TOOL_SCHEMA_INVALID"
    assert details.domain == "toolrunner.foredeck.dev"
    assert [v.field for v in details.field_violations] == ["tool.definition.parameters_json_schema"]


async def test_non_object_schema_is_refused(toolrunner: Runner) -> None:
    tool = calculator_tool()
    tool.definition.parameters_json_schema = json.dumps({"type": "string"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, tool)
    assert error_details(caught.value).reason == "TOOL_SCHEMA_INVALID"


async def test_bad_fields_are_listed_together(toolrunner: Runner) -> None:
    tool = calculator_tool(name="bad name!")
    tool.policy.timeout.FromSeconds(3600)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, tool)
    details = error_details(caught.value)
    assert details.reason == "INVALID_REQUEST"
    assert {v.field for v in details.field_violations} == {
        "tool.definition.name",
        "tool.policy.timeout",
    }


async def test_unknown_builtin(toolrunner: Runner) -> None:
    tool = calculator_tool()
    tool.builtin.builtin_name = "shell"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, tool)
    details = error_details(caught.value)
    assert details.reason == "BUILTIN_TOOL_UNKNOWN"
    assert details.metadata["builtinName"] == "shell"


async def test_registry_writes_need_the_registry_permission(toolrunner: Runner) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.registry.RegisterTool(
            svc.RegisterToolRequest(request_id="r1", tool=calculator_tool()),
            metadata=toolrunner.md("tools:*"),
        )
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "PERMISSION_MISSING"
    assert details.metadata["permission"] == "toolregistry:write"


async def test_duplicate_name_already_exists(toolrunner: Runner) -> None:
    await register(toolrunner, calculator_tool())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, calculator_tool(), request_id="r2")
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.ALREADY_EXISTS
    assert details.reason == "TOOL_ALREADY_EXISTS"


async def test_request_id_replays_and_refuses_a_different_request(toolrunner: Runner) -> None:
    first = await register(toolrunner, calculator_tool())
    again = await register(toolrunner, calculator_tool())
    assert again == first
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, calculator_tool(name="other"))
    assert error_details(caught.value).reason == "REQUEST_ID_REUSED"


async def test_get_without_tool_permission_reveals_nothing(toolrunner: Runner) -> None:
    await register(toolrunner, calculator_tool())
    for name in ("calc", "no_such_tool"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await toolrunner.registry.GetTool(
                svc.GetToolRequest(tool_name=name), metadata=toolrunner.md("tools:other")
            )
        details = error_details(caught.value)
        assert details.code is grpc.StatusCode.PERMISSION_DENIED
        assert details.reason == "TOOL_PERMISSION_DENIED"


async def test_get_unknown_tool_with_permission_is_not_found(toolrunner: Runner) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.registry.GetTool(
            svc.GetToolRequest(tool_name="ghost"), metadata=toolrunner.md("tools:*")
        )
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.NOT_FOUND
    assert details.reason == "TOOL_NOT_FOUND"


async def test_update_is_versioned_with_an_etag_compare_and_set(toolrunner: Runner) -> None:
    stored = await register(toolrunner, calculator_tool())
    assert stored.etag
    changed = tool_pb2.Tool()
    changed.definition.name = "calc"
    changed.definition.description = "adds numbers, carefully"

    async def update(request_id: str) -> tool_pb2.Tool | grpc.aio.AioRpcError:
        try:
            reply = await toolrunner.registry.UpdateTool(
                svc.UpdateToolRequest(request_id=request_id, tool=changed, etag=stored.etag),
                metadata=toolrunner.md(),
            )
        except grpc.aio.AioRpcError as error:
            return error
        return reply.tool

    results = await asyncio.gather(*(update(f"u{i}") for i in range(5)))
    winners = [r for r in results if isinstance(r, tool_pb2.Tool)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    winner = winners[0]
    assert winner.version == 2
    assert winner.etag != stored.etag
    assert winner.create_time == stored.create_time
    # Only the masked (populated) field changed; the rest is the current version's.
    assert winner.definition.description == "adds numbers, carefully"
    assert winner.definition.parameters_json_schema == SCHEMA
    assert winner.builtin.builtin_name == "calculator"
    for loser in losers:
        details = error_details(loser)
        assert details.code is grpc.StatusCode.ABORTED
        assert details.reason == "ETAG_MISMATCH"
        assert details.metadata["currentVersion"] == "2"
    old = await toolrunner.registry.GetTool(
        svc.GetToolRequest(tool_name="calc", version=1), metadata=toolrunner.md()
    )
    assert old.tool.definition.description == "adds numbers"


async def test_update_mask_sets_a_field_to_its_zero_value(toolrunner: Runner) -> None:
    tool = calculator_tool()
    tool.policy.safe_to_log = True
    tool.policy.timeout.FromSeconds(5)
    await register(toolrunner, tool)
    change = tool_pb2.Tool()
    change.definition.name = "calc"
    request = svc.UpdateToolRequest(request_id="u1", tool=change)
    request.update_mask.paths.append("policy.safe_to_log")
    reply = await toolrunner.registry.UpdateTool(request, metadata=toolrunner.md())
    assert not reply.tool.policy.safe_to_log
    assert reply.tool.policy.timeout.seconds == 5
    bad = svc.UpdateToolRequest(request_id="u2", tool=change)
    bad.update_mask.paths.append("definition.name")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.registry.UpdateTool(bad, metadata=toolrunner.md())
    details = error_details(caught.value)
    assert details.reason == "INVALID_REQUEST"
    assert [v.field for v in details.field_violations] == ["update_mask"]


async def test_deregister_then_register_continues_the_versions(toolrunner: Runner) -> None:
    await register(toolrunner, calculator_tool())
    removed = await toolrunner.registry.DeregisterTool(
        svc.DeregisterToolRequest(request_id="d1", tool_name="calc"), metadata=toolrunner.md()
    )
    assert removed.tool.version == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.registry.GetTool(
            svc.GetToolRequest(tool_name="calc", version=1), metadata=toolrunner.md()
        )
    assert error_details(caught.value).reason == "TOOL_NOT_FOUND"
    again = await register(toolrunner, calculator_tool(), request_id="r2")
    assert again.version == 2


async def test_list_is_filtered_by_permissions_and_pages(toolrunner: Runner) -> None:
    for i in range(5):
        await register(toolrunner, calculator_tool(name=f"t{i}"), request_id=f"r{i}")
    guarded = calculator_tool(name="t_guarded")
    guarded.policy.required_permissions.append("net:egress")
    await register(toolrunner, guarded, request_id="rg")
    md = toolrunner.md("tools:t*")
    seen: list[str] = []
    token = ""
    while True:
        reply = await toolrunner.registry.ListTools(
            svc.ListToolsRequest(page_size=2, page_token=token, name_prefix="t"), metadata=md
        )
        seen += [t.definition.name for t in reply.tools]
        token = reply.next_page_token
        if not token:
            break
    assert seen == ["t0", "t1", "t2", "t3", "t4"]
    first = await toolrunner.registry.ListTools(
        svc.ListToolsRequest(page_size=2, name_prefix="t"), metadata=md
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await toolrunner.registry.ListTools(
            svc.ListToolsRequest(page_size=2, page_token=first.next_page_token, name_prefix="x"),
            metadata=md,
        )
    assert error_details(caught.value).reason == "PAGE_TOKEN_INVALID"


async def test_export_renders_openai_tools(toolrunner: Runner) -> None:
    await register(toolrunner, calculator_tool())
    reply = await toolrunner.registry.ExportToolSchemas(
        svc.ExportToolSchemasRequest(
            tool_names=["calc", "nope"], format=svc.TOOL_SCHEMA_FORMAT_OPENAI
        ),
        metadata=toolrunner.md("tools:calc"),
    )
    assert [d.name for d in reply.tool_definitions] == ["calc"]
    document = json.loads(reply.document_json)
    assert document[0]["function"]["parameters"] == json.loads(SCHEMA)


async def test_a_registration_over_one_mebibyte_is_too_large(toolrunner: Runner) -> None:
    tool = calculator_tool()
    tool.output_json_schema = json.dumps({"description": "x" * (1024 * 1024)})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, tool)
    details = error_details(caught.value)
    assert details.reason == "REQUEST_TOO_LARGE"
    assert details.metadata["limit"] == str(1024 * 1024)
