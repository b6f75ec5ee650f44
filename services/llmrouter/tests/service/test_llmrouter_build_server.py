"""The production factory: `build_server` opens its clients on start, serves, and closes on stop;
a run's delegated principal may only name its own run."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from foredeck.common.v1 import chat_pb2
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceStub
from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.errors import error_details
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    PrincipalSigner,
    format_keys,
    generate_key,
)
from foredeck_llmrouter.config import LlmRouterSettings
from foredeck_llmrouter.server import build_server
from foredeck_testing.provider import ScriptedProvider


def _request(run_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-4o",
        messages=[
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_USER,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="hi"))],
            )
        ],
        metadata=generation_pb2.CallMetadata(run_id=run_id),
    )


async def test_built_server_serves_and_checks_delegated_runs(
    scripted_provider: ScriptedProvider, redis_url: str
) -> None:
    gateway_keys = {"gw": generate_key()}
    delegation_keys = {"orch": generate_key()}
    settings = LlmRouterSettings(
        redis_url=redis_url,
        openai_api_key=SecretStr("test-key"),
        openai_base_url=scripted_provider.openai_base_url,
        anthropic_api_key=SecretStr(""),
        local_enabled=False,
        local_embeddings_enabled=False,
        principal_keys=SecretStr(format_keys(gateway_keys)),
        delegation_keys=SecretStr(format_keys(delegation_keys)),
        metrics_port=-1,
        grace_period_seconds=1.0,
    )
    host = build_server(settings)
    await host.start()
    try:
        await host.wait_ready()
        async with grpc.aio.insecure_channel(host.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="foredeck.llmrouter.v1.LlmRouterService"),
                timeout=5,
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = LlmRouterServiceStub(channel)
            user = PrincipalSigner(gateway_keys, "gw").mint(
                tenant_id="t", user_id="u", permissions=["llm:generate"]
            )
            reply = await stub.Generate(
                _request("any-run"), metadata=((PRINCIPAL_METADATA_KEY, user),), timeout=5
            )
            assert reply.model == "gpt-4o"
            delegated = DelegationSigner(delegation_keys, "orch").mint_for_run(
                RunClaims("t", "u", ("llm:generate",)), "run-1"
            )
            own = await stub.Generate(
                _request("run-1"), metadata=((PRINCIPAL_METADATA_KEY, delegated),), timeout=5
            )
            assert own.message.parts[0].text.text
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(
                    _request("run-2"), metadata=((PRINCIPAL_METADATA_KEY, delegated),), timeout=5
                )
    finally:
        await host.stop(grace=0)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(caught.value).reason == "DELEGATION_NOT_ALLOWED"
    assert len(scripted_provider.requests) == 2
