"""A run's whole journal: for a fork, the source run's prefix (by reference) and its own entries.

ForkRun copies nothing: the fork's record names its source run (``fork_src``) and how many of
the source's journal entries it reuses (``fork_len``). Readers put the two together; the fork's
own entries are numbered after the prefix, so the whole reads as one journal with no gaps.
"""

from __future__ import annotations

from foredeck.common.v1 import journal_pb2
from foredeck_orchestrator.adapters.redis_runs import RedisRuns, RunRecord

__all__ = ["JournalPrefixGone", "fork_prefix", "run_journal"]


class JournalPrefixGone(Exception):
    """The source run of a fork expired: its journal prefix cannot be read."""


async def fork_prefix(runs: RedisRuns, record: RunRecord) -> list[journal_pb2.JournalEntry]:
    """The source entries a fork reuses; empty for a run that is not a fork."""
    if not record.fork_source or record.fork_length <= 0:
        return []
    raws = await runs.journal(record.fork_source, 0, record.fork_length - 1)
    if len(raws) < record.fork_length:
        raise JournalPrefixGone(record.fork_source)
    return [journal_pb2.JournalEntry.FromString(raw) for raw in raws]


async def run_journal(runs: RedisRuns, record: RunRecord) -> list[journal_pb2.JournalEntry]:
    """Every entry of the run's journal, prefix first."""
    prefix = await fork_prefix(runs, record)
    own = await runs.journal(record.run.run_id)
    return prefix + [journal_pb2.JournalEntry.FromString(raw) for raw in own]
