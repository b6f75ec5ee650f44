"""A Qdrant server through ``qdrant-client``: the production vector store.

The same contract tests run against this adapter (on qdrant-client's local mode, small data
only) and against Qdrant Edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qdrant_client import AsyncQdrantClient, models

from foredeck_memory.adapters.vector_filters import (
    INTEGER_INDEXES,
    KEYWORD_INDEXES,
    Condition,
    conditions,
)
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.models import MemoryRecord, Scope, ScoredMemory, VectorFilter

_SCROLL_PAGE = 1000


def _condition(c: Condition) -> models.FieldCondition:
    if c.kind == "any":
        return models.FieldCondition(key=c.key, match=models.MatchAny(any=list(c.any_of)))
    if c.kind == "range":
        return models.FieldCondition(key=c.key, range=models.Range(gte=c.gte, lt=c.lt))
    if isinstance(c.value, float):
        return models.FieldCondition(key=c.key, range=models.Range(gte=c.value, lte=c.value))
    assert c.value is not None
    return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))


def _filter(conds: list[Condition]) -> models.Filter:
    return models.Filter(must=[_condition(c) for c in conds])


class QdrantServerVectorStore:
    """A :class:`~foredeck_memory.domain.ports.VectorStore` on a Qdrant collection."""

    name = "qdrant"

    def __init__(self, client: AsyncQdrantClient, collection: str, dimensions: int) -> None:
        self._client = client
        self._collection = collection
        self._dimensions = dimensions

    async def open(self) -> None:
        """Create the collection and its payload indexes when they are missing."""
        try:
            if not await self._client.collection_exists(self._collection):
                await self._client.create_collection(
                    self._collection,
                    vectors_config=models.VectorParams(
                        size=self._dimensions, distance=models.Distance.COSINE
                    ),
                )
            for field in KEYWORD_INDEXES:
                await self._client.create_payload_index(
                    self._collection, field, models.PayloadSchemaType.KEYWORD
                )
            for field in INTEGER_INDEXES:
                await self._client.create_payload_index(
                    self._collection, field, models.PayloadSchemaType.INTEGER
                )
        except Exception as exc:
            raise StoreDown("qdrant", exc) from exc

    async def close(self) -> None:
        await self._client.close()

    async def ping(self) -> None:
        try:
            await self._client.get_collection(self._collection)
        except Exception as exc:
            raise StoreDown("qdrant", exc) from exc

    async def upsert(self, scope: Scope, items: Sequence[tuple[MemoryRecord, list[float]]]) -> None:
        points = []
        for record, vector in items:
            if (record.provenance.tenant_id, record.provenance.user_id) != (
                scope.tenant_id,
                scope.user_id,
            ):
                raise ValueError("a record may only be written in its own partition")
            points.append(
                models.PointStruct(id=record.memory_id, vector=vector, payload=record.to_payload())
            )
        await self._call(self._client.upsert(self._collection, points=points, wait=True))

    async def set_payload(self, scope: Scope, record: MemoryRecord) -> None:
        flt = _filter(conditions(scope, VectorFilter(ids=[record.memory_id])))
        await self._call(
            self._client.overwrite_payload(
                self._collection, payload=record.to_payload(), points=flt, wait=True
            )
        )

    async def search(
        self,
        scope: Scope,
        vector: list[float],
        limit: int,
        where: VectorFilter,
        min_score: float | None,
    ) -> list[ScoredMemory]:
        result = await self._call(
            self._client.query_points(
                self._collection,
                query=vector,
                query_filter=_filter(conditions(scope, where)),
                limit=limit,
                with_payload=True,
                score_threshold=min_score,
            )
        )
        return [
            ScoredMemory(MemoryRecord.from_payload(dict(p.payload or {})), float(p.score))
            for p in result.points
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
        requests = [
            models.QueryRequest(
                query=vector,
                filter=_filter(conditions(scope, where)),
                limit=limit,
                with_payload=True,
                score_threshold=min_score,
            )
            for vector, where in queries
        ]
        answers = await self._call(self._client.query_batch_points(self._collection, requests))
        return [
            [
                ScoredMemory(MemoryRecord.from_payload(dict(p.payload or {})), float(p.score))
                for p in answer.points
            ]
            for answer in answers
        ]

    async def scroll(self, scope: Scope, where: VectorFilter, limit: int) -> list[MemoryRecord]:
        flt = _filter(conditions(scope, where))
        out: list[MemoryRecord] = []
        offset: Any = None
        while len(out) < limit:
            records, offset = await self._call(
                self._client.scroll(
                    self._collection,
                    scroll_filter=flt,
                    limit=min(_SCROLL_PAGE, limit - len(out)),
                    offset=offset,
                    with_payload=True,
                    with_vectors=False,
                )
            )
            out.extend(MemoryRecord.from_payload(dict(r.payload or {})) for r in records)
            if offset is None or not records:
                break
        return out

    async def delete(self, scope: Scope, memory_ids: Sequence[str]) -> None:
        if not memory_ids:
            return
        flt = _filter(conditions(scope, VectorFilter(ids=list(memory_ids))))
        await self._call(self._client.delete(self._collection, points_selector=flt, wait=True))

    async def delete_user(self, scope: Scope) -> int:
        flt = _filter(conditions(scope, VectorFilter()))
        count = await self._call(self._client.count(self._collection, count_filter=flt, exact=True))
        await self._call(self._client.delete(self._collection, points_selector=flt, wait=True))
        return int(count.count)

    async def count_tenant(self, tenant_id: str) -> int:
        flt = _filter(conditions(None, VectorFilter(), tenant_id=tenant_id))
        count = await self._call(self._client.count(self._collection, count_filter=flt, exact=True))
        return int(count.count)

    async def count_user(self, scope: Scope) -> int:
        flt = _filter(conditions(scope, VectorFilter()))
        count = await self._call(self._client.count(self._collection, count_filter=flt, exact=True))
        return int(count.count)

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            raise StoreDown("qdrant", exc) from exc
