"""The production server (``build_server``) with the gateway's and the orchestrator's keys: a
run's delegated principal may run tools for its own run only and never change the registry."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from pydantic import SecretStr
from redis.asyncio import Redis

from foredeck.toolrunner.v1 import tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as svc_grpc
from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.errors import error_details
from foredeck_kit.idempotency import tool_effect_key
from foredeck_kit.metrics import Metrics
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY, PrincipalSigner, format_keys
from foredeck_toolrunner.adapters.sandbox import Sandbox, SandboxCapabilities
from foredeck_toolrunner.config import ToolRunnerSettings
from foredeck_toolrunner.server import Deps, build_server

GATEWAY_KEYS = {"gateway-test": b"g" * 48}
DELEGATION_KEYS = {"orchestrator-test": b"o" * 48}


@dataclass
class Production:
    channel: grpc.aio.Channel
    gateway: PrincipalSigner
    orchestrator: DelegationSigner

    def gateway_md(self) -> tuple[tuple[str, str], ...]:
        token = self.gateway.mint(tenant_id="t1", user_id="u1", permissions=["*"])
        return ((PRINCIPAL_METADATA_KEY, token),)

    def run_md(self, run_id: str) -> tuple[tuple[str, str], ...]:
        claims = RunClaims(tenant_id="t1", user_id="u1", permissions=("*",))
        return ((PRINCIPAL_METADATA_KEY, self.orchestrator.mint_for_run(claims, run_id)),)


@pytest_asyncio.fixture
async def production(
    redis_url: str, sandbox_capabilities: SandboxCapabilities
) -> AsyncIterator[Production]:
    settings = ToolRunnerSettings(
        redis_url=redis_url,
        metrics_port=-1,
        grace_period_seconds=1.0,
        principal_keys=SecretStr(format_keys(GATEWAY_KEYS)),
        delegation_keys=SecretStr(format_keys(DELEGATION_KEYS)),
    )
    deps = Deps(
        redis=Redis.from_url(redis_url),
        sandbox=Sandbox(sandbox_capabilities, uid_base=420_000, max_concurrent=4),
        metrics=Metrics(),
    )
    host = build_server(settings, deps)
    await host.start()
    channel = grpc.aio.insecure_channel(host.address)
    try:
        await host.wait_ready()
        yield Production(
            channel,
            PrincipalSigner(GATEWAY_KEYS, "gateway-test"),
            settings.delegation_signer(),
        )
    finally:
        await channel.close(None)
        await host.stop(0)
        await host.toolrunner.close()  # type: ignore[attr-defined]


async def test_a_run_cannot_change_the_registry(production: Production) -> None:
    registry = svc_grpc.ToolRegistryServiceStub(production.channel)
    tool = tool_pb2.Tool(builtin=tool_pb2.BuiltinRuntime(builtin_name="calculator"))
    tool.definition.name = "calc2"
    tool.definition.description = "d"
    tool.definition.parameters_json_schema = json.dumps({"type": "object"})
    request = svc.RegisterToolRequest(request_id="r1", tool=tool)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.RegisterTool(request, metadata=production.run_md("run-1"))
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "DELEGATION_NOT_ALLOWED"
    reply = await registry.RegisterTool(request, metadata=production.gateway_md())
    assert reply.tool.version == 1


async def test_a_run_executes_only_for_itself(production: Production) -> None:
    runner = svc_grpc.ToolRunnerServiceStub(production.channel)

    def call(run_id: str) -> svc.ExecuteToolRequest:
        return svc.ExecuteToolRequest(
            tool_name="calculator",
            arguments_json=json.dumps({"expression": "2+2"}),
            run_id=run_id,
            step_id="s1",
            idempotency_key=tool_effect_key(run_id, "s1"),
        )

    reply = await runner.ExecuteTool(call("run-1"), metadata=production.run_md("run-1"))
    assert json.loads(reply.outcome.output.output_json) == {"result": 4}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runner.ExecuteTool(call("run-2"), metadata=production.run_md("run-1"))
    assert error_details(caught.value).reason == "DELEGATION_NOT_ALLOWED"
    unnamed = svc.ExecuteToolRequest(
        tool_name="calculator",
        arguments_json=json.dumps({"expression": "1"}),
        idempotency_key=uuid.uuid4().hex,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runner.ExecuteTool(unnamed, metadata=production.run_md("run-1"))
    assert error_details(caught.value).reason == "DELEGATION_NOT_ALLOWED"
