"""ForgetUser deletes for real across the three stores; tenants never see each other's data."""

from __future__ import annotations

import random
import uuid

import grpc
import pytest
from neo4j import AsyncDriver
from redis.asyncio import Redis

from foredeck.common.v1 import chat_pb2
from foredeck.common.v1 import memory_pb2 as common_memory_pb2
from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck_kit.errors import error_details
from foredeck_memory.adapters.redis_support import tag
from foredeck_memory.domain.models import Scope, VectorFilter
from foredeck_memory.testing import MemoryServer
from foredeck_testing.stores import GraphDatabaseRef


def ref(entity_type: str, entity_id: str) -> common_memory_pb2.EntityRef:
    return common_memory_pb2.EntityRef(type=entity_type, entity_id=entity_id)


async def test_forget_user_removes_everything(
    memory_server: MemoryServer,
    neo4j_driver: AsyncDriver,
    graph_database: GraphDatabaseRef,
    redis_client: Redis,
) -> None:
    alice = memory_server.as_user(user="alice")
    bob = memory_server.as_user(user="bob")
    await memory_server.entities.UpsertEntities(
        ms.UpsertEntitiesRequest(
            request_id=str(uuid.uuid4()),
            entities=[
                ms.EntityUpsert(entity=ref("Person", "alice")),
                ms.EntityUpsert(entity=ref("Project", "apollo")),
            ],
        ),
        metadata=alice,
    )
    await memory_server.entities.UpsertEntities(
        ms.UpsertEntitiesRequest(
            request_id=str(uuid.uuid4()), entities=[ms.EntityUpsert(entity=ref("Person", "bob"))]
        ),
        metadata=bob,
    )
    await memory_server.entities.UpsertRelationships(
        ms.UpsertRelationshipsRequest(
            request_id=str(uuid.uuid4()),
            relationships=[
                ms.RelationshipUpsert(
                    source=ref("Person", "bob"), type="KNOWS", target=ref("Person", "alice")
                )
            ],
        ),
        metadata=bob,
    )
    for i, content in enumerate(["Alice likes tea.", "Alice works on Apollo.", "Alice is tall."]):
        await memory_server.long_term.Remember(
            ms.RememberRequest(
                content=content, request_id=f"r{i}", entity_refs=[ref("Project", "apollo")]
            ),
            metadata=alice,
        )
    kept = await memory_server.long_term.Remember(
        ms.RememberRequest(request_id=str(uuid.uuid4()), content="Bob likes coffee."), metadata=bob
    )
    await memory_server.working.AppendMessages(
        ms.AppendMessagesRequest(
            session_id="run-1",
            request_id="append-1",
            messages=[
                chat_pb2.ChatMessage(
                    role=chat_pb2.ROLE_USER,
                    parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="hi"))],
                )
            ],
        ),
        metadata=alice,
    )

    forgotten = await memory_server.long_term.ForgetUser(
        ms.ForgetUserRequest(subject_entity_refs=[ref("Person", "alice")]), metadata=alice
    )
    assert forgotten.user_id == "alice"
    assert forgotten.deleted_memory_count == 3
    # alice's two entity versions (Person:alice, Project:apollo); bob's KNOWS edge touches her.
    assert forgotten.deleted_entity_version_count == 2
    assert forgotten.deleted_relationship_version_count == 1
    assert forgotten.deleted_session_count == 1

    listed = await memory_server.long_term.ListMemories(ms.ListMemoriesRequest(), metadata=alice)
    assert list(listed.memories) == []
    records, _, _ = await neo4j_driver.execute_query(
        "MATCH (m:FdMemory) RETURN m.user_id AS user", database_=graph_database.name
    )
    assert [r["user"] for r in records] == ["bob"]
    records, _, _ = await neo4j_driver.execute_query(
        "MATCH (e:FdEntity) RETURN e.ekey AS ekey ORDER BY ekey", database_=graph_database.name
    )
    assert [r["ekey"] for r in records] == ["Person:bob"]
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await memory_server.working.ListMessages(
            ms.ListMessagesRequest(session_id="run-1"), metadata=alice
        )
    assert error_details(gone.value).reason == "SESSION_NOT_FOUND"
    leftovers = [key async for key in redis_client.scan_iter(match="fdmem:*")]
    assert all(b"lock" not in key for key in leftovers)
    alice_tags = (tag("tenant-a", "alice").encode(), tag("tenant-a", "alice", "run-1").encode())
    assert [k for k in leftovers if any(t in k for t in alice_tags)] == []
    bob_tag = tag("tenant-a", "bob").encode()
    assert [k for k in leftovers if bob_tag in k and b":idem:" in k]
    still = await memory_server.long_term.GetMemory(
        ms.GetMemoryRequest(memory_id=kept.memory.memory_id), metadata=bob
    )
    assert still.memory.content == "Bob likes coffee."

    repeat = await memory_server.long_term.ForgetUser(ms.ForgetUserRequest(), metadata=alice)
    assert (repeat.deleted_memory_count, repeat.deleted_session_count) == (0, 0)


async def test_forgetting_another_user_needs_admin(memory_server: MemoryServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await memory_server.long_term.ForgetUser(
            ms.ForgetUserRequest(user_id="someone-else"),
            metadata=memory_server.as_user(permissions=["memory:forget"]),
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tenant_canaries(memory_server: MemoryServer) -> None:
    tenant_a = memory_server.as_user(tenant="tenant-a", user="same-user")
    tenant_b = memory_server.as_user(tenant="tenant-b", user="same-user")
    secrets = [
        f"canary {i}: the vault code of tenant A is {random.randrange(10**8)}" for i in range(20)
    ]
    for secret in secrets:
        await memory_server.long_term.Remember(
            ms.RememberRequest(request_id=str(uuid.uuid4()), content=secret), metadata=tenant_a
        )
    await memory_server.entities.UpsertRelationships(
        ms.UpsertRelationshipsRequest(
            request_id=str(uuid.uuid4()),
            relationships=[
                ms.RelationshipUpsert(
                    source=ref("Person", "shared-id"), type="KNOWS", target=ref("Person", "a-only")
                )
            ],
            create_missing_entities=True,
        ),
        metadata=tenant_a,
    )
    await memory_server.entities.UpsertEntities(
        ms.UpsertEntitiesRequest(
            request_id=str(uuid.uuid4()),
            entities=[ms.EntityUpsert(entity=ref("Person", "shared-id"))],
        ),
        metadata=tenant_b,
    )
    await memory_server.long_term.Remember(
        ms.RememberRequest(request_id=str(uuid.uuid4()), content="tenant B's own harmless note"),
        metadata=tenant_b,
    )

    # 10,000 random queries from tenant B straight at the vector store: the partition the
    # adapter adds must hold for any vector at all.
    vectors = memory_server.host.vectors
    assert vectors is not None
    rng = random.Random(7)
    scope_b = Scope("tenant-b", "same-user")
    for _ in range(10_000):
        query = [rng.uniform(-1, 1) for _ in range(384)]
        for hit in await vectors.search(scope_b, query, 10, VectorFilter(), None):
            assert hit.record.provenance.tenant_id == "tenant-b"
    # And through the service, with the canaries' own words as queries.
    for secret in secrets:
        found = await memory_server.long_term.Recall(
            ms.RecallRequest(query=secret, limit=100), metadata=tenant_b
        )
        assert [m.memory.content for m in found.memories] == ["tenant B's own harmless note"]

    neighbourhood = await memory_server.entities.GetNeighborhood(
        ms.GetNeighborhoodRequest(entity=ref("Person", "shared-id"), depth=3, limit=100),
        metadata=tenant_b,
    )
    assert list(neighbourhood.neighbors) == []
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await memory_server.entities.GetEntity(
            ms.GetEntityRequest(entity=ref("Person", "a-only")), metadata=tenant_b
        )
    assert error_details(hidden.value).reason == "ENTITY_NOT_FOUND"
    searched = await memory_server.entities.SearchEntities(
        ms.SearchEntitiesRequest(), metadata=tenant_b
    )
    assert [e.entity_id for e in searched.entities] == ["shared-id"]
    graph = memory_server.host.graph
    assert graph is not None
    for entity_id in ("a-only", "shared-id"):
        for _ in range(200):
            result = await graph.neighbourhood(
                "tenant-b", "Person", entity_id, rng.randint(1, 3), [], "BOTH", 500, 2**61
            )
            if result is not None:
                assert all(e.provenance.tenant_id == "tenant-b" for e, _ in result.neighbours)
                assert result.neighbours == []
