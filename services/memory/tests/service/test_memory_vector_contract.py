"""One contract for both vector adapters: Qdrant Edge (in-process) and qdrant-client against a
Qdrant (here its local mode, small data only)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from qdrant_client import AsyncQdrantClient

from foredeck_memory.adapters.qdrant_edge import EdgeVectorStore
from foredeck_memory.adapters.qdrant_server import QdrantServerVectorStore
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.models import (
    OPEN_END,
    MemoryRecord,
    Provenance,
    Scope,
    VectorFilter,
    valid_at,
)
from foredeck_memory.domain.ports import VectorStore

DIM = 8

# qdrant-client's local mode ignores payload indexes and says so; a server honours them.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


@pytest_asyncio.fixture(params=["edge", "qdrant-client"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    adapter: VectorStore
    if request.param == "edge":
        adapter = EdgeVectorStore(tmp_path / "edge", DIM)
    else:
        adapter = QdrantServerVectorStore(AsyncQdrantClient(location=":memory:"), "memories", DIM)
    await adapter.open()
    try:
        yield adapter
    finally:
        await adapter.close()


def axis(i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(DIM)]


def record(scope: Scope, content: str, **changes: object) -> MemoryRecord:
    memory_id = str(uuid.uuid4())
    base = MemoryRecord(
        memory_id=memory_id,
        chain_id=memory_id,
        content=content,
        category="fact",
        metadata={"topic": "x", "rank": 2},
        provenance=Provenance(scope.tenant_id, scope.user_id, "run-1", "step-1"),
        valid_from=100,
        valid_to=OPEN_END,
        dedup_key=content,
        embedding_model="test",
        create_time=100,
        update_time=100,
    )
    return base.evolve(**changes)


A = Scope("tenant-a", "u1")
B = Scope("tenant-b", "u1")


async def test_search_ranks_by_cosine_inside_the_partition(store: VectorStore) -> None:
    near, far = record(A, "near"), record(A, "far")
    other = record(B, "other tenant")
    await store.upsert(A, [(near, axis(0)), (far, axis(1))])
    await store.upsert(B, [(other, axis(0))])
    hits = await store.search(A, axis(0), 10, VectorFilter(), None)
    assert [h.record.content for h in hits] == ["near", "far"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].record == near
    only_b = await store.search(B, axis(0), 10, VectorFilter(), None)
    assert [h.record.content for h in only_b] == ["other tenant"]
    assert await store.search(A, axis(0), 10, VectorFilter(), 0.5) == [hits[0]]


async def test_filters(store: VectorStore) -> None:
    old = record(A, "old", valid_to=200, category="episode")
    new = record(A, "new", valid_from=200, metadata={"topic": "y", "rank": 2.5})
    await store.upsert(A, [(old, axis(0)), (new, axis(0))])

    async def contents(where: VectorFilter) -> list[str]:
        return sorted(h.record.content for h in await store.search(A, axis(0), 10, where, None))

    assert await contents(VectorFilter(ranges=valid_at(150))) == ["old"]
    assert await contents(VectorFilter(ranges=valid_at(250))) == ["new"]
    assert await contents(VectorFilter(equals={"metadata.topic": "y"})) == ["new"]
    assert await contents(VectorFilter(equals={"metadata.rank": 2.5})) == ["new"]
    assert await contents(VectorFilter(any_of={"category": ["episode", "x"]})) == ["old"]
    assert await contents(VectorFilter(ids=[new.memory_id])) == ["new"]
    scrolled = await store.scroll(A, VectorFilter(equals={"dedup_key": "old"}), 10)
    assert [r.memory_id for r in scrolled] == [old.memory_id]


async def test_partition_keys_cannot_be_filtered_on(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="partition"):
        await store.search(A, axis(0), 10, VectorFilter(equals={"tenant_id": "tenant-b"}), None)


async def test_payload_update_delete_and_forget(store: VectorStore) -> None:
    first, second = record(A, "first"), record(A, "second")
    await store.upsert(A, [(first, axis(0)), (second, axis(1))])
    await store.set_payload(A, first.evolve(merge_count=3))
    [again] = await store.scroll(A, VectorFilter(ids=[first.memory_id]), 10)
    assert again.merge_count == 3
    # A delete from another tenant with a known id removes nothing.
    await store.delete(B, [first.memory_id])
    assert await store.count_tenant("tenant-a") == 2
    await store.delete(A, [first.memory_id])
    assert await store.count_tenant("tenant-a") == 1
    assert await store.delete_user(A) == 1
    assert await store.count_tenant("tenant-a") == 0


async def test_writing_into_another_partition_is_refused(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="partition"):
        await store.upsert(A, [(record(B, "smuggled"), axis(0))])


async def test_search_many_answers_each_query_in_its_partition(store: VectorStore) -> None:
    x, y = record(A, "x", category="episode"), record(A, "y")
    await store.upsert(A, [(x, axis(0)), (y, axis(1))])
    await store.upsert(B, [(record(B, "b"), axis(0))])
    answers = await store.search_many(
        A,
        [
            (axis(0), VectorFilter()),
            (axis(1), VectorFilter()),
            (axis(0), VectorFilter(any_of={"category": ["fact"]})),
        ],
        1,
        None,
    )
    assert [[h.record.content for h in hits] for hits in answers] == [["x"], ["y"], ["y"]]
    assert await store.search_many(A, [], 1, None) == []


async def test_edge_shard_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "edge"
    first = EdgeVectorStore(path, DIM)
    await first.open()
    kept = record(A, "kept")
    await first.upsert(A, [(kept, axis(2))])
    await first.close()
    with pytest.raises(StoreDown):
        await first.count_tenant("tenant-a")
    again = EdgeVectorStore(path, DIM)
    await again.open()
    try:
        [hit] = await again.search(A, axis(2), 1, VectorFilter(), None)
        assert hit.record == kept
    finally:
        await again.close()
