"""Budget accounting from the journal, and the caps checked before each step."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from foredeck.common.v1 import journal_pb2, usage_pb2
from foredeck_orchestrator.domain.loop.budget import Spent, check_budget, total_tokens


def entry(
    step_id: str, tokens_in: int = 0, tokens_out: int = 0, cost: int = 0
) -> journal_pb2.JournalEntry:
    return journal_pb2.JournalEntry(
        step_id=step_id,
        usage=usage_pb2.Usage(
            input_tokens=tokens_in, output_tokens=tokens_out, cost_usd_micros=cost
        ),
    )


def test_spent_counts_each_step_once_and_sums_usage() -> None:
    spent = Spent.from_entries([entry("s1", 10, 5, 3), entry("s2", 20, 1, 4), entry("s2", 1, 1, 1)])
    assert spent.steps == 2
    assert spent.usage.input_tokens == 31
    assert spent.usage.output_tokens == 7
    assert spent.usage.cost_usd_micros == 8


def test_total_tokens_counts_cached_input() -> None:
    usage = usage_pb2.Usage(
        input_tokens=1, output_tokens=2, cache_read_input_tokens=3, cache_creation_input_tokens=4
    )
    assert total_tokens(usage) == 10


def test_zero_caps_never_trip() -> None:
    spent = Spent.from_entries([entry(f"s{i}", 10_000, 10_000, 10_000) for i in range(50)])
    assert check_budget(usage_pb2.Budget(), spent, now=100.0, deadline=None) is None


def test_the_step_cap_trips_when_one_more_step_would_exceed_it() -> None:
    budget = usage_pb2.Budget(max_steps=2)
    assert check_budget(budget, Spent.from_entries([entry("s1")]), now=0, deadline=None) is None
    error = check_budget(
        budget, Spent.from_entries([entry("s1"), entry("s2")]), now=0, deadline=None
    )
    assert error is not None
    assert (error.reason, error.code) == ("BUDGET_EXCEEDED", 8)
    assert dict(error.metadata) == {"budget": "max_steps", "limit": "2", "used": "2"}


def test_the_token_cap_trips_once_spending_reaches_it() -> None:
    budget = usage_pb2.Budget(max_tokens=30)
    below = Spent.from_entries([entry("s1", 20, 9)])
    assert check_budget(budget, below, now=0, deadline=None) is None
    error = check_budget(budget, Spent.from_entries([entry("s1", 20, 10)]), now=0, deadline=None)
    assert error is not None
    assert error.metadata["budget"] == "max_tokens"
    assert error.metadata["used"] == "30"


def test_the_cost_cap_trips_once_spending_reaches_it() -> None:
    budget = usage_pb2.Budget(max_cost_usd_micros=5)
    error = check_budget(budget, Spent.from_entries([entry("s1", cost=7)]), now=0, deadline=None)
    assert error is not None
    assert dict(error.metadata) == {"budget": "max_cost_usd_micros", "limit": "5", "used": "7"}


def test_wall_time_trips_at_the_deadline() -> None:
    budget = usage_pb2.Budget(max_wall_time=Duration(seconds=60))
    assert check_budget(budget, Spent(), now=99.9, deadline=100.0) is None
    error = check_budget(budget, Spent(), now=100.5, deadline=100.0)
    assert error is not None
    assert error.metadata["budget"] == "max_wall_time"
    assert error.metadata["limit"] == "60s"
    assert error.metadata["used"] == "60.500s"


def test_steps_are_checked_first() -> None:
    budget = usage_pb2.Budget(max_steps=1, max_tokens=1)
    error = check_budget(budget, Spent.from_entries([entry("s1", 5)]), now=0, deadline=None)
    assert error is not None
    assert error.metadata["budget"] == "max_steps"
