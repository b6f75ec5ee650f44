"""The embedded SmolLM2 model answers, and returns schema-valid JSON under a grammar.

The model loads once for the module; without API keys the router defaults to it, as `make run`
does offline.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import jsonschema
import pytest
import pytest_asyncio
from pydantic import SecretStr

from foredeck.common.v1 import chat_pb2
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceStub
from foredeck_kit.errors import domain_for
from foredeck_llmrouter.adapters.local_embeddings import LocalEmbeddings
from foredeck_llmrouter.adapters.local_provider import (
    LocalModel,
    LocalModelConfig,
    bundled_model_path,
)
from foredeck_llmrouter.config import LlmRouterSettings
from foredeck_llmrouter.server import RouterDeps, RouterRuntime
from foredeck_llmrouter.servicer import SERVICE_NAME
from foredeck_testing.server import RunningServer, running_server

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "population": {"type": "integer"},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}

if TYPE_CHECKING:
    from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceAsyncStub


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def local_model() -> AsyncIterator[LocalModel]:
    model = LocalModel(LocalModelConfig(model_path=bundled_model_path(), context_tokens=1024))
    await model.load()
    yield model
    model.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def local_embeddings() -> AsyncIterator[LocalEmbeddings]:
    embeddings = LocalEmbeddings()
    await embeddings.load()
    yield embeddings
    embeddings.close()


@pytest.fixture
async def offline_router(
    local_model: LocalModel, local_embeddings: LocalEmbeddings, redis_url: str
) -> AsyncIterator[tuple[RunningServer, LlmRouterServiceAsyncStub]]:
    settings = LlmRouterSettings(
        redis_url=redis_url, anthropic_api_key=SecretStr(""), openai_api_key=SecretStr("")
    )
    runtime = RouterRuntime(
        settings, RouterDeps(local_model=local_model, local_embeddings=local_embeddings)
    )
    await runtime.open()
    try:
        async with running_server(
            runtime.register,
            service_names=[SERVICE_NAME],
            domain=domain_for("llmrouter"),
            settings=settings,
            readiness=runtime.readiness,
        ) as server:
            yield server, LlmRouterServiceStub(server.channel)
    finally:
        await runtime.close()


def _user(text: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(
        role=chat_pb2.ROLE_USER, parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))]
    )


async def test_local_model_is_the_offline_default_and_answers(
    offline_router: tuple[RunningServer, LlmRouterServiceAsyncStub],
) -> None:
    server, stub = offline_router
    reply = await stub.Generate(
        pb.GenerateRequest(
            messages=[_user("What is the capital of France? Answer in one word.")],
            sampling=generation_pb2.SamplingParams(max_output_tokens=16, temperature=0, seed=1),
        ),
        metadata=server.mint(),
        timeout=60,
    )
    assert (reply.provider, reply.model) == ("local", "smollm2-135m-instruct")
    assert reply.message.parts[0].text.text.strip()
    assert reply.usage.output_tokens > 0
    assert reply.usage.input_tokens > 0
    assert reply.usage.cost_usd_micros == 0


async def test_local_model_returns_schema_valid_json(
    offline_router: tuple[RunningServer, LlmRouterServiceAsyncStub],
) -> None:
    server, stub = offline_router
    request = pb.StreamGenerateRequest(
        model="local",
        messages=[_user("Give the city and population of Paris as JSON.")],
        response_format=generation_pb2.ResponseFormat(
            type=generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(SCHEMA)
        ),
        sampling=generation_pb2.SamplingParams(max_output_tokens=96, temperature=0, seed=1),
    )
    events = [e async for e in stub.StreamGenerate(request, metadata=server.mint(), timeout=120)]
    assert events[-1].WhichOneof("event") == "finished", events[-1]
    text = "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_local_embeddings(
    offline_router: tuple[RunningServer, LlmRouterServiceAsyncStub],
) -> None:
    server, stub = offline_router
    reply = await stub.Embed(
        pb.EmbedRequest(texts=["a cat sat on the mat", "a kitten on a rug", "stock prices fell"]),
        metadata=server.mint(),
        timeout=30,
    )
    assert (reply.model, reply.provider, reply.dimensions) == ("all-minilm-l6-v2", "local", 384)
    vectors = [list(e.values) for e in reply.embeddings]
    dot = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors]
    assert dot[0] == pytest.approx(1.0, abs=1e-5)
    assert dot[1] > dot[2]
