"""MCP servers (started by the test, over stdio in the sandbox and over HTTP): their tools are
imported with their schemas and executed through ExecuteTool."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck_kit.errors import error_details

from .conftest import Runner

HELPER = Path(__file__).parent / "helpers" / "mcp_test_server.py"
VENV = Path(sys.prefix)


def stdio_server() -> tool_pb2.McpServer:
    server = tool_pb2.McpServer()
    server.stdio.command = str(VENV / "bin" / "python")
    server.stdio.args.extend([str(HELPER), "stdio"])
    server.stdio.env["MCP_TEST_VISIBLE"] = "1"
    return server


def stdio_policy() -> tool_pb2.ToolPolicy:
    policy = tool_pb2.ToolPolicy(safe_to_log=True)
    policy.filesystem.read_only_paths.extend([str(VENV), str(HELPER.parent)])
    policy.resource_limits.memory_bytes = 4 * 1024**3
    policy.resource_limits.max_processes = 128
    policy.timeout.FromSeconds(60)
    return policy


@pytest_asyncio.fixture
async def http_mcp_url() -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HELPER), "http", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        process.terminate()
        await process.wait()


async def import_server(
    runner: Runner, server: tool_pb2.McpServer, policy: tool_pb2.ToolPolicy, prefix: str
) -> svc.ImportMcpServerResponse:
    return await runner.registry.ImportMcpServer(
        svc.ImportMcpServerRequest(
            request_id=uuid.uuid4().hex, server=server, policy=policy, name_prefix=prefix
        ),
        metadata=runner.md(),
        timeout=60,
    )


async def call(runner: Runner, name: str, arguments: object) -> svc.ExecuteToolResponse:
    return await runner.runner.ExecuteTool(
        svc.ExecuteToolRequest(
            tool_name=name, arguments_json=json.dumps(arguments), idempotency_key=uuid.uuid4().hex
        ),
        metadata=runner.md(),
        timeout=60,
    )


@pytest.mark.usefixtures("bubblewrap")
async def test_stdio_server_tools_are_imported_and_run_in_the_sandbox(toolrunner: Runner) -> None:
    reply = await import_server(toolrunner, stdio_server(), stdio_policy(), "local_")
    names = [t.definition.name for t in reply.tools]
    assert names == ["local_add", "local_broken", "local_environment_names"]
    add = reply.tools[0]
    schema = json.loads(add.definition.parameters_json_schema)
    assert schema["required"] == ["a", "b"]
    assert add.mcp_server.remote_tool_name == "add"

    result = await call(toolrunner, "local_add", {"a": 2, "b": 40})
    assert "42" in result.outcome.output.output_json

    env = await call(toolrunner, "local_environment_names", {})
    seen = env.outcome.output.output_json
    assert "MCP_TEST_VISIBLE" in seen
    assert "FOREDECK" not in seen
    assert "REDIS" not in seen

    failed = await call(toolrunner, "local_broken", {})
    assert failed.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_TOOL_FAILED

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(toolrunner, "local_add", {"a": "two", "b": 40})
    assert error_details(caught.value).reason == "TOOL_ARGUMENTS_INVALID"


async def test_http_server_tools_are_imported_and_run(
    toolrunner: Runner, http_mcp_url: str
) -> None:
    server = tool_pb2.McpServer()
    server.streamable_http.url = http_mcp_url
    reply = await import_server(toolrunner, server, tool_pb2.ToolPolicy(), "remote_")
    assert [t.definition.name for t in reply.tools] == [
        "remote_add",
        "remote_broken",
        "remote_environment_names",
    ]
    result = await call(toolrunner, "remote_add", {"a": 1, "b": 2})
    assert "3" in result.outcome.output.output_json

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_server(toolrunner, server, tool_pb2.ToolPolicy(), "remote_")
    assert error_details(caught.value).reason == "TOOL_ALREADY_EXISTS"


async def test_unreachable_http_server_is_unavailable(toolrunner: Runner) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = tool_pb2.McpServer()
    server.streamable_http.url = f"http://127.0.0.1:{port}/mcp"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_server(toolrunner, server, tool_pb2.ToolPolicy(), "gone_")
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.UNAVAILABLE
    assert details.reason == "MCP_SERVER_UNAVAILABLE"
