"""Budget accounting: what a run has spent, from its journal, against its caps.

Spending is always recomputed from journal entries, never kept apart, so a run resumed by
another worker checks the same totals the first one would have. A zero cap means no cap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from foredeck.common.v1 import error_pb2, journal_pb2, usage_pb2
from foredeck_orchestrator.domain.loop.errors import Code, make_error

__all__ = ["Spent", "add_usage", "budget_exceeded", "check_budget", "total_tokens"]


def add_usage(total: usage_pb2.Usage, more: usage_pb2.Usage) -> None:
    """Add ``more`` into ``total``, field by field."""
    total.input_tokens += more.input_tokens
    total.output_tokens += more.output_tokens
    total.cache_read_input_tokens += more.cache_read_input_tokens
    total.cache_creation_input_tokens += more.cache_creation_input_tokens
    total.cost_usd_micros += more.cost_usd_micros


def total_tokens(usage: usage_pb2.Usage) -> int:
    """Every token a usage counts: input (cached or not) and output."""
    return (
        usage.input_tokens
        + usage.output_tokens
        + usage.cache_read_input_tokens
        + usage.cache_creation_input_tokens
    )


@dataclass(slots=True)
class Spent:
    """What a run has consumed: its journaled steps and the usage of their model calls."""

    step_ids: set[str] = field(default_factory=set)
    usage: usage_pb2.Usage = field(default_factory=usage_pb2.Usage)

    @classmethod
    def from_entries(cls, entries: Iterable[journal_pb2.JournalEntry]) -> Spent:
        """Totals over committed entries (a step with several attempts counts once)."""
        spent = cls()
        for entry in entries:
            spent.add(entry)
        return spent

    def add(self, entry: journal_pb2.JournalEntry) -> None:
        """Count one more committed entry."""
        self.step_ids.add(entry.step_id)
        add_usage(self.usage, entry.usage)

    @property
    def steps(self) -> int:
        """How many distinct steps the run has journaled."""
        return len(self.step_ids)


def budget_exceeded(name: str, limit: str, used: str, message: str) -> error_pb2.Error:
    """The run error for a cap that was hit."""
    return make_error(
        Code.RESOURCE_EXHAUSTED,
        "BUDGET_EXCEEDED",
        message,
        {"budget": name, "limit": limit, "used": used},
    )


def check_budget(
    budget: usage_pb2.Budget,
    spent: Spent,
    *,
    now: float,
    deadline: float | None,
    new_step: bool = True,
) -> error_pb2.Error | None:
    """The first cap the run has hit, or None.

    Checked before a step starts: ``max_steps`` is hit when starting one more step
    (``new_step``) would exceed it; tokens and cost when what was spent already reaches the
    cap; wall time when ``now`` (a ``time.monotonic()`` instant) is at or past ``deadline``.
    """
    if budget.max_steps > 0 and spent.steps + (1 if new_step else 0) > budget.max_steps:
        return budget_exceeded(
            "max_steps",
            str(budget.max_steps),
            str(spent.steps),
            "the run reached its step budget",
        )
    tokens = total_tokens(spent.usage)
    if budget.max_tokens > 0 and tokens >= budget.max_tokens:
        return budget_exceeded(
            "max_tokens", str(budget.max_tokens), str(tokens), "the run reached its token budget"
        )
    cost = spent.usage.cost_usd_micros
    if budget.max_cost_usd_micros > 0 and cost >= budget.max_cost_usd_micros:
        return budget_exceeded(
            "max_cost_usd_micros",
            str(budget.max_cost_usd_micros),
            str(cost),
            "the run reached its cost budget",
        )
    if deadline is not None and now >= deadline:
        return wall_time_exceeded(budget, now - deadline)
    return None


def wall_time_exceeded(budget: usage_pb2.Budget, overrun: float = 0.0) -> error_pb2.Error:
    """The run error for a run that ran out of wall time."""
    limit = budget.max_wall_time.ToTimedelta().total_seconds()
    return budget_exceeded(
        "max_wall_time",
        f"{limit:g}s",
        f"{limit + max(overrun, 0.0):.3f}s",
        "the run reached its wall-time budget",
    )
