"""A small MCP server for the tests, built on the ``mcp`` SDK.

``python mcp_test_server.py stdio`` serves over stdin/stdout; ``python mcp_test_server.py http``
binds 127.0.0.1 on a free port, prints ``PORT <n>`` and serves streamable HTTP at ``/mcp``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from mcp.server.mcpserver import MCPServer

server: MCPServer = MCPServer("foredeck-test-tools")


@server.tool(description="Adds two integers.")
def add(a: int, b: int) -> int:
    """Return the sum."""
    return a + b


@server.tool(description="Lists the names of the environment variables the server sees.")
def environment_names() -> list[str]:
    """Return the sorted variable names."""
    return sorted(os.environ)


@server.tool(description="Always fails.")
def broken() -> str:
    """Raise, so the call's result is marked as an error."""
    raise ValueError("this tool always fails")


async def serve_http() -> None:
    """Serve streamable HTTP on a free loopback port, announced on stdout."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # Listen before announcing the port: a client connecting early queues instead of failing.
    sock.listen(64)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning")
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    if sys.argv[1:] == ["http"]:
        asyncio.run(serve_http())
    else:
        server.run("stdio")
