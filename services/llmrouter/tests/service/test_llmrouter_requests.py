"""Bad input, model catalog reads, routing by name and alias, accounting and telemetry."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from foredeck.common.v1 import chat_pb2, tool_pb2
from foredeck.llmrouter.v1 import generation_pb2, model_pb2, provider_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck_kit.errors import error_details
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_testing.provider import Endpoint, ScriptedProvider, TextReply, Usage
from foredeck_testing.server import RunningServer

if TYPE_CHECKING:
    from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceAsyncStub

    RouterFactory = Callable[
        ..., AbstractAsyncContextManager[tuple[RunningServer, LlmRouterServiceAsyncStub]]
    ]


def _user(text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(
        role=chat_pb2.ROLE_USER, parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))]
    )


async def test_unknown_model_lists_known_models(router_factory: RouterFactory) -> None:
    async with router_factory() as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(
                pb.GenerateRequest(model="no-such-model", messages=[_user("hi")]),
                metadata=server.mint(),
                timeout=5,
            )
    details = error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details.reason == "MODEL_NOT_FOUND"
    assert details.metadata["model"] == "no-such-model"
    known = details.metadata["knownModels"].split(",")
    assert {"claude-sonnet-4-6", "sonnet", "gpt-4o", "haiku"} <= set(known)
    assert "text-embedding-3-small" not in known


async def test_malformed_messages_name_every_bad_field(router_factory: RouterFactory) -> None:
    bad = pb.GenerateRequest(
        model="gpt-4o",
        messages=[
            chat_pb2.ChatMessage(parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="x"))]),
            chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER),
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_USER,
                parts=[
                    chat_pb2.ContentPart(),
                    chat_pb2.ContentPart(
                        tool_call=tool_pb2.ToolCall(
                            tool_call_id="c1", tool_name="f", arguments_json="["
                        )
                    ),
                ],
            ),
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_TOOL,
                parts=[chat_pb2.ContentPart(tool_result=tool_pb2.ToolResult(tool_call_id="zz"))],
            ),
        ],
        sampling=generation_pb2.SamplingParams(temperature=3.0),
    )
    async with router_factory() as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(bad, metadata=server.mint(), timeout=5)
    details = error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_REQUEST"
    fields = [v.field for v in details.field_violations]
    assert fields == [
        "messages[0].role",
        "messages[1].parts",
        "messages[2].parts[0]",
        "messages[2].parts[1]",
        "messages[2].parts[1].tool_call.arguments_json",
        "messages[3].parts[0].tool_result.tool_call_id",
        "sampling.temperature",
    ]


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "array"}', 'top-level "type" must be "object"'),
        ('{"type": "object", "properties": {"a": {"type": 5}}}', "not a valid JSON Schema"),
    ],
)
async def test_bad_tool_schema(router_factory: RouterFactory, schema: str, problem: str) -> None:
    tools = [
        tool_pb2.ToolDefinition(name="ok", parameters_json_schema='{"type": "object"}'),
        tool_pb2.ToolDefinition(name="broken", parameters_json_schema=schema),
    ]
    async with router_factory() as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(
                pb.GenerateRequest(model="gpt-4o", messages=[_user("hi")], tools=tools),
                metadata=server.mint(),
                timeout=5,
            )
    details = error_details(caught.value)
    assert (caught.value.code(), details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TOOL_SCHEMA",
    )
    assert details.metadata == {"toolName": "broken"}
    assert [v.field for v in details.field_violations] == ["tools[1].parameters_json_schema"]
    assert problem in details.field_violations[0].description


async def test_permission_is_required(router_factory: RouterFactory) -> None:
    async with router_factory() as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(
                pb.GenerateRequest(model="gpt-4o", messages=[_user("hi")]),
                metadata=server.mint(permissions=["llm:read"]),
                timeout=5,
            )
    details = error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details.metadata == {"permission": "llm:generate"}


async def test_models_and_providers_are_listed_with_health(router_factory: RouterFactory) -> None:
    async with router_factory() as (server, stub):
        metadata = server.mint(permissions=["llm:read"])
        first = await stub.ListModels(
            pb.ListModelsRequest(page_size=2), metadata=metadata, timeout=5
        )
        rest = await stub.ListModels(
            pb.ListModelsRequest(page_size=100, page_token=first.next_page_token),
            metadata=metadata,
            timeout=5,
        )
        names = [m.name for m in [*first.models, *rest.models]]
        assert names == sorted(names)
        assert rest.next_page_token == ""
        model = (
            await stub.GetModel(pb.GetModelRequest(model="sonnet"), metadata=metadata, timeout=5)
        ).model
        assert (model.name, model.provider, model.provider_kind) == (
            "claude-sonnet-4-6",
            "anthropic",
            provider_pb2.PROVIDER_KIND_ANTHROPIC,
        )
        assert model.is_default
        assert model.pricing.input_usd_micros_per_million_tokens == 3_000_000
        assert model.circuit_state == provider_pb2.CIRCUIT_STATE_CLOSED
        assert model.capabilities.tools
        assert model.capabilities.streaming
        embedding = await stub.ListModels(
            pb.ListModelsRequest(kind=model_pb2.MODEL_KIND_EMBEDDING), metadata=metadata, timeout=5
        )
        assert [m.name for m in embedding.models] == ["text-embedding-3-small"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListModels(
                pb.ListModelsRequest(
                    kind=model_pb2.MODEL_KIND_EMBEDDING, page_token=first.next_page_token
                ),
                metadata=metadata,
                timeout=5,
            )
        assert error_details(caught.value).reason == "PAGE_TOKEN_INVALID"
        providers = await stub.ListProviders(
            pb.ListProvidersRequest(), metadata=metadata, timeout=5
        )
        assert [(p.name, p.credentials_configured) for p in providers.providers] == [
            ("anthropic", True),
            ("openai", True),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetProviderHealth(
                pb.GetProviderHealthRequest(provider="nope"), metadata=metadata, timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(caught.value).metadata == {
            "provider": "nope",
            "knownProviders": "anthropic,openai",
        }


async def test_routing_by_pattern_alias_and_tenant_default(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    self_hosted = {
        "name": "vllm-eu",
        "base_url": scripted_provider.openai_base_url,
    }
    model = {
        "name": "llama-3-70b",
        "provider": "vllm-eu",
        "provider_model": "meta-llama/Llama-3-70B",
        "aliases": ["big"],
    }
    async with router_factory(
        providers=[self_hosted],
        models=[model],
        tenant_default_models={"tenant-b": "big"},
    ) as (server, stub):
        for requested, tenant in (
            ("claude-opus-4-8", "tenant-a"),
            ("o4-mini", "tenant-a"),
            ("", "tenant-b"),
            ("", "tenant-a"),
        ):
            await stub.Generate(
                pb.GenerateRequest(model=requested, messages=[_user("hi")]),
                metadata=server.mint(tenant_id=tenant),
                timeout=5,
            )
    sent = [(r.endpoint, r.model) for r in scripted_provider.requests]
    assert sent == [
        (Endpoint.ANTHROPIC_MESSAGES, "claude-opus-4-8"),
        (Endpoint.OPENAI_CHAT_COMPLETIONS, "o4-mini"),
        (Endpoint.OPENAI_CHAT_COMPLETIONS, "meta-llama/Llama-3-70B"),
        (Endpoint.ANTHROPIC_MESSAGES, "claude-sonnet-4-6"),
    ]
    # A self-hosted server gets the older token limit parameter.
    assert "max_tokens" in scripted_provider.requests[2].body


async def test_usage_cost_metrics_and_span(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "llmrouter",
        ServiceSettings(metrics_port=-1),
        environ={"OTEL_TRACES_SAMPLER": "always_on"},
        span_exporter=exporter,
        set_global=False,
        configure_logs=False,
    )
    scripted_provider.enqueue(
        TextReply(
            "cached answer",
            usage=Usage(
                input_tokens=100,
                output_tokens=20,
                cache_read_input_tokens=1000,
                cache_creation_input_tokens=200,
            ),
        )
    )
    try:
        async with router_factory(telemetry=telemetry) as (server, stub):
            reply = await stub.Generate(
                pb.GenerateRequest(
                    model="claude-sonnet-4-6",
                    messages=[_user("hi")],
                    system_prompt="You are terse.",
                    cache_prompt=True,
                    sampling=generation_pb2.SamplingParams(temperature=0.5, max_output_tokens=64),
                ),
                metadata=server.mint(),
                timeout=5,
            )
    finally:
        telemetry.shutdown()
    usage = reply.usage
    assert (usage.input_tokens, usage.output_tokens) == (100, 20)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (1000, 200)
    # 100 * 3 + 20 * 15 + 1000 * 0.3 + 200 * 3.75 micro-dollars.
    assert usage.cost_usd_micros == 300 + 300 + 300 + 750
    body = scripted_provider.requests[0].body
    assert body["system"] == [
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}
    ]
    registry = telemetry.metrics.registry
    for direction, value in (
        ("input", 100),
        ("output", 20),
        ("cache_read", 1000),
        ("cache_write", 200),
    ):
        sample = registry.get_sample_value(
            "agent_llm_tokens_total", {"model": "claude-sonnet-4-6", "direction": direction}
        )
        assert sample == value
    assert (
        registry.get_sample_value(
            "llmrouter_provider_call_seconds_count",
            {
                "provider": "anthropic",
                "model": "claude-sonnet-4-6",
                "operation": "chat",
                "outcome": "ok",
            },
        )
        == 1
    )
    spans = [s for s in exporter.get_finished_spans() if s.name == "chat claude-sonnet-4-6"]
    assert len(spans) == 1
    attributes = dict(spans[0].attributes or {})
    assert attributes["gen_ai.system"] == "anthropic"
    assert attributes["gen_ai.request.model"] == "claude-sonnet-4-6"
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.usage.input_tokens"] == 100
    assert attributes["gen_ai.usage.output_tokens"] == 20
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    server_spans = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert spans[0].parent is not None
    assert spans[0].parent.span_id == server_spans[0].context.span_id


async def test_structured_output_is_validated(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    scripted_provider.enqueue(TextReply('{"n": "three"}'), TextReply('{"n": 3}'))
    request = pb.GenerateRequest(
        model="gpt-4o",
        messages=[_user("a number")],
        response_format=generation_pb2.ResponseFormat(
            type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=json.dumps(schema),
            schema_name="number",
        ),
    )
    async with router_factory() as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request, metadata=server.mint(), timeout=5)
        reply = await stub.Generate(request, metadata=server.mint(), timeout=5)
    details = error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "STRUCTURED_OUTPUT_INVALID"
    assert details.metadata == {"model": "gpt-4o", "schemaName": "number", "violationPath": "/n"}
    assert json.loads(reply.message.parts[0].text.text) == {"n": 3}
    sent = scripted_provider.requests[0].body["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "number", "schema": schema}}


async def test_embed_through_openai(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    async with router_factory() as (server, stub):
        reply = await stub.Embed(
            pb.EmbedRequest(texts=["a", "b", "c"], dimensions=8),
            metadata=server.mint(permissions=["llm:embed"]),
            timeout=5,
        )
    assert (reply.model, reply.provider, reply.dimensions) == (
        "text-embedding-3-small",
        "openai",
        8,
    )
    assert [e.index for e in reply.embeddings] == [0, 1, 2]
    assert all(len(e.values) == 8 for e in reply.embeddings)
    assert scripted_provider.requests_to(Endpoint.OPENAI_EMBEDDINGS)[0].body["input"] == [
        "a",
        "b",
        "c",
    ]


async def test_count_tokens_estimates_high_and_prices_the_worst_case(
    router_factory: RouterFactory,
) -> None:
    text = "x" * 3000
    async with router_factory() as (server, stub):
        reply = await stub.CountTokens(
            pb.CountTokensRequest(model="sonnet", messages=[_user(text)], max_output_tokens=1000),
            metadata=server.mint(permissions=["llm:read"]),
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(
                pb.EmbedRequest(texts=["a"], dimensions=5000),
                metadata=server.mint(),
                timeout=5,
            )
    # Real text averages about four characters a token; the estimate counts three.
    assert reply.input_tokens >= len(text) // 3
    assert not reply.exact
    assert (reply.model, reply.provider) == ("claude-sonnet-4-6", "anthropic")
    assert reply.fits_context_window
    assert reply.max_output_tokens == 1000
    expected = -(-(reply.input_tokens * 3_000_000 + 1000 * 15_000_000) // 1_000_000)
    assert reply.max_cost_usd_micros == expected
    details = error_details(caught.value)
    assert details.reason == "INVALID_REQUEST"
    assert [v.field for v in details.field_violations] == ["dimensions"]
