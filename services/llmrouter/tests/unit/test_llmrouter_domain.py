"""Domain rules without gRPC: failure classification, retry timing, cost, assembly, catalog."""

from __future__ import annotations

import random

import pytest

from foredeck_llmrouter.domain.assembly import Assembler
from foredeck_llmrouter.domain.catalog import (
    Capabilities,
    Catalog,
    ModelKind,
    ModelSpec,
    Pricing,
    ProviderKind,
    ProviderSpec,
)
from foredeck_llmrouter.domain.errors import Failure, ProviderFailure, RouterError, classify_status
from foredeck_llmrouter.domain.model import Text, ToolArgumentsChunk, ToolCall, ToolCallBegin, Usage
from foredeck_llmrouter.domain.policy import RetryPolicy, cost_usd_micros


@pytest.mark.parametrize(
    ("status", "code", "kind", "retried", "falls_back"),
    [
        (400, "", Failure.REJECTED, False, False),
        (401, "", Failure.AUTH_FAILED, False, False),
        (403, "", Failure.AUTH_FAILED, False, False),
        (404, "", Failure.MODEL_NOT_FOUND, False, False),
        (408, "", Failure.UNAVAILABLE, True, True),
        (409, "", Failure.UNAVAILABLE, True, True),
        (413, "", Failure.REJECTED, False, False),
        (422, "", Failure.REJECTED, False, False),
        (429, "", Failure.RATE_LIMITED, True, True),
        (429, "insufficient_quota", Failure.QUOTA_EXHAUSTED, False, True),
        (400, "context_length_exceeded", Failure.CONTEXT_WINDOW, False, False),
        (500, "", Failure.UNAVAILABLE, True, True),
        (529, "", Failure.UNAVAILABLE, True, True),
    ],
)
def test_status_classification(
    status: int, code: str, kind: Failure, retried: bool, falls_back: bool
) -> None:
    failure = ProviderFailure(classify_status(status, "", code), upstream_status=status)
    assert failure.kind is kind
    assert failure.may_retry is retried
    assert kind.falls_back is falls_back


def test_should_retry_header_vetoes_but_cannot_force() -> None:
    assert not ProviderFailure(Failure.UNAVAILABLE, 500, should_retry=False).may_retry
    assert not ProviderFailure(Failure.REJECTED, 400, should_retry=True).may_retry
    assert not ProviderFailure(Failure.QUOTA_EXHAUSTED, 429, should_retry=True).may_retry
    assert ProviderFailure(Failure.RATE_LIMITED, 429, should_retry=True).may_retry


def test_backoff_honours_retry_after_and_jitters_otherwise() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=4.0, max_retry_after=10.0)
    rng = random.Random(7)
    assert policy.delay(1, ProviderFailure(Failure.RATE_LIMITED, retry_after=2.5), rng) == 2.5
    assert policy.delay(1, ProviderFailure(Failure.RATE_LIMITED, retry_after=11.0), rng) is None
    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)):
        delays = {
            policy.delay(attempt, ProviderFailure(Failure.UNAVAILABLE), rng) for _ in range(50)
        }
        assert all(d is not None and cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1


def test_cost_rounds_to_micro_dollars() -> None:
    pricing = Pricing(input=3_000_000, output=15_000_000, cache_read=300_000, cache_write=3_750_000)
    assert cost_usd_micros(Usage(1, 1, 1, 1), pricing) == 22
    assert cost_usd_micros(Usage(1_000_000, 0, 0, 0), pricing) == 3_000_000
    assert cost_usd_micros(Usage(), pricing) == 0


def test_assembler_numbers_parts_and_tracks_incomplete_calls() -> None:
    assembler = Assembler()
    assert assembler.text("Hel").part_index == 0
    assert assembler.text("lo").part_index == 0
    first = assembler.tool_begin(ToolCallBegin(0, "call_a", "f"))
    second = assembler.tool_begin(ToolCallBegin(1, "call_b", "g"))
    assert (first.part_index, second.part_index) == (1, 2)
    # Fragments of interleaved calls find their own call by the provider's key.
    for key, fragment in ((0, '{"x"'), (1, '{"y":'), (0, ":1}"), (1, "2}")):
        out = assembler.tool_arguments(ToolArgumentsChunk(key, fragment))
        assert out is not None
    assembler.tool_end(0)
    assert assembler.text("after").part_index == 3
    assert assembler.message_parts() == [
        Text("Hello"),
        ToolCall("call_a", "f", '{"x":1}'),
        ToolCall("call_b", "g", '{"y":2}'),
        Text("after"),
    ]
    assert assembler.incomplete_tool_call_ids() == ["call_b"]


def _catalog() -> Catalog:
    return Catalog(
        providers={
            "anthropic": ProviderSpec("anthropic", ProviderKind.ANTHROPIC, True),
            "openai": ProviderSpec("openai", ProviderKind.OPENAI, False),
        },
        models={
            "claude-x": ModelSpec(
                "claude-x",
                "anthropic",
                "claude-x-1",
                aliases=("x",),
                capabilities=Capabilities(tools=True),
            ),
            "emb": ModelSpec("emb", "openai", "emb", kind=ModelKind.EMBEDDING),
        },
        default_model="claude-x",
        tenant_default_models={"t2": "x"},
    )


def test_catalog_resolution() -> None:
    catalog = _catalog()
    assert catalog.resolve("x", ModelKind.CHAT).name == "claude-x"
    assert catalog.resolve("", ModelKind.CHAT, "t2").name == "claude-x"
    patterned = catalog.resolve("claude-new-9", ModelKind.CHAT)
    assert (patterned.provider, patterned.provider_model) == ("anthropic", "claude-new-9")
    with pytest.raises(RouterError) as caught:
        catalog.resolve("gpt-4o", ModelKind.CHAT)  # OpenAI has no key: no pattern routing
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert caught.value.metadata["knownModels"] == "claude-x,x"
    with pytest.raises(RouterError) as caught:
        catalog.resolve("emb", ModelKind.CHAT)
    assert caught.value.reason == "MODEL_CAPABILITY_UNSUPPORTED"
    assert caught.value.metadata == {"model": "emb", "capability": "chat"}


def test_duplicate_alias_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="alias"):
        Catalog(
            providers={"anthropic": ProviderSpec("anthropic", ProviderKind.ANTHROPIC, True)},
            models={
                "a": ModelSpec("a", "anthropic", "a", aliases=("same",)),
                "b": ModelSpec("b", "anthropic", "b", aliases=("same",)),
            },
        )
