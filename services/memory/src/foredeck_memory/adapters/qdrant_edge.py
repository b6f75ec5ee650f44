"""Qdrant Edge: Qdrant's engine in-process, the embedded default vector store.

The service owns the shard directory: it creates it on first start, loads it afterwards,
creates the payload indexes idempotently, and on shutdown waits for in-flight calls, then
flushes and closes the shard so nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from foredeck_memory.adapters.vector_filters import (
    INTEGER_INDEXES,
    KEYWORD_INDEXES,
    Condition,
    conditions,
)
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.models import MemoryRecord, Scope, ScoredMemory, VectorFilter

_SCROLL_PAGE = 1000
OPTIMIZE_EVERY = 5000
"""Points written between two runs of the shard's optimizers (which build the HNSW index)."""


def _edge_condition(c: Condition) -> qe.FieldCondition:
    if c.kind == "any":
        return qe.FieldCondition(key=c.key, match=qe.MatchAny(list(c.any_of)))
    if c.kind == "range":
        return qe.FieldCondition(
            key=c.key,
            range=qe.RangeFloat(
                gte=None if c.gte is None else float(c.gte),
                lt=None if c.lt is None else float(c.lt),
            ),
        )
    if isinstance(c.value, float):
        return qe.FieldCondition(key=c.key, range=qe.RangeFloat(gte=c.value, lte=c.value))
    assert c.value is not None
    return qe.FieldCondition(key=c.key, match=qe.MatchValue(c.value))


def _edge_filter(conds: list[Condition]) -> qe.Filter:
    return qe.Filter(must=[_edge_condition(c) for c in conds])


class EdgeVectorStore:
    """A :class:`~foredeck_memory.domain.ports.VectorStore` on a Qdrant Edge shard."""

    name = "qdrant-edge"

    def __init__(
        self, path: str | Path, dimensions: int, *, optimize_every: int = OPTIMIZE_EVERY
    ) -> None:
        self._path = Path(path)
        self._dimensions = dimensions
        self._shard: qe.EdgeShard | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._optimize_every = optimize_every
        self._written = 0
        self._optimizing: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Create or load the shard and make sure every payload index exists."""
        await asyncio.to_thread(self._open_sync)
        # A loaded shard may hold segments written since its last optimisation.
        self._start_optimizing()

    def _start_optimizing(self) -> None:
        """Run the shard's optimizers in the background unless they are running already.

        Without them every segment stays plain and each search is a scan; with them large
        segments get their HNSW index. Searches go on meanwhile.
        """
        if self._optimizing is not None and not self._optimizing.done():
            return
        self._written = 0
        self._optimizing = asyncio.get_running_loop().create_task(self._optimize_once())

    async def _optimize_once(self) -> None:
        async with self._using() as shard:
            await asyncio.to_thread(shard.optimize)

    async def optimize(self) -> None:
        """Optimise now and return when no optimisation is pending (benchmarks, tests)."""
        if self._optimizing is not None:
            with contextlib.suppress(Exception):
                await self._optimizing
        await self._optimize_once()

    def _open_sync(self) -> None:
        self._path.mkdir(parents=True, exist_ok=True)
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=self._dimensions, distance=qe.Distance.Cosine)
        )
        has_data = any(self._path.iterdir())
        shard = (
            qe.EdgeShard.load(str(self._path))
            if has_data
            else qe.EdgeShard.create(str(self._path), config)
        )
        for field in KEYWORD_INDEXES:
            shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
        for field in INTEGER_INDEXES:
            shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Integer))
        self._shard = shard

    async def close(self) -> None:
        """Refuse new calls, wait for the running ones, then flush and close the shard."""
        if self._optimizing is not None:
            with contextlib.suppress(Exception):
                await self._optimizing
        self._closing = True
        await self._idle.wait()
        shard, self._shard = self._shard, None
        if shard is not None:
            await asyncio.to_thread(self._flush_close, shard)

    @staticmethod
    def _flush_close(shard: qe.EdgeShard) -> None:
        shard.flush()
        shard.close()

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[qe.EdgeShard]:
        if self._closing or self._shard is None:
            raise StoreDown("qdrant")
        self._inflight += 1
        self._idle.clear()
        try:
            yield self._shard
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def ping(self) -> None:
        async with self._using() as shard:
            await asyncio.to_thread(shard.info)

    async def upsert(self, scope: Scope, items: Sequence[tuple[MemoryRecord, list[float]]]) -> None:
        points = []
        for record, vector in items:
            _check_scope(scope, record)
            points.append(qe.Point(record.memory_id, vector, record.to_payload()))
        async with self._using() as shard:
            await asyncio.to_thread(shard.update, qe.UpdateOperation.upsert_points(points))
        self._written += len(points)
        if self._written >= self._optimize_every:
            self._start_optimizing()

    async def set_payload(self, scope: Scope, record: MemoryRecord) -> None:
        _check_scope(scope, record)
        op = qe.UpdateOperation.overwrite_payload([record.memory_id], record.to_payload())
        async with self._using() as shard:
            await asyncio.to_thread(shard.update, op)

    async def search(
        self,
        scope: Scope,
        vector: list[float],
        limit: int,
        where: VectorFilter,
        min_score: float | None,
    ) -> list[ScoredMemory]:
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(vector),
            filter=_edge_filter(conditions(scope, where)),
            with_payload=True,
            score_threshold=min_score,
        )
        async with self._using() as shard:
            hits = await asyncio.to_thread(shard.query, request)
        return [
            ScoredMemory(MemoryRecord.from_payload(_payload(h.payload)), float(h.score))
            for h in hits
        ]

    async def search_many(
        self,
        scope: Scope,
        queries: Sequence[tuple[list[float], VectorFilter]],
        limit: int,
        min_score: float | None,
    ) -> list[list[ScoredMemory]]:
        if not queries:
            return []
        batch = qe.QueryBatchRequest(
            [
                qe.QueryRequest(
                    limit=limit,
                    query=qe.Query.Nearest(vector),
                    filter=_edge_filter(conditions(scope, where)),
                    with_payload=True,
                    score_threshold=min_score,
                )
                for vector, where in queries
            ]
        )
        async with self._using() as shard:
            answers = await asyncio.to_thread(shard.query_batch, batch)
        return [
            [
                ScoredMemory(MemoryRecord.from_payload(_payload(h.payload)), float(h.score))
                for h in hits
            ]
            for hits in answers
        ]

    async def scroll(self, scope: Scope, where: VectorFilter, limit: int) -> list[MemoryRecord]:
        return [
            MemoryRecord.from_payload(p)
            for p in await self._scroll_payloads(_edge_filter(conditions(scope, where)), limit)
        ]

    async def _scroll_payloads(self, flt: qe.Filter, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset: Any = None
        async with self._using() as shard:
            while len(out) < limit:
                page = min(_SCROLL_PAGE, limit - len(out))
                request = qe.ScrollRequest(
                    offset=offset, limit=page, filter=flt, with_payload=True, with_vector=False
                )
                records, offset = await asyncio.to_thread(shard.scroll, request)
                out.extend(_payload(r.payload) for r in records)
                if offset is None or not records:
                    break
        return out

    async def delete(self, scope: Scope, memory_ids: Sequence[str]) -> None:
        if not memory_ids:
            return
        # Deleting by filter (partition + ids) rather than by bare ids keeps a forged id from
        # ever reaching another partition's point.
        flt = _edge_filter(conditions(scope, VectorFilter(ids=list(memory_ids))))
        async with self._using() as shard:
            await asyncio.to_thread(shard.update, qe.UpdateOperation.delete_points_by_filter(flt))

    async def delete_user(self, scope: Scope) -> int:
        flt = _edge_filter(conditions(scope, VectorFilter()))
        async with self._using() as shard:
            count = await asyncio.to_thread(shard.count, qe.CountRequest(exact=True, filter=flt))
            await asyncio.to_thread(shard.update, qe.UpdateOperation.delete_points_by_filter(flt))
        return int(count)

    async def count_tenant(self, tenant_id: str) -> int:
        flt = _edge_filter(conditions(None, VectorFilter(), tenant_id=tenant_id))
        async with self._using() as shard:
            return int(
                await asyncio.to_thread(shard.count, qe.CountRequest(exact=True, filter=flt))
            )

    async def count_user(self, scope: Scope) -> int:
        flt = _edge_filter(conditions(scope, VectorFilter()))
        async with self._using() as shard:
            return int(
                await asyncio.to_thread(shard.count, qe.CountRequest(exact=True, filter=flt))
            )


def _payload(payload: dict[str, Any] | None) -> dict[str, Any]:
    if payload is None:
        raise RuntimeError("point returned without its payload")
    return payload


def _check_scope(scope: Scope, record: MemoryRecord) -> None:
    if (record.provenance.tenant_id, record.provenance.user_id) != (scope.tenant_id, scope.user_id):
        raise ValueError("a record may only be written in its own partition")
