"""Memory quotas: per-tenant and per-user caps on stored versions, enforced across replicas,
whole batches or nothing, room given back on failure, purge and ForgetUser."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from foredeck.memory.v1 import memory_pb2
from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck_kit.errors import error_details
from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.adapters.qdrant_edge import EdgeVectorStore
from foredeck_memory.config import MemorySettings
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.models import MemoryRecord, Scope
from foredeck_memory.server import MemoryDeps
from foredeck_memory.testing import (
    MemoryServer,
    memory_settings,
    signing_keys,
    start_memory_server,
)
from foredeck_testing.stores import GraphDatabaseRef


class SharedVectors(EdgeVectorStore):
    """One Qdrant Edge shard used by several hosts in this process, as replicas share a
    Qdrant server: opened by the first host, closed by the test. Can fail an upsert once."""

    fail_next_upsert = False

    async def open(self) -> None:
        if self._shard is None:
            await super().open()

    async def close(self) -> None:
        """Left open for the other hosts; the test closes it with :meth:`close_shared`."""

    async def close_shared(self) -> None:
        await super().close()

    async def upsert(self, scope: Scope, items: Sequence[tuple[MemoryRecord, list[float]]]) -> None:
        if self.fail_next_upsert:
            self.fail_next_upsert = False
            raise StoreDown("qdrant")
        await super().upsert(scope, items)


class Replicas:
    """Memory servers sharing one Redis database, one graph database and one vector shard."""

    def __init__(
        self,
        redis_url: str,
        graph: GraphDatabaseRef,
        tmp_path: Path,
        embedder: LocalEmbedder,
    ) -> None:
        self.keys = signing_keys()
        self.base = memory_settings(
            redis_url=redis_url,
            bolt_uri=graph.uri,
            bolt_user=graph.user,
            bolt_password=graph.password,
            graph_database=graph.name,
            edge_path=tmp_path / "unused",
            keys=self.keys,
        )
        self.embedder = embedder
        self.vectors = SharedVectors(tmp_path / "vectors", embedder.dimensions)
        self.servers: list[MemoryServer] = []

    async def start(self, count: int, *, per_tenant: int, per_user: int) -> list[MemoryServer]:
        settings: MemorySettings = self.base.model_copy(
            update={"max_memories_per_tenant": per_tenant, "max_memories_per_user": per_user}
        )
        for _ in range(count):
            deps = MemoryDeps(
                embedder=self.embedder,
                count_tokens=self.embedder.count_tokens,
                vectors=self.vectors,
            )
            self.servers.append(await start_memory_server(settings, deps, self.keys))
        return self.servers

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        await self.vectors.close_shared()


@pytest_asyncio.fixture
async def replicas(
    redis_url: str, graph_database: GraphDatabaseRef, tmp_path: Path, embedder: LocalEmbedder
) -> AsyncIterator[Replicas]:
    group = Replicas(redis_url, graph_database, tmp_path, embedder)
    try:
        yield group
    finally:
        await group.stop()


async def remember(
    server: MemoryServer,
    content: str,
    *,
    user: str = "user-a",
    tenant: str = "tenant-a",
    fact_key: str = "",
) -> ms.RememberResponse:
    response: ms.RememberResponse = await server.long_term.Remember(
        ms.RememberRequest(request_id=str(uuid.uuid4()), content=content, fact_key=fact_key),
        metadata=server.as_user(tenant=tenant, user=user),
        timeout=60,
    )
    return response


async def stored(server: MemoryServer, user: str = "user-a", tenant: str = "tenant-a") -> int:
    """How many versions the user holds, history included."""
    reply = await server.long_term.ListMemories(
        ms.ListMemoriesRequest(
            page_size=500, filter=memory_pb2.MemoryFilter(include_superseded=True)
        ),
        metadata=server.as_user(tenant=tenant, user=user),
    )
    return len(reply.memories)


def assert_quota_exceeded(error: grpc.aio.AioRpcError, subject: str, limit: int) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(error)
    assert details.reason == "MEMORY_QUOTA_EXCEEDED"
    assert details.domain == "memory.foredeck.dev"
    assert details.metadata["quota"] == "memories"
    assert details.metadata["limit"] == str(limit)
    assert [v.subject for v in details.quota_violations] == [subject]


_FACTS = [
    "The staging database lives in Frankfurt.",
    "Lunch on Fridays is at the Thai place on Elm Street.",
    "The office plants are watered on Mondays.",
    "Backups are kept for ninety days.",
    "The quarterly review is in the large meeting room.",
    "The printer on floor three jams with thick paper.",
    "Release notes go out every other Thursday.",
    "The VPN certificate expires in March.",
    "Parking permits are renewed in January.",
    "The team mascot is a small wooden owl.",
    "Support rotations last one week each.",
    "The guest wifi password changes monthly.",
]


async def test_user_cap_counts_versions_and_refuses_a_whole_batch(replicas: Replicas) -> None:
    [server] = await replicas.start(1, per_tenant=0, per_user=3)
    await remember(server, _FACTS[0])
    await remember(server, _FACTS[1], fact_key="lunch")
    # A changed keyed fact adds a version: the superseded one keeps its history and its room.
    changed = await remember(server, "Lunch on Fridays is at the noodle bar.", fact_key="lunch")
    assert changed.outcome == memory_pb2.REMEMBER_OUTCOME_SUPERSEDED
    assert await stored(server) == 3

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await remember(server, _FACTS[2])
    assert_quota_exceeded(refused.value, "user:user-a", 3)

    # A duplicate adds no version, so it is merged even at the cap.
    merged = await remember(server, _FACTS[0])
    assert merged.memory.merge_count == 1

    # Purging a memory gives its room back; a batch larger than the room is refused whole.
    listed = await server.long_term.ListMemories(
        ms.ListMemoriesRequest(page_size=10), metadata=server.as_user()
    )
    first = next(m for m in listed.memories if m.content == _FACTS[0])
    await server.long_term.DeleteMemory(
        ms.DeleteMemoryRequest(memory_id=first.memory_id, purge=True), metadata=server.as_user()
    )
    with pytest.raises(grpc.aio.AioRpcError) as batch:
        await server.long_term.RememberMany(
            ms.RememberManyRequest(
                request_id=str(uuid.uuid4()),
                items=[ms.RememberItem(content=c) for c in _FACTS[3:5]],
            ),
            metadata=server.as_user(),
        )
    assert_quota_exceeded(batch.value, "user:user-a", 3)
    assert await stored(server) == 2
    await remember(server, _FACTS[3])
    assert await stored(server) == 3

    # ForgetUser gives all of the user's room back.
    await server.long_term.ForgetUser(ms.ForgetUserRequest(), metadata=server.as_user())
    for fact in _FACTS[5:8]:
        await remember(server, fact)
    assert await stored(server) == 3


async def test_tenant_cap_spans_users_and_stops_at_the_tenant(replicas: Replicas) -> None:
    [server] = await replicas.start(1, per_tenant=3, per_user=0)
    await remember(server, _FACTS[0], user="ann")
    await remember(server, _FACTS[1], user="ann")
    await remember(server, _FACTS[2], user="bob")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await remember(server, _FACTS[3], user="cid")
    assert_quota_exceeded(refused.value, "tenant:tenant-a", 3)
    assert await stored(server, user="cid") == 0
    # Another tenant has its own count.
    await remember(server, _FACTS[3], user="cid", tenant="tenant-b")
    assert await stored(server, user="cid", tenant="tenant-b") == 1


async def test_replicas_admit_exactly_the_cap(replicas: Replicas) -> None:
    servers = await replicas.start(2, per_tenant=5, per_user=0)

    async def attempt(index: int) -> bool:
        # A user per call, so no per-user lock orders them: only the quota script does.
        try:
            await remember(servers[index % 2], _FACTS[index], user=f"user-{index}")
        except grpc.aio.AioRpcError as error:
            assert_quota_exceeded(error, "tenant:tenant-a", 5)
            return False
        return True

    admitted = await asyncio.gather(*(attempt(i) for i in range(len(_FACTS))))
    assert sum(admitted) == 5
    held = [await stored(servers[0], user=f"user-{i}") for i in range(len(_FACTS))]
    assert held == [1 if ok else 0 for ok in admitted]


async def test_a_failed_write_gives_its_room_back(replicas: Replicas) -> None:
    [server] = await replicas.start(1, per_tenant=0, per_user=2)
    replicas.vectors.fail_next_upsert = True
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await remember(server, _FACTS[0])
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    await remember(server, _FACTS[1])
    await remember(server, _FACTS[2])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await remember(server, _FACTS[3])
    assert_quota_exceeded(refused.value, "user:user-a", 2)


async def test_counts_start_from_the_store(replicas: Replicas, redis_client: Redis) -> None:
    [server] = await replicas.start(1, per_tenant=0, per_user=2)
    await remember(server, _FACTS[0])
    await remember(server, _FACTS[1])
    # Counters lost (or data written before counting began): the next write recounts.
    dropped = [key async for key in redis_client.scan_iter(match="fdmem:quota:*")]
    assert len(dropped) == 2
    await redis_client.delete(*dropped)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await remember(server, _FACTS[2])
    assert_quota_exceeded(refused.value, "user:user-a", 2)
