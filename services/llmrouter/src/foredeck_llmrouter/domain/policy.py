"""Retry timing and cost arithmetic."""

from __future__ import annotations

import random
from dataclasses import dataclass

from foredeck_llmrouter.domain.catalog import Pricing
from foredeck_llmrouter.domain.errors import ProviderFailure
from foredeck_llmrouter.domain.model import Usage


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one model before falling back to the next."""

    max_attempts: int = 3
    """Attempts per model in the chain, the first included."""
    base_delay: float = 0.5
    """Backoff before the second attempt; doubles each time, capped at ``max_delay``."""
    max_delay: float = 8.0
    max_retry_after: float = 30.0
    """A provider asking to wait longer than this is failed over instead of waited for."""
    attempt_timeout: float = 60.0
    """The most one attempt may take (bounded further by the caller's deadline)."""
    min_attempt_time: float = 0.05
    """An attempt is not started with less time than this left."""

    def delay(self, attempt: int, failure: ProviderFailure, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to stop retrying this model.

        A provider's retry-after is honoured exactly; otherwise the wait is exponential with
        equal jitter (half fixed, half random), so replicas that failed together spread out.
        """
        if failure.retry_after is not None:
            if failure.retry_after > self.max_retry_after:
                return None
            return max(0.0, failure.retry_after)
        cap = min(self.max_delay, self.base_delay * (2.0 ** (attempt - 1)))
        return cap / 2 + rng.uniform(0, cap / 2)


def cost_usd_micros(usage: Usage, pricing: Pricing) -> int:
    """The cost of a call in micro-USD, rounded to the nearest micro-dollar."""
    total = (
        usage.input_tokens * pricing.input
        + usage.output_tokens * pricing.output
        + usage.cache_read_input_tokens * pricing.cache_read
        + usage.cache_creation_input_tokens * pricing.cache_write
    )
    return (total + 500_000) // 1_000_000
