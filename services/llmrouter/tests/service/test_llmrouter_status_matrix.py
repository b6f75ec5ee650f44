"""Every upstream status gives the right retries, fallback and error, with exact attempt counts.

The chain is one model of each provider (Anthropic first, then OpenAI, and the reverse), both
served by the scripted provider through the real SDKs. Steps aimed at the first model's endpoint
script its failures; the second model answers with the default reply when the router falls back.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest

from foredeck.common.v1 import chat_pb2
from foredeck.llmrouter.v1 import generation_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck_kit.errors import error_details
from foredeck_testing.provider import (
    ConnectionReset,
    Endpoint,
    Hang,
    HttpError,
    ScriptedProvider,
    Step,
)
from foredeck_testing.server import RunningServer

RETRIES = 3
SECRET = "internal upstream detail 7f3a"

if TYPE_CHECKING:
    from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceAsyncStub

    RouterFactory = Callable[
        ..., AbstractAsyncContextManager[tuple[RunningServer, LlmRouterServiceAsyncStub]]
    ]


@dataclass(frozen=True)
class Row:
    """One row of the matrix: what the first model answers, and what must follow."""

    name: str
    step: Step
    calls: int
    """Requests the first model receives."""
    falls_back: bool
    code: grpc.StatusCode
    reason: str
    """The reason when the chain ends on this failure (fallback disabled)."""


ROWS = [
    Row(
        "400",
        HttpError(400, message=SECRET),
        1,
        False,
        grpc.StatusCode.INVALID_ARGUMENT,
        "PROVIDER_REJECTED_REQUEST",
    ),
    Row(
        "401",
        HttpError(401, message=SECRET),
        1,
        False,
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROVIDER_AUTH_FAILED",
    ),
    Row(
        "403",
        HttpError(403, message=SECRET),
        1,
        False,
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROVIDER_AUTH_FAILED",
    ),
    Row(
        "404",
        HttpError(404, message=SECRET),
        1,
        False,
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROVIDER_MODEL_NOT_FOUND",
    ),
    Row("408", HttpError(408), RETRIES, True, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    Row("409", HttpError(409), RETRIES, True, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    Row(
        "413",
        HttpError(413, message=SECRET),
        1,
        False,
        grpc.StatusCode.INVALID_ARGUMENT,
        "PROVIDER_REJECTED_REQUEST",
    ),
    Row(
        "429-retry-after",
        HttpError.rate_limited(retry_after_ms=20),
        RETRIES,
        True,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PROVIDER_RATE_LIMITED",
    ),
    Row(
        "429",
        HttpError(429),
        RETRIES,
        True,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PROVIDER_RATE_LIMITED",
    ),
    Row(
        "429-quota",
        HttpError.insufficient_quota(),
        1,
        True,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PROVIDER_QUOTA_EXHAUSTED",
    ),
    Row("500", HttpError(500), RETRIES, True, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    Row("502", HttpError(502), RETRIES, True, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    Row("503", HttpError(503), RETRIES, True, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    Row(
        "529",
        HttpError.overloaded(),
        RETRIES,
        True,
        grpc.StatusCode.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    ),
    Row(
        "500-should-retry-false",
        HttpError(500, should_retry=False),
        1,
        True,
        grpc.StatusCode.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    ),
    Row(
        "400-should-retry-true",
        HttpError(400, should_retry=True),
        1,
        False,
        grpc.StatusCode.INVALID_ARGUMENT,
        "PROVIDER_REJECTED_REQUEST",
    ),
    Row(
        "connection-reset",
        ConnectionReset(),
        RETRIES,
        True,
        grpc.StatusCode.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    ),
    Row("timeout", Hang(), RETRIES, True, grpc.StatusCode.DEADLINE_EXCEEDED, "PROVIDER_TIMEOUT"),
]

CHAINS = {
    "anthropic-first": (
        "claude-sonnet-4-6",
        Endpoint.ANTHROPIC_MESSAGES,
        "gpt-4o",
        Endpoint.OPENAI_CHAT_COMPLETIONS,
    ),
    "openai-first": (
        "gpt-4o",
        Endpoint.OPENAI_CHAT_COMPLETIONS,
        "claude-sonnet-4-6",
        Endpoint.ANTHROPIC_MESSAGES,
    ),
}


def _request(model: str, fallback: str | None) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        messages=[
            chat_pb2.ChatMessage(
                role=chat_pb2.ROLE_USER,
                parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="Hello?"))],
            )
        ],
        fallback_models=[fallback] if fallback else [],
        disable_fallback=fallback is None,
    )


def _attempt_timeout(row: Row) -> float:
    # Only the hanging row needs attempts to time out quickly; every other row gets room, so a
    # slow answer on a busy machine is never mistaken for a timeout and retried.
    return 0.3 if isinstance(row.step, Hang) else 5.0


def _enqueue(provider: ScriptedProvider, step: Step, endpoint: Endpoint, count: int) -> None:
    # One more than the router should take: a surplus step left queued proves no extra call.
    for _ in range(count + 1):
        provider.enqueue(step, endpoint=endpoint)


async def test_success_makes_one_call(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    async with router_factory() as (server, stub):
        reply = await stub.Generate(
            _request("claude-sonnet-4-6", "gpt-4o"), metadata=server.mint(), timeout=10
        )
    assert len(scripted_provider.requests) == 1
    assert reply.provider == "anthropic"
    assert reply.message.parts[0].text.text == "Hello from the scripted provider."
    assert [a.outcome for a in reply.attempts] == [generation_pb2.ATTEMPT_OUTCOME_SUCCEEDED]


@pytest.mark.parametrize("chain", list(CHAINS), ids=list(CHAINS))
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_status_with_fallback(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider, row: Row, chain: str
) -> None:
    first, first_endpoint, second, second_endpoint = CHAINS[chain]
    _enqueue(scripted_provider, row.step, first_endpoint, row.calls)
    async with router_factory(
        attempt_timeout_seconds=_attempt_timeout(row), retry_max_attempts=RETRIES
    ) as (
        server,
        stub,
    ):
        call = stub.Generate(_request(first, second), metadata=server.mint(), timeout=10)
        if row.falls_back:
            reply = await call
            assert reply.model == second
            outcomes = [a.outcome for a in reply.attempts]
            assert outcomes == [generation_pb2.ATTEMPT_OUTCOME_RETRIED] * (row.calls - 1) + [
                generation_pb2.ATTEMPT_OUTCOME_FELL_BACK,
                generation_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
            ]
            assert len(scripted_provider.requests_to(second_endpoint)) == 1
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            details = error_details(caught.value)
            assert caught.value.code() == row.code
            assert details.reason == row.reason
            assert details.domain == "llmrouter.foredeck.dev"
            assert SECRET not in (caught.value.details() or "")
            assert all(SECRET not in v for v in details.metadata.values())
            assert scripted_provider.requests_to(second_endpoint) == []
    received = len(scripted_provider.requests_to(first_endpoint))
    if isinstance(row.step, ConnectionReset):
        # A reset can kill a retry's fresh connection before the server reads the request, so
        # the server may see fewer; the router's attempt list above is the exact count.
        assert 1 <= received <= row.calls
    else:
        assert received == row.calls
        assert scripted_provider.pending == 1
    # The router's own retries are the only ones: the SDK never retried on its own.
    assert all(r.retry_count == 0 for r in scripted_provider.requests)


@pytest.mark.parametrize(
    "row", [r for r in ROWS if r.falls_back], ids=[r.name for r in ROWS if r.falls_back]
)
async def test_status_when_chain_ends(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider, row: Row
) -> None:
    _enqueue(scripted_provider, row.step, Endpoint.ANTHROPIC_MESSAGES, row.calls)
    async with router_factory(
        attempt_timeout_seconds=_attempt_timeout(row), retry_max_attempts=RETRIES
    ) as (
        server,
        stub,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(
                _request("claude-sonnet-4-6", None), metadata=server.mint(), timeout=10
            )
    details = error_details(caught.value)
    assert (caught.value.code(), details.reason) == (row.code, row.reason)
    assert details.metadata["provider"] == "anthropic"
    assert details.metadata["model"] == "claude-sonnet-4-6"
    received = len(scripted_provider.requests_to(Endpoint.ANTHROPIC_MESSAGES))
    if "attempts" in details.metadata:
        assert details.metadata["attempts"] == str(row.calls)
    if isinstance(row.step, ConnectionReset):
        assert 1 <= received <= row.calls  # see test_status_with_fallback
    else:
        assert received == row.calls
    if row.reason == "PROVIDER_RATE_LIMITED":
        assert details.metadata["attempts"] == str(RETRIES)
        expected = 0.02 if row.name == "429-retry-after" else 1.0
        assert details.retry_after is not None
        assert details.retry_after.total_seconds() == pytest.approx(expected)
    if row.reason == "PROVIDER_QUOTA_EXHAUSTED":
        assert details.retry_after is None
    if row.reason == "PROVIDER_UNAVAILABLE":
        assert details.retry_after is not None
        expected_status = "0" if row.name == "connection-reset" else row.name.split("-")[0]
        assert details.metadata["upstreamStatus"] == expected_status


async def test_retry_after_is_honoured(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    scripted_provider.enqueue(
        HttpError.rate_limited(retry_after_ms=150), endpoint=Endpoint.ANTHROPIC_MESSAGES
    )
    async with router_factory() as (server, stub):
        reply = await stub.Generate(
            _request("claude-sonnet-4-6", None), metadata=server.mint(), timeout=10
        )
    assert len(scripted_provider.requests_to(Endpoint.ANTHROPIC_MESSAGES)) == 2
    assert reply.attempts[0].retry_after.ToMilliseconds() == 150
    assert [a.outcome for a in reply.attempts] == [
        generation_pb2.ATTEMPT_OUTCOME_RETRIED,
        generation_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    ]
    assert reply.attempts[0].upstream_status == 429


async def test_different_failures_end_as_all_providers_failed(
    router_factory: RouterFactory, scripted_provider: ScriptedProvider
) -> None:
    scripted_provider.enqueue(HttpError(500), endpoint=Endpoint.ANTHROPIC_MESSAGES)
    scripted_provider.enqueue(HttpError(429), endpoint=Endpoint.OPENAI_CHAT_COMPLETIONS)
    async with router_factory(retry_max_attempts=1) as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(
                _request("claude-sonnet-4-6", "gpt-4o"), metadata=server.mint(), timeout=10
            )
    details = error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details.reason == "ALL_PROVIDERS_FAILED"
    assert details.metadata == {
        "attempts": "2",
        "models": "claude-sonnet-4-6,gpt-4o",
        "lastReason": "PROVIDER_RATE_LIMITED",
    }
