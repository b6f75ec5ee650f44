"""Long-term memory use cases: remember, recall, read, history, delete, forget.

Every write that touches both stores goes through :meth:`LongTermMemory._write_both`: an intent
is recorded in the outbox first, the vector store then the graph are written, and a failure in
between is compensated at once (or, if the process dies, by :meth:`repair` later), so a memory
is in both stores or in neither.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from foredeck_memory.domain import errors
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.models import (
    OPEN_END,
    MemoryRecord,
    Provenance,
    Scope,
    ScoredMemory,
    VectorFilter,
    dedup_key,
    now_us,
    split_entity_key,
    valid_at,
)
from foredeck_memory.domain.ports import (
    Embedder,
    GraphStore,
    Locks,
    Outbox,
    Quotas,
    VectorStore,
)

MAX_CHAIN = 10_000
"""The most versions one memory's history can hold; also the bound of per-user scans."""


@dataclass(frozen=True)
class RememberInput:
    """What to remember, already validated."""

    content: str
    category: str = "fact"
    metadata: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    step_id: str = ""
    valid_from: int | None = None
    valid_to: int | None = None
    dedup_policy: str = "merge"
    near_duplicate_threshold: float | None = None
    fact_key: str = ""
    entity_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class RememberResult:
    """What Remember did."""

    record: MemoryRecord
    outcome: str
    similarity: float = 0.0
    superseded: MemoryRecord | None = None


def current_filter(at: int, base: VectorFilter | None = None) -> VectorFilter:
    """``base`` narrowed to versions whose validity holds at ``at``.

    Superseding and retiring both end a version's validity, so the range alone excludes them.
    """
    base = base or VectorFilter()
    return VectorFilter(
        equals=dict(base.equals),
        any_of=dict(base.any_of),
        ranges=[*base.ranges, *valid_at(at)],
        ids=list(base.ids),
    )


class LongTermMemory:
    """The long-term memory of a tenant's users over a vector store and the graph."""

    def __init__(
        self,
        *,
        vectors: VectorStore,
        graph: GraphStore,
        embedder: Embedder,
        outbox: Outbox,
        locks: Locks,
        near_duplicate_threshold: float = 0.95,
        quotas: Quotas | None = None,
    ) -> None:
        self.vectors = vectors
        self.graph = graph
        self.embedder = embedder
        self.outbox = outbox
        self.locks = locks
        self.threshold = near_duplicate_threshold
        self.quotas = quotas

    async def _reserve(self, scope: Scope, count: int) -> None:
        if self.quotas is not None:
            await self.quotas.reserve(scope, count)

    async def _release(self, scope: Scope, count: int) -> None:
        if self.quotas is not None:
            await self.quotas.release(scope, count)

    async def remember(self, scope: Scope, item: RememberInput) -> RememberResult:
        """Store one memory, merging duplicates and superseding a fact with the same key."""
        return (await self.remember_many(scope, [item]))[0]

    async def remember_many(
        self, scope: Scope, items: Sequence[RememberInput]
    ) -> list[RememberResult]:
        """Store several memories as if remembered one after another, in one atomic write.

        The contents are embedded in one batch; each item is checked against the stored
        memories and the earlier items of the batch (duplicates, fact keys); then every new
        version and every change to a stored one is written to both stores at once.
        """
        refs = sorted({ref for item in items for ref in item.entity_refs})
        if refs:
            missing = await self.graph.missing_entities(scope.tenant_id, refs)
            if missing:
                raise errors.entity_not_found(*split_entity_key(missing[0]))
        vectors = await self.embedder.embed([item.content for item in items])
        # One lock per user: remembers of the same content (or fact) by the same user are
        # serialised, so concurrent duplicates end up as one memory.
        async with self.locks.hold(f"{scope.tenant_id}\x00{scope.user_id}\x00remember"):
            plan = _BatchPlan(at=now_us())
            await self._prefetch(scope, plan, items, vectors)
            results = []
            for index, (item, vector) in enumerate(zip(items, vectors, strict=True)):
                plan.item_index = index
                results.append(self._plan_one(scope, plan, item, vector))
            await self._write_both(
                scope,
                [(plan.records[i], plan.vectors[i]) for i in plan.new_ids],
                [plan.records[i] for i in plan.changed],
                list(plan.original.values()),
            )
        return [
            RememberResult(
                plan.records[r.record.memory_id],
                r.outcome,
                r.similarity,
                plan.records[r.superseded.memory_id] if r.superseded is not None else None,
            )
            for r in results
        ]

    async def _prefetch(
        self,
        scope: Scope,
        plan: _BatchPlan,
        items: Sequence[RememberInput],
        vectors: Sequence[list[float]],
    ) -> None:
        """Look up the whole batch's duplicate and fact-key candidates in three store calls."""
        at = plan.at
        checked = [item for item in items if item.dedup_policy != "none"]
        keys = sorted({dedup_key(item.category, item.content) for item in checked})
        if keys:
            where = current_filter(at, VectorFilter(any_of={"dedup_key": keys}))
            for record in await self.vectors.scroll(scope, where, MAX_CHAIN):
                plan.stored_by_key.setdefault(record.dedup_key, []).append(record)
        facts = sorted({item.fact_key for item in items if item.fact_key})
        if facts:
            where = current_filter(at, VectorFilter(any_of={"fact_key": facts}))
            for record in await self.vectors.scroll(scope, where, MAX_CHAIN):
                plan.stored_by_fact.setdefault(record.fact_key, []).append(record)
        near = [
            (index, item)
            for index, item in enumerate(items)
            if item.dedup_policy == "merge" and not item.fact_key
        ]
        if near:
            answers = await self.vectors.search_many(
                scope,
                [
                    (
                        vectors[index],
                        current_filter(at, VectorFilter(equals={"category": item.category})),
                    )
                    for index, item in near
                ],
                1,
                min(item.near_duplicate_threshold or self.threshold for _, item in near),
            )
            for (index, _), hits in zip(near, answers, strict=True):
                plan.stored_near[index] = hits

    def _current(self, plan: _BatchPlan, record: MemoryRecord) -> MemoryRecord | None:
        """The batch's view of a stored or planned version, if it still holds at plan time."""
        latest = plan.records.get(record.memory_id, record)
        if latest.superseded_by or latest.retired:
            return None
        if not latest.valid_from <= plan.at < latest.valid_to:
            return None
        return latest

    def _plan_one(
        self, scope: Scope, plan: _BatchPlan, item: RememberInput, vector: list[float]
    ) -> RememberResult:
        at = plan.at
        key = dedup_key(item.category, item.content)
        if item.dedup_policy != "none":
            candidates = [r for r in plan.planned() if r.dedup_key == key]
            candidates += plan.stored_by_key.get(key, [])
            for candidate in candidates:
                existing = self._current(plan, candidate)
                if existing is not None:
                    return RememberResult(
                        self._merge(plan, existing, item), "MERGED_EXACT_DUPLICATE", 1.0
                    )
            # A fact key decides by exact content: a near-identical new wording of a keyed fact
            # ("locker 12" → "locker 14") is a change to supersede, not a duplicate to merge.
            if item.dedup_policy == "merge" and not item.fact_key:
                threshold = item.near_duplicate_threshold or self.threshold
                best: tuple[float, MemoryRecord] | None = None
                for memory_id in plan.new_ids:
                    record = plan.records[memory_id]
                    if record.category != item.category or self._current(plan, record) is None:
                        continue
                    score = _cosine(vector, plan.vectors[memory_id])
                    if score >= threshold and (best is None or score > best[0]):
                        best = (score, record)
                for hit in plan.stored_near.get(plan.item_index, []):
                    existing = self._current(plan, hit.record)
                    better = best is None or hit.score > best[0]
                    if existing is not None and hit.score >= threshold and better:
                        best = (hit.score, existing)
                if best is not None:
                    merged = self._merge(plan, best[1], item)
                    return RememberResult(merged, "MERGED_NEAR_DUPLICATE", best[0])
        previous: MemoryRecord | None = None
        if item.fact_key:
            candidates = [r for r in plan.planned() if r.fact_key == item.fact_key]
            candidates += plan.stored_by_fact.get(item.fact_key, [])
            for candidate in candidates:
                previous = self._current(plan, candidate)
                if previous is not None:
                    break
        memory_id = str(uuid.uuid4())
        valid_from = item.valid_from if item.valid_from is not None else at
        record = MemoryRecord(
            memory_id=memory_id,
            chain_id=previous.chain_id if previous else memory_id,
            content=item.content,
            category=item.category,
            metadata=dict(item.metadata),
            provenance=Provenance(scope.tenant_id, scope.user_id, item.run_id, item.step_id),
            valid_from=valid_from,
            valid_to=item.valid_to if item.valid_to is not None else OPEN_END,
            dedup_key=key,
            embedding_model=self.embedder.model_id,
            create_time=at,
            update_time=at,
            fact_key=item.fact_key,
            entity_refs=tuple(sorted(set(item.entity_refs))),
            supersedes=previous.memory_id if previous else "",
        )
        plan.add(record, vector)
        if previous is None:
            return RememberResult(record, "CREATED")
        superseded = previous.evolve(
            valid_to=max(valid_from, previous.valid_from), superseded_by=memory_id, update_time=at
        )
        plan.change(previous, superseded)
        return RememberResult(record, "SUPERSEDED", 0.0, superseded)

    @staticmethod
    def _merge(plan: _BatchPlan, existing: MemoryRecord, item: RememberInput) -> MemoryRecord:
        merged = existing.evolve(
            metadata={**item.metadata, **existing.metadata},
            entity_refs=tuple(sorted({*existing.entity_refs, *item.entity_refs})),
            merge_count=existing.merge_count + 1,
            update_time=plan.at,
        )
        plan.change(existing, merged)
        return merged

    async def _write_both(
        self,
        scope: Scope,
        new: Sequence[tuple[MemoryRecord, list[float]]],
        updates: Sequence[MemoryRecord],
        previous: Sequence[MemoryRecord],
    ) -> None:
        """Write new versions and payload updates to both stores, or to neither.

        Room for the new versions is taken from the quotas first (the whole batch or nothing);
        the intent records it, so a roll-back, now or by :meth:`repair`, gives it back.
        """
        if not new and not updates:
            return
        entry = {
            "tenant_id": scope.tenant_id,
            "user_id": scope.user_id,
            "new_ids": [record.memory_id for record, _ in new],
            "restore": [record.to_payload() for record in previous],
            "reserved": len(new),
        }
        await self._reserve(scope, len(new))
        try:
            token = await self.outbox.begin(entry)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._release(scope, len(new))
            raise
        try:
            if new:
                await self.vectors.upsert(scope, new)
            for record in updates:
                await self.vectors.set_payload(scope, record)
            await self.graph.put_memories([record for record, _ in new] + list(updates))
        except BaseException:
            # Roll back what reached either store; if that fails too, the outbox entry stays
            # and repair() finishes the job once the stores answer again.
            with contextlib.suppress(Exception):
                await self._compensate(entry)
                await self.outbox.done(token)
            raise
        await self.outbox.done(token)

    async def _compensate(self, entry: dict[str, Any]) -> None:
        """Remove ``new_ids`` from both stores, put back the ``restore`` payloads, and give
        back the quota room the intent holds."""
        scope = Scope(entry["tenant_id"], entry["user_id"])
        new_ids = list(entry["new_ids"])
        restore = [MemoryRecord.from_payload(p) for p in entry["restore"]]
        if new_ids:
            await self.vectors.delete(scope, new_ids)
            await self.graph.delete_memories(scope.tenant_id, new_ids)
        for record in restore:
            await self.vectors.set_payload(scope, record)
        if restore:
            await self.graph.put_memories(restore)
        await self._release(scope, int(entry.get("reserved", 0)))

    async def repair(self, older_than_seconds: float) -> int:
        """Roll back two-store writes left unfinished (a crash between the stores)."""
        repaired = 0
        for token, entry in await self.outbox.stale(older_than_seconds):
            await self._compensate(entry)
            await self.outbox.done(token)
            repaired += 1
        return repaired

    async def recall(
        self,
        scope: Scope,
        query: str,
        limit: int,
        where: VectorFilter,
        *,
        as_of: int | None,
        include_superseded: bool,
        min_score: float,
    ) -> list[ScoredMemory]:
        """The memories nearest in meaning to ``query``, best first (ties: newer first)."""
        [vector] = await self.embedder.embed([query])
        effective = where if include_superseded else self._valid_filter(where, as_of)
        hits = await self.vectors.search(
            scope, vector, limit, effective, min_score if min_score > 0 else None
        )
        hits = [h for h in hits if h.score > 0 or min_score > 0]
        hits.sort(key=lambda h: (-h.score, -h.record.create_time))
        return hits

    @staticmethod
    def _valid_filter(where: VectorFilter, as_of: int | None) -> VectorFilter:
        at = as_of if as_of is not None else now_us()
        if as_of is None:
            return current_filter(at, where)
        return VectorFilter(
            equals=dict(where.equals),
            any_of=dict(where.any_of),
            ranges=[*where.ranges, *valid_at(at)],
            ids=list(where.ids),
        )

    async def get(self, scope: Scope, memory_id: str) -> MemoryRecord:
        """One version by id, in the caller's partition only."""
        found = await self.vectors.scroll(scope, VectorFilter(ids=[memory_id]), 1)
        if not found:
            raise errors.memory_not_found(memory_id)
        return found[0]

    async def list_memories(
        self,
        scope: Scope,
        where: VectorFilter,
        *,
        as_of: int | None,
        include_superseded: bool,
        offset: int,
        page_size: int,
    ) -> tuple[list[MemoryRecord], bool]:
        """A page of memories passing the filter, newest first; and whether more follow."""
        effective = where if include_superseded else self._valid_filter(where, as_of)
        records = await self.vectors.scroll(scope, effective, MAX_CHAIN)
        records.sort(key=lambda r: (-r.create_time, r.memory_id))
        page = records[offset : offset + page_size]
        return page, offset + page_size < len(records)

    async def update(
        self,
        scope: Scope,
        memory_id: str,
        changes: dict[str, Any],
        *,
        effective_time: int | None,
        run_id: str,
        step_id: str,
        etag: str = "",
    ) -> tuple[MemoryRecord, MemoryRecord | None]:
        """Supersede a current version with one whose masked fields are replaced."""
        at = now_us()
        async with self.locks.hold(
            f"{scope.tenant_id}\x00{scope.user_id}\x00update\x00{memory_id}"
        ):
            current = await self.get(scope, memory_id)
            if current.superseded_by or current.retired or current.valid_to <= at:
                metadata = {"memoryId": memory_id}
                if current.superseded_by:
                    metadata["currentMemoryId"] = current.superseded_by
                raise errors.Fault(
                    errors.FaultKind.PRECONDITION,
                    "MEMORY_SUPERSEDED",
                    "only the current version can be updated",
                    metadata=metadata,
                )
            if etag and etag != current.etag:
                raise errors.Fault(
                    errors.FaultKind.ABORTED,
                    "ETAG_MISMATCH",
                    "the memory changed since it was read",
                    metadata={"memoryId": memory_id},
                )
            if changes.get("entity_refs"):
                missing = await self.graph.missing_entities(scope.tenant_id, changes["entity_refs"])
                if missing:
                    raise errors.entity_not_found(*split_entity_key(missing[0]))
            start = effective_time if effective_time is not None else at
            if start < current.valid_from:
                raise errors.validity_range_invalid(
                    "effective_time", "before the current version's valid_from"
                )
            fields = {
                "content": changes.get("content", current.content),
                "metadata": changes.get("metadata", current.metadata),
                "category": changes.get("category", current.category),
                "valid_to": changes.get("valid_to", current.valid_to),
                "entity_refs": tuple(sorted(set(changes.get("entity_refs", current.entity_refs)))),
            }
            if fields["valid_to"] <= start:
                raise errors.validity_range_invalid("valid_to", "must be after effective_time")
            if all(getattr(current, k) == value for k, value in fields.items()):
                return current, None
            if fields["content"] != current.content:
                [vector] = await self.embedder.embed([fields["content"]])
            else:
                vector = await self._vector_of(scope, current)
            new_id = str(uuid.uuid4())
            record = current.evolve(
                memory_id=new_id,
                provenance=Provenance(scope.tenant_id, scope.user_id, run_id, step_id),
                valid_from=start,
                dedup_key=dedup_key(fields["category"], fields["content"]),
                create_time=at,
                update_time=at,
                supersedes=current.memory_id,
                superseded_by="",
                merge_count=0,
                embedding_model=self.embedder.model_id,
                **fields,
            )
            old = current.evolve(valid_to=start, superseded_by=new_id, update_time=at)
            await self._write_both(scope, [(record, vector)], [old], [current])
            return record, old

    async def _vector_of(self, scope: Scope, record: MemoryRecord) -> list[float]:
        [vector] = await self.embedder.embed([record.content])
        return vector

    async def history(self, scope: Scope, memory_id: str) -> list[MemoryRecord]:
        """Every version of the memory ``memory_id`` belongs to, oldest first."""
        record = await self.get(scope, memory_id)
        chain = await self.vectors.scroll(
            scope, VectorFilter(equals={"chain_id": record.chain_id}), MAX_CHAIN
        )
        chain.sort(key=lambda r: (r.create_time, r.memory_id))
        return chain

    async def delete(
        self, scope: Scope, memory_id: str, *, purge: bool, allow_missing: bool
    ) -> tuple[MemoryRecord | None, int]:
        """Retire the chain's current version, or purge every version of the chain."""
        try:
            chain = await self.history(scope, memory_id)
        except errors.Fault:
            if allow_missing:
                return None, 0
            raise
        last = chain[-1]
        if purge:
            ids = [r.memory_id for r in chain]
            # A purge rolls forward: its intent lists the ids (and the quota room they hold),
            # and a purge cut short is finished by repair(), so the chain ends up in neither
            # store and its room is given back once.
            entry_token = await self.outbox.begin(
                {
                    "tenant_id": scope.tenant_id,
                    "user_id": scope.user_id,
                    "new_ids": ids,
                    "restore": [],
                    "reserved": len(ids),
                }
            )
            await self.vectors.delete(scope, ids)
            await self.graph.delete_memories(scope.tenant_id, ids)
            await self._release(scope, len(ids))
            await self.outbox.done(entry_token)
            return last, len(ids)
        at = now_us()
        current = [r for r in chain if not r.superseded_by and not r.retired and r.valid_to > at]
        if not current:
            return last, 0
        retired = current[-1].evolve(
            valid_to=max(at, current[-1].valid_from), retired=True, update_time=at
        )
        await self._write_both(scope, [], [retired], [current[-1]])
        return retired, 0

    async def forget_user(self, scope: Scope, subject_keys: Sequence[str]) -> tuple[int, int, int]:
        """Delete a user's vectors and graph data for real: (memories, entities, rels)."""
        try:
            deleted = await self.vectors.delete_user(scope)
        except StoreDown:
            raise
        await self._release(scope, deleted)
        _, entity_versions, rel_versions = await self.graph.delete_user(
            scope.tenant_id, scope.user_id, subject_keys
        )
        return deleted, entity_versions, rel_versions


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two embeddings (unit vectors in practice, normalised anyway)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


@dataclass
class _BatchPlan:
    """What a RememberMany batch will write: new versions and changes to stored ones."""

    at: int
    records: dict[str, MemoryRecord] = field(default_factory=dict)
    vectors: dict[str, list[float]] = field(default_factory=dict)
    new_ids: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    original: dict[str, MemoryRecord] = field(default_factory=dict)
    stored_by_key: dict[str, list[MemoryRecord]] = field(default_factory=dict)
    stored_by_fact: dict[str, list[MemoryRecord]] = field(default_factory=dict)
    stored_near: dict[int, list[ScoredMemory]] = field(default_factory=dict)
    item_index: int = 0

    def planned(self) -> list[MemoryRecord]:
        """The batch's new versions so far, in order."""
        return [self.records[i] for i in self.new_ids]

    def add(self, record: MemoryRecord, vector: list[float]) -> None:
        self.records[record.memory_id] = record
        self.vectors[record.memory_id] = vector
        self.new_ids.append(record.memory_id)

    def change(self, before: MemoryRecord, after: MemoryRecord) -> None:
        """Record a change to a version; a stored one keeps its original for roll-back."""
        memory_id = before.memory_id
        if memory_id not in self.new_ids and memory_id not in self.original:
            self.original[memory_id] = before
            self.changed.append(memory_id)
        self.records[memory_id] = after
