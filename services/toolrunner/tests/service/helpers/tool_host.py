"""A gRPC tool host in its own process, as a third party would write one: it implements
``foredeck.toolrunner.v1.ToolHostService`` from the contract and nothing of the runner.

``python tool_host.py`` binds 127.0.0.1 on a free port, prints ``PORT <n>`` and serves
``word_count`` (counts words) and ``sleepy`` (sleeps for ``seconds``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import grpc.aio

from foredeck.common.v1 import tool_pb2 as common_tool_pb2
from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as svc_grpc

TOOLS = {
    "word_count": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
    "sleepy": {"type": "object", "properties": {"seconds": {"type": "number"}}},
}


class Host(svc_grpc.ToolHostServiceServicer):
    """Serves the two tools."""

    async def ListHostedTools(
        self, request: svc.ListHostedToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> svc.ListHostedToolsResponse:
        """Every tool at once."""
        return svc.ListHostedToolsResponse(
            tools=[
                tool_pb2.HostedTool(
                    definition=common_tool_pb2.ToolDefinition(
                        name=name, description=f"{name} tool", parameters_json_schema=json.dumps(s)
                    )
                )
                for name, s in sorted(TOOLS.items())
            ]
        )

    async def InvokeTool(
        self, request: svc.InvokeToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> svc.InvokeToolResponse:
        """Run one tool."""
        arguments = json.loads(request.arguments_json)
        if request.tool_name == "word_count":
            words = len(str(arguments["text"]).split())
            output = json.dumps({"words": words, "key": request.idempotency_key})
            return svc.InvokeToolResponse(
                outcome=execution_pb2.ToolOutcome(
                    output=execution_pb2.ToolOutput(output_json=output)
                )
            )
        if request.tool_name == "sleepy":
            await asyncio.sleep(float(arguments.get("seconds", 0)))
            return svc.InvokeToolResponse(
                outcome=execution_pb2.ToolOutcome(
                    output=execution_pb2.ToolOutput(output_json="true")
                )
            )
        await context.abort(grpc.StatusCode.NOT_FOUND, "unknown tool")
        raise AssertionError("unreachable")


async def main() -> None:
    """Serve until terminated."""
    server = grpc.aio.server()
    svc_grpc.add_ToolHostServiceServicer_to_server(Host(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
