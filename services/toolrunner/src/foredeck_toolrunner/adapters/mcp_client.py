"""MCP servers through the official ``mcp`` SDK: stdio servers run in the sandbox, streamable
HTTP servers are reached over the network. One session per call or import."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck_kit.logs import get_logger
from foredeck_toolrunner.adapters.builtins import SandboxDefaults, sandbox_spec
from foredeck_toolrunner.adapters.sandbox import Sandbox, SandboxUnavailable
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.execution import tool_error
from foredeck_toolrunner.domain.mcp_import import RemoteTool, schema_text
from foredeck_toolrunner.domain.ports import CallContext, RunResult

__all__ = ["McpClient"]


def _label(server: tool_pb2.McpServer) -> str:
    if server.WhichOneof("transport") == "stdio":
        return server.stdio.command.rsplit("/", 1)[-1]
    return urlsplit(server.streamable_http.url).hostname or ""


class McpClient:
    """Opens MCP sessions, lists tools for imports and runs calls of imported tools."""

    def __init__(
        self, sandbox: Sandbox, defaults: SandboxDefaults, secrets: Mapping[str, str]
    ) -> None:
        self._sandbox = sandbox
        self._defaults = defaults
        self._secrets = dict(secrets)
        self._log = get_logger("foredeck.toolrunner.mcp")

    def _secret(self, name: str) -> str:
        return self._secrets.get(name, "")

    @contextlib.asynccontextmanager
    async def _session(
        self, server: tool_pb2.McpServer, policy: tool_pb2.ToolPolicy, seconds: float
    ) -> AsyncIterator[ClientSession]:
        if server.WhichOneof("transport") == "stdio":
            stdio = server.stdio
            env = dict(stdio.env)
            env.update({name: self._secret(secret) for name, secret in stdio.secret_env.items()})
            spec = sandbox_spec(
                policy,
                self._defaults,
                mode="exec",
                argv=(stdio.command, *stdio.args),
                env=env,
                network=policy.network.access == tool_pb2.NETWORK_ACCESS_ALLOWLIST,
            )
            async with self._sandbox.exec_argv(spec) as argv:
                params = StdioServerParameters(command=argv[0], args=argv[1:], env={})
                # The server's stderr is its own business; it must not reach the runner's logs.
                with open(os.devnull, "w") as errlog:  # noqa: ASYNC230 - /dev/null never blocks
                    async with (
                        stdio_client(params, errlog=errlog) as (read, write),
                        ClientSession(read, write, read_timeout_seconds=seconds) as session,
                    ):
                        await session.initialize()
                        yield session
            return
        http = server.streamable_http
        headers = dict(http.headers)
        headers.update({name: self._secret(secret) for name, secret in http.secret_headers.items()})
        async with (
            create_mcp_http_client(headers=headers) as client,
            streamable_http_client(http.url, http_client=client) as (read, write),
            ClientSession(read, write, read_timeout_seconds=seconds) as session,
        ):
            await session.initialize()
            yield session

    async def list_tools(
        self, server: tool_pb2.McpServer, policy: tool_pb2.ToolPolicy, seconds: float
    ) -> list[RemoteTool]:
        """Every tool the server lists, with its declared input schema."""
        label = _label(server)
        tools: list[RemoteTool] = []
        try:
            async with self._session(server, policy, seconds) as session:
                cursor: str | None = None
                for _ in range(100):
                    from mcp.types import PaginatedRequestParams

                    params = PaginatedRequestParams(cursor=cursor) if cursor else None
                    page = await session.list_tools(params=params)
                    for tool in page.tools:
                        tools.append(
                            RemoteTool(
                                name=tool.name,
                                description=tool.description or "",
                                input_schema=schema_text(tool.input_schema),
                            )
                        )
                    cursor = page.next_cursor
                    if not cursor:
                        break
        except SandboxUnavailable:
            raise ToolRunnerError.sandbox_unavailable("") from None
        except MCPError:
            raise ToolRunnerError.mcp_protocol_error(label) from None
        except (OSError, TimeoutError, ExceptionGroup, ConnectionError, RuntimeError) as error:
            self._log.warning("mcp server unavailable", server=label, error=repr(error)[:500])
            raise ToolRunnerError.mcp_unavailable("", label) from None
        return tools

    async def run(self, call: CallContext) -> RunResult:
        """Run one call of an imported tool on its server."""
        runtime = call.tool.mcp_server
        name = call.tool.definition.name
        remote = runtime.remote_tool_name or name
        label = _label(runtime.server)
        try:
            async with self._session(runtime.server, call.tool.policy, call.timeout) as session:
                result = await session.call_tool(remote, dict(call.arguments))
        except SandboxUnavailable:
            raise ToolRunnerError.sandbox_unavailable(name) from None
        except MCPError:
            return RunResult(
                tool_error(
                    execution_pb2.TOOL_ERROR_KIND_REMOTE_ERROR,
                    "the MCP server could not run the tool",
                    retryable=False,
                )
            )
        except (OSError, ExceptionGroup, ConnectionError, RuntimeError) as error:
            self._log.warning("mcp server unavailable", server=label, error=repr(error)[:500])
            raise ToolRunnerError.mcp_unavailable(name, label) from None
        content = [
            block.model_dump(mode="json", by_alias=True, exclude_none=True)
            for block in result.content
        ]
        if result.is_error:
            text = " ".join(str(block.get("text", "")) for block in content)
            return RunResult(
                tool_error(
                    execution_pb2.TOOL_ERROR_KIND_TOOL_FAILED,
                    text or "the tool reported an error",
                )
            )
        value: Any = (
            result.structured_content
            if result.structured_content is not None
            else {"content": content}
        )
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        return RunResult(
            execution_pb2.ToolOutcome(
                output=execution_pb2.ToolOutput(output_json=text, output_bytes=len(text.encode()))
            )
        )
