"""Thin gRPC servicers: request in, domain call, response out; errors mapped on the way."""

from __future__ import annotations

from typing import Any

import grpc.aio

from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as svc_grpc
from foredeck_kit.context import current_rpc
from foredeck_kit.principal import current_principal
from foredeck_toolrunner.domain.execution import Executor
from foredeck_toolrunner.domain.mcp_import import McpImporter
from foredeck_toolrunner.domain.registry import ToolRegistry, definitions, render
from foredeck_toolrunner.errors import maps_errors

__all__ = ["RegistryServicer", "RunnerServicer"]

Context = grpc.aio.ServicerContext[Any, Any]


class RegistryServicer(svc_grpc.ToolRegistryServiceServicer):
    """``foredeck.toolrunner.v1.ToolRegistryService``."""

    def __init__(self, registry: ToolRegistry, importer: McpImporter) -> None:
        self._registry = registry
        self._importer = importer

    @maps_errors
    async def RegisterTool(
        self, request: svc.RegisterToolRequest, context: Context
    ) -> svc.RegisterToolResponse:
        """Add a tool."""
        tool = await self._registry.register(current_principal(), request)
        return svc.RegisterToolResponse(tool=tool)

    @maps_errors
    async def UpdateTool(
        self, request: svc.UpdateToolRequest, context: Context
    ) -> svc.UpdateToolResponse:
        """Replace a tool's content as a new version."""
        tool = await self._registry.update(current_principal(), request)
        return svc.UpdateToolResponse(tool=tool)

    @maps_errors
    async def DeregisterTool(
        self, request: svc.DeregisterToolRequest, context: Context
    ) -> svc.DeregisterToolResponse:
        """Remove a tool and its versions."""
        tool = await self._registry.deregister(current_principal(), request)
        return svc.DeregisterToolResponse(tool=tool)

    @maps_errors
    async def GetTool(self, request: svc.GetToolRequest, context: Context) -> svc.GetToolResponse:
        """One tool."""
        tool = await self._registry.get(current_principal(), request)
        return svc.GetToolResponse(tool=tool)

    @maps_errors
    async def ListTools(
        self, request: svc.ListToolsRequest, context: Context
    ) -> svc.ListToolsResponse:
        """A page of the tools visible to the caller."""
        tools, token = await self._registry.list_page(current_principal(), request)
        return svc.ListToolsResponse(tools=tools, next_page_token=token)

    @maps_errors
    async def ExportToolSchemas(
        self, request: svc.ExportToolSchemasRequest, context: Context
    ) -> svc.ExportToolSchemasResponse:
        """The caller's runnable tools as model-facing definitions."""
        tools, token = await self._registry.export_page(current_principal(), request)
        return svc.ExportToolSchemasResponse(
            tool_definitions=definitions(tools),
            document_json=render(tools, request.format),
            next_page_token=token,
        )

    @maps_errors
    async def ImportMcpServer(
        self, request: svc.ImportMcpServerRequest, context: Context
    ) -> svc.ImportMcpServerResponse:
        """Register an MCP server's tools."""
        left = context.time_remaining()
        timeout = 30.0 if left is None else max(left - 0.05, 0.0)
        tools = await self._importer.import_server(current_principal(), request, timeout)
        return svc.ImportMcpServerResponse(tools=tools)


class RunnerServicer(svc_grpc.ToolRunnerServiceServicer):
    """``foredeck.toolrunner.v1.ToolRunnerService``."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    @maps_errors
    async def ExecuteTool(
        self, request: svc.ExecuteToolRequest, context: Context
    ) -> svc.ExecuteToolResponse:
        """Run one tool call."""
        rpc = current_rpc()
        return await self._executor.execute(
            current_principal(),
            request,
            time_remaining=context.time_remaining,
            principal_token=rpc.principal_token if rpc is not None else None,
        )
