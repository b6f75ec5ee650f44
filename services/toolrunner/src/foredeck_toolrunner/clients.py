"""Calls to remote gRPC tool hosts (``ToolHostService``): listing tools and invoking them.

Channels are opened per target and kept; every call carries the caller's principal and never
outlives the caller's deadline (the kit's channel does both).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as svc_grpc
from foredeck_kit.channels import idempotent_methods, open_channel
from foredeck_kit.settings import ServiceSettings
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.execution import tool_error
from foredeck_toolrunner.domain.ports import CallContext, RunResult

if TYPE_CHECKING:
    from foredeck.toolrunner.v1.toolrunner_service_pb2_grpc import ToolHostServiceAsyncStub

__all__ = ["ToolHostClient"]

_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ToolHostClient:
    """Talks to gRPC tool hosts on behalf of the registry and the executor."""

    def __init__(self, settings: ServiceSettings) -> None:
        self._settings = settings
        self._channels: dict[tuple[str, bool], grpc.aio.Channel] = {}

    def _stub(self, runtime: tool_pb2.GrpcHostRuntime) -> ToolHostServiceAsyncStub:
        key = (runtime.target, runtime.use_tls)
        channel = self._channels.get(key)
        if channel is None:
            channel = open_channel(
                runtime.target,
                settings=self._settings,
                retry_methods=idempotent_methods(
                    svc.DESCRIPTOR.services_by_name["ToolHostService"]
                ),
                credentials=grpc.ssl_channel_credentials() if runtime.use_tls else None,
            )
            self._channels[key] = channel
        return svc_grpc.ToolHostServiceStub(channel)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    async def check_offers(self, tool: tool_pb2.Tool, seconds: float = 10.0) -> None:
        """Raise unless the host lists the tool (REMOTE_TOOL_NOT_FOUND / TOOL_HOST_UNAVAILABLE)."""
        runtime = tool.grpc_host
        name = tool.definition.name
        remote = runtime.remote_tool_name or name
        stub = self._stub(runtime)
        token = ""
        try:
            for _ in range(100):
                page = await stub.ListHostedTools(
                    svc.ListHostedToolsRequest(page_size=1000, page_token=token), timeout=seconds
                )
                if any(t.definition.name == remote for t in page.tools):
                    return
                token = page.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as error:
            raise ToolRunnerError.tool_host_unavailable(
                name, runtime.target, error.code().name
            ) from None
        raise ToolRunnerError.remote_tool_not_found(name, remote, runtime.target)

    async def run(self, call: CallContext) -> RunResult:
        """Invoke the tool on its host within the call's timeout."""
        runtime = call.tool.grpc_host
        name = call.tool.definition.name
        request = svc.InvokeToolRequest(
            tool_name=runtime.remote_tool_name or name,
            arguments_json=call.arguments_json,
            idempotency_key=call.idempotency_key,
            run_id=call.run_id,
            step_id=call.step_id,
            tool_call_id=call.tool_call_id,
        )
        request.timeout.FromTimedelta(timedelta(seconds=call.timeout))
        try:
            reply = await self._stub(runtime).InvokeTool(request, timeout=call.timeout)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code in _UNAVAILABLE:
                raise ToolRunnerError.tool_host_unavailable(
                    name, runtime.target, code.name
                ) from None
            if code is grpc.StatusCode.NOT_FOUND:
                raise ToolRunnerError.remote_tool_not_found(
                    name, request.tool_name, runtime.target
                ) from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return RunResult(
                    tool_error(
                        execution_pb2.TOOL_ERROR_KIND_TIMEOUT,
                        "the tool host did not answer within the tool's timeout",
                        retryable=True,
                    ),
                    kill_cause="timeout",
                )
            return RunResult(
                tool_error(
                    execution_pb2.TOOL_ERROR_KIND_REMOTE_ERROR,
                    "the tool host could not run the tool",
                    details={"upstreamCode": code.name},
                )
            )
        if not reply.HasField("outcome") or reply.outcome.WhichOneof("outcome") is None:
            return RunResult(
                tool_error(
                    execution_pb2.TOOL_ERROR_KIND_REMOTE_ERROR, "the tool host returned no outcome"
                )
            )
        return RunResult(reply.outcome)
