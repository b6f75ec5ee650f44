"""A memory is in both the vector store and the graph, or in neither, even when a store dies
between the two writes; health follows the store down and back up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from neo4j import AsyncGraphDatabase
from redis.asyncio import Redis

from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck_kit.errors import error_details
from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.adapters.neo4j_graph import Neo4jGraphStore
from foredeck_memory.adapters.qdrant_edge import EdgeVectorStore
from foredeck_memory.adapters.redis_support import RedisLocks, RedisOutbox
from foredeck_memory.domain.long_term import LongTermMemory, RememberInput
from foredeck_memory.domain.models import MemoryRecord, Scope, VectorFilter
from foredeck_memory.server import MemoryDeps
from foredeck_memory.testing import memory_settings, signing_keys, start_memory_server
from foredeck_stack.stores import ArcadeDbProcess
from foredeck_testing.stores import GraphDatabaseRef


class HookedVectors(EdgeVectorStore):
    """Qdrant Edge that runs a hook right after an upsert lands, before the graph write."""

    after_upsert: Callable[[], Awaitable[None]] | None = None

    async def upsert(self, scope: Scope, items: Sequence[tuple[MemoryRecord, list[float]]]) -> None:
        await super().upsert(scope, items)
        hook, self.after_upsert = self.after_upsert, None
        if hook is not None:
            await hook()


async def wait_health(channel: grpc.aio.Channel, wanted: int) -> None:
    """Follow the health Watch stream until it reports ``wanted`` (bounded by 60 s)."""
    stub = health_pb2_grpc.HealthStub(channel)

    async def watch() -> None:
        async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
            if reply.status == wanted:
                return

    await asyncio.wait_for(watch(), 60.0)


@pytest.mark.slow
async def test_graph_killed_between_the_stores(
    redis_url: str, tmp_path: Path, embedder: LocalEmbedder
) -> None:
    arcade = ArcadeDbProcess(tmp_path / "arcade", default_database="memory")
    await arcade.start()
    vectors = HookedVectors(tmp_path / "vectors", embedder.dimensions)
    keys = signing_keys()
    settings = memory_settings(
        redis_url=redis_url,
        bolt_uri=arcade.bolt_uri,
        bolt_user=arcade.user,
        bolt_password=arcade.password,
        graph_database="memory",
        edge_path=tmp_path / "unused",
        keys=keys,
    )
    server = await start_memory_server(
        settings,
        MemoryDeps(embedder=embedder, count_tokens=embedder.count_tokens, vectors=vectors),
        keys,
    )
    bolt_port = arcade.bolt_port
    try:
        vectors.after_upsert = arcade.stop
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await server.long_term.Remember(
                ms.RememberRequest(
                    request_id=str(uuid.uuid4()), content="Grace keeps bees on the roof."
                ),
                metadata=server.as_user(),
                timeout=60,
            )
        details = error_details(failure.value)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details.reason == "GRAPH_STORE_UNAVAILABLE"
        assert details.retry_after is not None
        # The vector written before the graph died was rolled back: the memory is in neither.
        left = await vectors.scroll(Scope("tenant-a", "user-a"), VectorFilter(), 100)
        assert left == []
        await wait_health(server.channel, health_pb2.HealthCheckResponse.NOT_SERVING)

        restarted = ArcadeDbProcess(
            tmp_path / "arcade", password=arcade.password, bolt_port=bolt_port
        )
        arcade = restarted
        await arcade.start()
        await wait_health(server.channel, health_pb2.HealthCheckResponse.SERVING)
        stored = await server.long_term.Remember(
            ms.RememberRequest(
                request_id=str(uuid.uuid4()), content="Grace keeps bees on the roof."
            ),
            metadata=server.as_user(),
            timeout=60,
        )
        found = await server.long_term.Recall(
            ms.RecallRequest(query="Who has beehives?", limit=5), metadata=server.as_user()
        )
        assert [m.memory.memory_id for m in found.memories] == [stored.memory.memory_id]
    finally:
        await server.stop()
        await arcade.stop()


async def test_repair_rolls_back_a_write_cut_short(
    redis_url: str, graph_database: GraphDatabaseRef, tmp_path: Path, embedder: LocalEmbedder
) -> None:
    """A process that died after the vector write and before the graph write leaves an outbox
    entry; repair removes the orphaned vector so the memory is in neither store."""
    redis = Redis.from_url(redis_url)
    driver = AsyncGraphDatabase.driver(graph_database.uri, auth=graph_database.auth)
    vectors = EdgeVectorStore(tmp_path / "vectors", embedder.dimensions)
    graph = Neo4jGraphStore(driver, graph_database.name)
    await vectors.open()
    await graph.open()
    outbox = RedisOutbox(redis)
    memory = LongTermMemory(
        vectors=vectors, graph=graph, embedder=embedder, outbox=outbox, locks=RedisLocks(redis)
    )
    scope = Scope("tenant-a", "user-a")
    try:
        kept = await memory.remember(scope, RememberInput(content="Heidi collects stamps."))
        # What _write_both does up to the moment the process dies: intent, then vector only.
        orphan_id = str(uuid.uuid4())
        orphan = kept.record.evolve(memory_id=orphan_id, chain_id=orphan_id, content="orphan")
        await outbox.begin(
            {"tenant_id": "tenant-a", "user_id": "user-a", "new_ids": [orphan_id], "restore": []}
        )
        [vector] = await embedder.embed(["orphan"])
        await vectors.upsert(scope, [(orphan, vector)])
        before = await vectors.scroll(scope, VectorFilter(), 10)
        assert {r.memory_id for r in before} == {kept.record.memory_id, orphan_id}

        assert await memory.repair(older_than_seconds=0) == 1
        after = await vectors.scroll(scope, VectorFilter(), 10)
        assert [r.memory_id for r in after] == [kept.record.memory_id]
        assert await outbox.stale(0) == []
        records, _, _ = await driver.execute_query(
            "MATCH (m:FdMemory) RETURN m.memory_id AS id", database_=graph_database.name
        )
        assert [r["id"] for r in records] == [kept.record.memory_id]
    finally:
        await vectors.close()
        await driver.close()
        await redis.aclose()
