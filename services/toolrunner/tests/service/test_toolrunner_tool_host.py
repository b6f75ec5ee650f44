"""A remote gRPC tool host in a separate process: registration checks it, calls reach it."""

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

HELPER = Path(__file__).parent / "helpers" / "tool_host.py"


@pytest_asyncio.fixture
async def host_process() -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HELPER), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("PORT "), line
        yield f"127.0.0.1:{int(line.split()[1])}", process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


def hosted(name: str, target: str, remote: str = "", timeout_ms: int = 0) -> tool_pb2.Tool:
    tool = tool_pb2.Tool(grpc_host=tool_pb2.GrpcHostRuntime(target=target, remote_tool_name=remote))
    tool.definition.name = name
    tool.definition.description = "a hosted tool"
    tool.definition.parameters_json_schema = json.dumps(
        {
            "type": "object",
            "properties": {"text": {"type": "string"}, "seconds": {"type": "number"}},
        }
    )
    if timeout_ms:
        tool.policy.timeout.FromMilliseconds(timeout_ms)
    return tool


async def register(runner: Runner, tool: tool_pb2.Tool) -> tool_pb2.Tool:
    reply = await runner.registry.RegisterTool(
        svc.RegisterToolRequest(request_id=uuid.uuid4().hex, tool=tool), metadata=runner.md()
    )
    return reply.tool


async def run(
    runner: Runner, name: str, arguments: object, key: str = ""
) -> svc.ExecuteToolResponse:
    return await runner.runner.ExecuteTool(
        svc.ExecuteToolRequest(
            tool_name=name,
            arguments_json=json.dumps(arguments),
            idempotency_key=key or uuid.uuid4().hex,
        ),
        metadata=runner.md(),
        timeout=30,
    )


async def test_hosted_tool_runs_on_the_host(
    toolrunner: Runner, host_process: tuple[str, asyncio.subprocess.Process]
) -> None:
    target, _ = host_process
    await register(toolrunner, hosted("count", target, remote="word_count"))
    reply = await run(toolrunner, "count", {"text": "one two three"}, key="run-7:step-1")
    assert json.loads(reply.outcome.output.output_json) == {"words": 3, "key": "run-7:step-1"}


async def test_host_must_offer_the_tool(
    toolrunner: Runner, host_process: tuple[str, asyncio.subprocess.Process]
) -> None:
    target, _ = host_process
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(toolrunner, hosted("nothing", target))
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "REMOTE_TOOL_NOT_FOUND"


async def test_host_timeout_is_a_typed_error(
    toolrunner: Runner, host_process: tuple[str, asyncio.subprocess.Process]
) -> None:
    target, _ = host_process
    await register(toolrunner, hosted("nap", target, remote="sleepy", timeout_ms=300))
    reply = await run(toolrunner, "nap", {"seconds": 5})
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_TIMEOUT


async def test_host_gone_is_unavailable(
    toolrunner: Runner, host_process: tuple[str, asyncio.subprocess.Process]
) -> None:
    target, process = host_process
    await register(toolrunner, hosted("count", target, remote="word_count"))
    process.terminate()
    await process.wait()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(toolrunner, "count", {"text": "a"})
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.UNAVAILABLE
    assert details.reason == "TOOL_HOST_UNAVAILABLE"
