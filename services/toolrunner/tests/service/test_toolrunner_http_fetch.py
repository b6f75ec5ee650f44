"""http_fetch: off unless granted, only allowlisted hosts, private addresses only when listed
literally, body capped. The only server reached is one the test runs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck_toolrunner.adapters.builtins import http_fetch_schema

from .conftest import Runner


@pytest_asyncio.fixture
async def web_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head)
        body = b"hello " * 2000
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], requests
    finally:
        server.close()
        await server.wait_closed()


async def register_fetch(runner: Runner, name: str, hosts: list[str], access: int) -> None:
    tool = tool_pb2.Tool(builtin=tool_pb2.BuiltinRuntime(builtin_name="http_fetch"))
    tool.definition.name = name
    tool.definition.description = "fetches a page"
    tool.definition.parameters_json_schema = json.dumps(http_fetch_schema())
    tool.policy.network.access = access  # type: ignore[assignment]
    tool.policy.network.allowed_hosts.extend(hosts)
    tool.policy.max_output_bytes = 4096
    await runner.registry.RegisterTool(
        svc.RegisterToolRequest(request_id=uuid.uuid4().hex, tool=tool), metadata=runner.md()
    )


async def fetch(runner: Runner, name: str, url: str) -> svc.ExecuteToolResponse:
    return await runner.runner.ExecuteTool(
        svc.ExecuteToolRequest(
            tool_name=name,
            arguments_json=json.dumps({"url": url}),
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=runner.md(),
        timeout=30,
    )


async def test_fetch_needs_a_grant(toolrunner: Runner, web_server: tuple[int, list[bytes]]) -> None:
    port, requests = web_server
    await register_fetch(toolrunner, "no_net", [], tool_pb2.NETWORK_ACCESS_NONE)
    reply = await fetch(toolrunner, "no_net", f"http://127.0.0.1:{port}/")
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_NETWORK_DENIED
    assert requests == []


async def test_loopback_needs_the_literal_address(
    toolrunner: Runner, web_server: tuple[int, list[bytes]]
) -> None:
    port, requests = web_server
    await register_fetch(toolrunner, "by_name", ["localhost"], tool_pb2.NETWORK_ACCESS_ALLOWLIST)
    reply = await fetch(toolrunner, "by_name", f"http://localhost:{port}/")
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_NETWORK_DENIED
    assert requests == []


async def test_allowlisted_fetch_is_capped(
    toolrunner: Runner, web_server: tuple[int, list[bytes]]
) -> None:
    port, requests = web_server
    await register_fetch(
        toolrunner, "local_fetch", [f"127.0.0.1:{port}"], tool_pb2.NETWORK_ACCESS_ALLOWLIST
    )
    reply = await fetch(toolrunner, "local_fetch", f"http://127.0.0.1:{port}/page")
    assert len(requests) == 1
    output = reply.outcome.output
    assert output.truncated
    assert len(output.output_json.encode()) <= 4096
    other_port = await fetch(toolrunner, "local_fetch", f"http://127.0.0.1:{port + 1}/")
    assert other_port.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_NETWORK_DENIED
    assert len(requests) == 1
