"""A run's whole journal: for a fork, the source run's prefix (by reference) and its own entries.

ForkRun copies nothing: the fork's record names its source run (``fork_src``) and how many of
the source's journal entries it reuses (``fork_len``). Readers put the two together (a fork of
a fork follows the chain); the fork's own entries are numbered after the prefix, so the whole
reads as one journal with no gaps.
"""

from __future__ import annotations

from collections.abc import Sequence

from foredeck.common.v1 import journal_pb2
from foredeck_orchestrator.adapters.redis_runs import LeaseLostError, RedisRuns, RunRecord
from foredeck_orchestrator.domain.ports import LeaseLost

__all__ = ["ForkJournal", "JournalPrefixGone", "fork_prefix", "run_journal"]

_MAX_CHAIN = 32


class JournalPrefixGone(Exception):
    """The source run of a fork expired: its journal prefix cannot be read."""


async def fork_prefix(
    runs: RedisRuns, record: RunRecord, depth: int = 0
) -> list[journal_pb2.JournalEntry]:
    """The source entries a fork reuses; empty for a run that is not a fork."""
    if not record.fork_source or record.fork_length <= 0:
        return []
    source = await runs.get(record.fork_source)
    if source is None or depth >= _MAX_CHAIN:
        raise JournalPrefixGone(record.fork_source)
    entries = await run_journal(runs, source, depth + 1)
    if len(entries) < record.fork_length:
        raise JournalPrefixGone(record.fork_source)
    return entries[: record.fork_length]


async def run_journal(
    runs: RedisRuns, record: RunRecord, depth: int = 0
) -> list[journal_pb2.JournalEntry]:
    """Every entry of the run's journal, prefix first."""
    prefix = await fork_prefix(runs, record, depth)
    own = await runs.journal(record.run.run_id)
    return prefix + [journal_pb2.JournalEntry.FromString(raw) for raw in own]


class ForkJournal:
    """A fork's journal for the worker: the source's prefix, then its own fenced entries."""

    def __init__(
        self, runs: RedisRuns, record: RunRecord, token: int, worker_id: str, trace_id: str
    ) -> None:
        self.runs = runs
        self.record = record
        self.run_id = record.run.run_id
        self.token = token
        self.worker_id = worker_id
        self.trace_id = trace_id
        self.offset = record.fork_length
        self.count = 0

    async def entries(self) -> Sequence[journal_pb2.JournalEntry]:
        prefix = await fork_prefix(self.runs, self.record)
        own = await self.runs.journal(self.run_id)
        self.count = len(own)
        return prefix + [journal_pb2.JournalEntry.FromString(raw) for raw in own]

    async def append(self, entry: journal_pb2.JournalEntry) -> journal_pb2.JournalEntry:
        stored = journal_pb2.JournalEntry()
        stored.CopyFrom(entry)
        stored.run_id = self.run_id
        stored.entry_index = self.offset + self.count + 1
        stored.worker_id = self.worker_id
        stored.fencing_token = self.token
        stored.trace_id = self.trace_id
        try:
            await self.runs.append(self.run_id, self.token, stored, position=self.count + 1)
        except LeaseLostError:
            raise LeaseLost(self.run_id) from None
        self.count += 1
        return stored
