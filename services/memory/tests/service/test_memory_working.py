"""Working memory over gRPC on real Redis, with summaries through a scripted llmrouter server."""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from foredeck.common.v1 import chat_pb2, usage_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as lr
from foredeck.llmrouter.v1 import llmrouter_service_pb2_grpc as lr_grpc
from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck.memory.v1 import session_pb2
from foredeck_kit.errors import ServiceError, error_details
from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.server import MemoryDeps
from foredeck_memory.testing import MemoryServer, memory_settings, signing_keys, start_memory_server
from foredeck_testing.server import RunningServer, running_server
from foredeck_testing.stores import GraphDatabaseRef


@dataclass
class ScriptedRouter(lr_grpc.LlmRouterServiceServicer):
    """llmrouter's Generate, answering from a script and recording what it was asked.

    The other RPCs keep the generated base's UNIMPLEMENTED answer.
    """

    replies: list[str | ServiceError] = field(default_factory=list)
    requests: list[lr.GenerateRequest] = field(default_factory=list)
    embed_requests: list[lr.EmbedRequest] = field(default_factory=list)
    embed_failures: list[ServiceError] = field(default_factory=list)

    async def Embed(self, request: lr.EmbedRequest, context: Any) -> lr.EmbedResponse:
        self.embed_requests.append(request)
        if self.embed_failures:
            raise self.embed_failures.pop(0)
        out = lr.EmbedResponse(model=request.model, dimensions=request.dimensions)
        for index, text in enumerate(request.texts):
            # Deterministic, not semantic: equal texts get equal unit vectors.
            digest = hashlib.sha256(text.encode()).digest()
            raw = [b - 127.5 for b in digest[: request.dimensions]]
            norm = math.sqrt(sum(x * x for x in raw))
            out.embeddings.add(index=index, values=[x / norm for x in raw])
        return out

    async def Generate(self, request: lr.GenerateRequest, context: Any) -> lr.GenerateResponse:
        self.requests.append(request)
        step = self.replies.pop(0) if self.replies else "summary of the earlier turns"
        if isinstance(step, ServiceError):
            raise step
        return lr.GenerateResponse(
            message=chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_ASSISTANT,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=step))],
            ),
            model="scripted-small",
            usage=usage_pb2.Usage(input_tokens=120, output_tokens=12),
        )


@dataclass
class WithRouter:
    memory: MemoryServer
    router: ScriptedRouter
    router_server: RunningServer


@pytest_asyncio.fixture
async def with_router(
    redis_url: str, graph_database: GraphDatabaseRef, tmp_path: Path, embedder: LocalEmbedder
) -> AsyncIterator[WithRouter]:
    keys = signing_keys()
    # The stubs mark every RPC abstract; at run time the base answers UNIMPLEMENTED.
    router = ScriptedRouter()  # type: ignore[abstract]
    async with running_server(
        lambda server: lr_grpc.add_LlmRouterServiceServicer_to_server(router, server),
        service_names=["foredeck.llmrouter.v1.LlmRouterService"],
        domain="llmrouter.foredeck.dev",
        keys=keys,
    ) as router_server:
        settings = memory_settings(
            redis_url=redis_url,
            bolt_uri=graph_database.uri,
            bolt_user=graph_database.user,
            bolt_password=graph_database.password,
            graph_database=graph_database.name,
            edge_path=tmp_path / "vectors",
            keys=keys,
            llmrouter_address=router_server.address,
            summarization_model="scripted-small",
        )
        deps = MemoryDeps(embedder=embedder, count_tokens=embedder.count_tokens)
        memory = await start_memory_server(settings, deps, keys)
        try:
            yield WithRouter(memory, router, router_server)
        finally:
            await memory.stop()


def text(role: int, content: str) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(
        role=role,  # type: ignore[arg-type]
        parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=content))],
    )


async def append(server: MemoryServer, session: str, *messages: chat_pb2.ChatMessage) -> list[int]:
    reply = await server.working.AppendMessages(
        ms.AppendMessagesRequest(
            request_id=str(uuid.uuid4()), session_id=session, messages=list(messages)
        ),
        metadata=server.as_user(),
    )
    return list(reply.sequences)


async def test_context_window_summarises_oldest_turns_and_keeps_them(
    with_router: WithRouter,
) -> None:
    server = with_router.memory
    await append(server, "s1", text(chat_pb2.ROLE_SYSTEM, "You are a helpful travel agent."))
    for i in range(12):
        await append(
            server,
            "s1",
            text(chat_pb2.ROLE_USER, f"Question {i}: what about the hotel in city number {i}?"),
            text(chat_pb2.ROLE_ASSISTANT, f"Answer {i}: the hotel in city {i} has rooms free."),
        )
    with_router.router.replies.append("The user asked about hotels in cities 0 to 7.")
    window = await server.working.GetContextWindow(
        ms.GetContextWindowRequest(session_id="s1", token_budget=200, model="gpt-4o"),
        metadata=server.as_user(),
    )
    assert window.summarized
    assert window.total_tokens <= 200
    assert window.system_message.message.parts[0].text.text == "You are a helpful travel agent."
    assert (
        window.summary.message.parts[0].text.text == "The user asked about hotels in cities 0 to 7."
    )
    assert window.summary.first_sequence == 2
    assert window.summary.last_sequence == window.messages[0].sequence - 1
    assert window.messages[-1].sequence == 25
    assert window.tokenizer == "all-MiniLM-L6-v2-wordpiece"
    assert window.summarization_usage.output_tokens == 12
    [asked] = with_router.router.requests
    assert asked.model == "scripted-small"
    assert "Question 0" in asked.messages[0].parts[0].text.text

    # Nothing was lost: every message is still listed, the summarised ones name the summary.
    listed = await server.working.ListMessages(
        ms.ListMessagesRequest(session_id="s1"), metadata=server.as_user()
    )
    assert [m.sequence for m in listed.messages] == list(range(1, 26))
    assert listed.messages[1].summary_id == window.summary.summary_id
    assert listed.messages[-1].summary_id == ""
    assert [s.summary_id for s in listed.summaries] == [window.summary.summary_id]

    # The same window again reuses the stored summary: no second model call.
    again = await server.working.GetContextWindow(
        ms.GetContextWindowRequest(session_id="s1", token_budget=200, model="gpt-4o"),
        metadata=server.as_user(),
    )
    assert not again.summarized
    assert again.summary.summary_id == window.summary.summary_id
    assert len(with_router.router.requests) == 1


async def test_truncate_policy_never_calls_the_router(with_router: WithRouter) -> None:
    server = with_router.memory
    for i in range(10):
        await append(server, "s2", text(chat_pb2.ROLE_USER, f"message number {i} " * 5))
    window = await server.working.GetContextWindow(
        ms.GetContextWindowRequest(
            session_id="s2",
            token_budget=80,
            model="gpt-4o",
            overflow_policy=session_pb2.OVERFLOW_POLICY_TRUNCATE,
        ),
        metadata=server.as_user(),
    )
    assert not window.summarized
    assert window.omitted_message_count == 10 - len(window.messages)
    assert window.omitted_message_count > 0
    assert window.total_tokens <= 80
    assert with_router.router.requests == []


async def test_summarisation_failure_is_unavailable_and_stores_nothing(
    with_router: WithRouter,
) -> None:
    server = with_router.memory
    for i in range(10):
        await append(server, "s3", text(chat_pb2.ROLE_USER, f"message number {i} " * 5))
    with_router.router.replies.append(
        ServiceError(grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "provider down")
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await server.working.GetContextWindow(
            ms.GetContextWindowRequest(session_id="s3", token_budget=80, model="gpt-4o"),
            metadata=server.as_user(),
        )
    details = error_details(failure.value)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details.reason == "SUMMARIZATION_FAILED"
    assert details.metadata["upstreamReason"] == "PROVIDER_UNAVAILABLE"
    assert details.retry_after is not None
    listed = await server.working.ListMessages(
        ms.ListMessagesRequest(session_id="s3"), metadata=server.as_user()
    )
    assert listed.summaries == []
    assert listed.session.summary_count == 0


async def test_budget_too_small(with_router: WithRouter) -> None:
    server = with_router.memory
    await append(server, "s4", text(chat_pb2.ROLE_SYSTEM, "system prompt " * 20))
    await append(server, "s4", text(chat_pb2.ROLE_USER, "hello"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await server.working.GetContextWindow(
            ms.GetContextWindowRequest(session_id="s4", token_budget=10, model="gpt-4o"),
            metadata=server.as_user(),
        )
    details = error_details(failure.value)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "TOKEN_BUDGET_TOO_SMALL"
    assert int(details.metadata["requiredTokens"]) > 10


async def test_concurrent_appends_keep_order(memory_server: MemoryServer) -> None:
    async def worker(name: str) -> list[int]:
        sequences = []
        for i in range(20):
            got = await append(memory_server, "shared", text(chat_pb2.ROLE_USER, f"{name}-{i}"))
            sequences.extend(got)
        return sequences

    results = await asyncio.gather(*(worker(f"w{n}") for n in range(5)))
    everything = sorted(s for r in results for s in r)
    assert everything == list(range(1, 101))
    for sequences in results:
        assert sequences == sorted(sequences)
    listed = await memory_server.working.ListMessages(
        ms.ListMessagesRequest(session_id="shared", page_size=1000),
        metadata=memory_server.as_user(),
    )
    by_worker: dict[str, list[int]] = {}
    for message in listed.messages:
        name, index = message.message.parts[0].text.text.split("-")
        by_worker.setdefault(name, []).append(int(index))
    assert all(indexes == list(range(20)) for indexes in by_worker.values())


async def test_expected_last_sequence_detects_a_concurrent_writer(
    memory_server: MemoryServer,
) -> None:
    await append(memory_server, "cas", text(chat_pb2.ROLE_USER, "first"))
    ok = await memory_server.working.AppendMessages(
        ms.AppendMessagesRequest(
            request_id=str(uuid.uuid4()),
            session_id="cas",
            messages=[text(chat_pb2.ROLE_USER, "second")],
            expected_last_sequence=1,
        ),
        metadata=memory_server.as_user(),
    )
    assert list(ok.sequences) == [2]
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await memory_server.working.AppendMessages(
            ms.AppendMessagesRequest(
                request_id=str(uuid.uuid4()),
                session_id="cas",
                messages=[text(chat_pb2.ROLE_USER, "stale")],
                expected_last_sequence=1,
            ),
            metadata=memory_server.as_user(),
        )
    details = error_details(conflict.value)
    assert conflict.value.code() == grpc.StatusCode.ABORTED
    assert details.reason == "SEQUENCE_CONFLICT"
    assert details.metadata["lastSequence"] == "2"


async def test_sessions_are_per_user(memory_server: MemoryServer) -> None:
    await append(memory_server, "mine", text(chat_pb2.ROLE_USER, "private"))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await memory_server.working.ListMessages(
            ms.ListMessagesRequest(session_id="mine"),
            metadata=memory_server.as_user(tenant="tenant-b"),
        )
    assert error_details(missing.value).reason == "SESSION_NOT_FOUND"


async def test_append_rejects_bad_messages(memory_server: MemoryServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await memory_server.working.AppendMessages(
            ms.AppendMessagesRequest(
                request_id=str(uuid.uuid4()),
                session_id="bad id!",
                messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER)],
            ),
            metadata=memory_server.as_user(),
        )
    details = error_details(failure.value)
    assert details.reason == "INVALID_REQUEST"
    assert {v.field for v in details.field_violations} == {"session_id", "messages[0].parts"}


async def test_embeddings_through_llmrouter(
    redis_url: str, graph_database: GraphDatabaseRef, tmp_path: Path, embedder: LocalEmbedder
) -> None:
    keys = signing_keys()
    # The stubs mark every RPC abstract; at run time the base answers UNIMPLEMENTED.
    router = ScriptedRouter()  # type: ignore[abstract]
    async with running_server(
        lambda server: lr_grpc.add_LlmRouterServiceServicer_to_server(router, server),
        service_names=["foredeck.llmrouter.v1.LlmRouterService"],
        domain="llmrouter.foredeck.dev",
        keys=keys,
    ) as router_server:
        settings = memory_settings(
            redis_url=redis_url,
            bolt_uri=graph_database.uri,
            bolt_user=graph_database.user,
            bolt_password=graph_database.password,
            graph_database=graph_database.name,
            edge_path=tmp_path / "vectors",
            keys=keys,
            llmrouter_address=router_server.address,
            embedding_model="router-embedding",
            embedding_dimensions=16,
        )
        memory = await start_memory_server(
            settings, MemoryDeps(count_tokens=embedder.count_tokens), keys
        )
        try:
            stored = await memory.long_term.Remember(
                ms.RememberRequest(request_id="e1", content="Lena rows on Sundays."),
                metadata=memory.as_user(),
            )
            assert stored.memory.embedding_model == "router-embedding"
            found = await memory.long_term.Recall(
                ms.RecallRequest(query="Lena rows on Sundays.", limit=1),
                metadata=memory.as_user(),
            )
            assert found.memories[0].memory.memory_id == stored.memory.memory_id
            assert found.memories[0].score == pytest.approx(1.0, abs=1e-4)
            assert {r.model for r in router.embed_requests} == {"router-embedding"}
            assert {r.dimensions for r in router.embed_requests} == {16}

            # The channel retries UNAVAILABLE on llmrouter's idempotent Embed (4 attempts), so
            # only a failure that outlasts the retries reaches the caller.
            router.embed_failures.extend(
                ServiceError(grpc.StatusCode.UNAVAILABLE, "PROVIDER_RATE_LIMITED", "slow down")
                for _ in range(4)
            )
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await memory.long_term.Recall(
                    ms.RecallRequest(query="anything", limit=1), metadata=memory.as_user()
                )
            details = error_details(failure.value)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details.reason == "EMBEDDING_FAILED"
            assert details.metadata["upstreamReason"] == "PROVIDER_RATE_LIMITED"
            assert details.retry_after is not None
        finally:
            await memory.stop()
