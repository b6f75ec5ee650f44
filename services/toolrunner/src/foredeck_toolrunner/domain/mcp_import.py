"""ImportMcpServer: list an MCP server's tools and register them in one atomic batch."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from foredeck.toolrunner.v1 import tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck_kit.principal import Principal
from foredeck_toolrunner.domain import permissions
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.ports import RegistryOp, RegistryRace
from foredeck_toolrunner.domain.registry import ToolRegistry, request_fingerprint, stamp
from foredeck_toolrunner.domain.validation import (
    TOOL_NAME,
    check_request_id,
    check_request_size,
    mcp_server_violations,
    schema_violations,
)

__all__ = ["McpCatalog", "McpImporter", "RemoteTool", "same_server", "schema_text"]

_PREFIX = re.compile(r"^[a-zA-Z0-9_-]{0,32}$")


@dataclass(frozen=True, slots=True)
class RemoteTool:
    """A tool as an MCP server lists it."""

    name: str
    description: str
    input_schema: str


class McpCatalog(Protocol):
    """Lists the tools an MCP server offers."""

    async def list_tools(
        self, server: tool_pb2.McpServer, policy: tool_pb2.ToolPolicy, seconds: float
    ) -> list[RemoteTool]:
        """Every tool the server lists (MCP_SERVER_UNAVAILABLE / PROTOCOL_ERROR on failure)."""
        ...


def same_server(a: tool_pb2.McpServer, b: tool_pb2.McpServer) -> bool:
    """Whether two transport descriptions name the same server."""
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


class McpImporter:
    """Registers an MCP server's tools with their declared schemas."""

    def __init__(self, registry: ToolRegistry, catalog: McpCatalog, request_ttl: timedelta) -> None:
        self._registry = registry
        self._catalog = catalog
        self._ttl = request_ttl

    async def import_server(
        self,
        principal: Principal,
        request: svc.ImportMcpServerRequest,
        seconds: float = 30.0,
    ) -> list[tool_pb2.Tool]:
        """Connect, list, validate and register (or update) the selected tools atomically."""
        permissions.require_registry_write(principal, "ImportMcpServer")
        check_request_size(request.ByteSize())
        bad = check_request_id(request.request_id)
        bad += mcp_server_violations(request.server, "server")
        if not _PREFIX.fullmatch(request.name_prefix):
            bad.append(("name_prefix", "at most 32 characters of [a-zA-Z0-9_-]"))
        if len(request.remote_tool_names) > 256:
            bad.append(("remote_tool_names", "at most 256 names"))
        if bad:
            raise ToolRunnerError.invalid_request(bad)
        fingerprint = request_fingerprint(request)
        key = f"import|{principal.tenant_id}|{principal.user_id}|{request.request_id}"
        store = self._registry.store
        recorded = await store.recorded(key, fingerprint)
        if recorded is not None:
            return list(svc.ImportMcpServerResponse.FromString(recorded).tools)

        listed = await self._catalog.list_tools(request.server, request.policy, seconds)
        by_name = {tool.name: tool for tool in listed}
        wanted = list(request.remote_tool_names) or sorted(by_name)
        target = _server_label(request.server)
        for name in wanted:
            if name not in by_name:
                raise ToolRunnerError.remote_tool_not_found(
                    request.name_prefix + name, name, target
                )
        tools: list[tool_pb2.Tool] = []
        for remote_name in wanted:
            remote = by_name[remote_name]
            name = request.name_prefix + remote_name
            if not TOOL_NAME.fullmatch(name):
                raise ToolRunnerError.invalid_request(
                    [("remote_tool_names", f"{remote_name[:64]!r} does not make a valid tool name")]
                )
            schema_bad = schema_violations(
                remote.input_schema,
                "tool.definition.parameters_json_schema",
                require_object=True,
                required=True,
            )
            if schema_bad:
                raise ToolRunnerError.schema_invalid(name, schema_bad)
            tool = tool_pb2.Tool()
            tool.definition.name = name
            tool.definition.description = (remote.description or f"MCP tool {remote_name}")[:4096]
            tool.definition.parameters_json_schema = remote.input_schema
            tool.policy.CopyFrom(request.policy)
            tool.mcp_server.server.CopyFrom(request.server)
            tool.mcp_server.remote_tool_name = remote_name
            await self._registry.validate_local(tool)
            tools.append(tool)

        for _ in range(8):
            ops: list[RegistryOp] = []
            now = datetime.now(UTC)
            stored: list[tool_pb2.Tool] = []
            for tool in tools:
                name = tool.definition.name
                current, current_version = await store.get(name)
                item = tool_pb2.Tool()
                item.CopyFrom(tool)
                item.update_time.FromDatetime(now)
                item.updated_by = principal.user_id
                if current is not None:
                    if (
                        not request.update_existing
                        or current.WhichOneof("runtime") != "mcp_server"
                        or not same_server(current.mcp_server.server, request.server)
                    ):
                        raise ToolRunnerError.tool_already_exists(name, current_version)
                    item.version = current_version + 1
                    item.create_time.CopyFrom(current.create_time)
                    item.created_by = current.created_by
                    ops.append(
                        RegistryOp("update", name, expected_current=current_version, tool=item)
                    )
                else:
                    last = await store.last_version(name)
                    item.version = last + 1
                    item.create_time.FromDatetime(now)
                    item.created_by = principal.user_id
                    ops.append(RegistryOp("create", name, expected_last=last, tool=item))
                stamp(item)
                stored.append(item)
            stored.sort(key=lambda t: t.definition.name)
            if request.validate_only:
                return stored
            response = svc.ImportMcpServerResponse(tools=stored).SerializeToString()
            try:
                raw = await store.apply(
                    ops, request_key=key, fingerprint=fingerprint, response=response, ttl=self._ttl
                )
            except RegistryRace:
                continue
            return list(svc.ImportMcpServerResponse.FromString(raw).tools)
        raise ToolRunnerError.etag_mismatch(tools[0].definition.name if tools else "", "", 0)


def _server_label(server: tool_pb2.McpServer) -> str:
    if server.WhichOneof("transport") == "stdio":
        return server.stdio.command.rsplit("/", 1)[-1]
    from urllib.parse import urlsplit

    return urlsplit(server.streamable_http.url).hostname or ""


def schema_text(schema: object) -> str:
    """A declared schema as compact JSON text."""
    return json.dumps(schema, separators=(",", ":"), sort_keys=True)
