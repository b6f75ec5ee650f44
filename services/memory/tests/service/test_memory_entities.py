"""Entity memory over gRPC on a real ArcadeDB server speaking Bolt."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import struct_pb2

from foredeck.common.v1 import memory_pb2 as common_memory_pb2
from foredeck.memory.v1 import entity_pb2
from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck_kit.errors import error_details
from foredeck_memory.testing import MemoryServer


def ref(entity_type: str, entity_id: str) -> common_memory_pb2.EntityRef:
    return common_memory_pb2.EntityRef(type=entity_type, entity_id=entity_id)


def props(**values: str | int) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


async def upsert(
    server: MemoryServer, *items: ms.EntityUpsert, tenant: str = "tenant-a"
) -> ms.UpsertEntitiesResponse:
    reply: ms.UpsertEntitiesResponse = await server.entities.UpsertEntities(
        ms.UpsertEntitiesRequest(request_id=str(uuid.uuid4()), entities=list(items)),
        metadata=server.as_user(tenant=tenant),
    )
    return reply


async def relate(
    server: MemoryServer, *items: ms.RelationshipUpsert, tenant: str = "tenant-a"
) -> ms.UpsertRelationshipsResponse:
    reply: ms.UpsertRelationshipsResponse = await server.entities.UpsertRelationships(
        ms.UpsertRelationshipsRequest(
            request_id=str(uuid.uuid4()), relationships=list(items), create_missing_entities=True
        ),
        metadata=server.as_user(tenant=tenant),
    )
    return reply


async def test_upsert_supersedes_and_keeps_history(memory_server: MemoryServer) -> None:
    created = await upsert(
        memory_server, ms.EntityUpsert(entity=ref("Person", "alice"), properties=props(city="Oslo"))
    )
    assert created.results[0].outcome == entity_pb2.UPSERT_OUTCOME_CREATED
    first = created.results[0].entity
    same = await upsert(
        memory_server, ms.EntityUpsert(entity=ref("Person", "alice"), properties=props(city="Oslo"))
    )
    assert same.results[0].outcome == entity_pb2.UPSERT_OUTCOME_UNCHANGED
    moved = await upsert(
        memory_server,
        ms.EntityUpsert(entity=ref("Person", "alice"), properties=props(city="Bergen", age=31)),
    )
    assert moved.results[0].outcome == entity_pb2.UPSERT_OUTCOME_SUPERSEDED
    assert moved.results[0].entity.version == 2
    assert dict(moved.results[0].entity.properties) == {"city": "Bergen", "age": 31}
    now = await memory_server.entities.GetEntity(
        ms.GetEntityRequest(entity=ref("Person", "alice")), metadata=memory_server.as_user()
    )
    assert now.entity.properties["city"] == "Bergen"
    request = ms.GetEntityRequest(entity=ref("Person", "alice"))
    request.as_of.CopyFrom(first.valid_from)
    then = await memory_server.entities.GetEntity(request, metadata=memory_server.as_user())
    assert then.entity.version == 1
    assert then.entity.properties["city"] == "Oslo"
    assert then.entity.valid_to == moved.results[0].entity.valid_from


async def test_neighbourhood_to_depth(memory_server: MemoryServer) -> None:
    await relate(
        memory_server,
        ms.RelationshipUpsert(source=ref("Person", "a"), type="KNOWS", target=ref("Person", "b")),
        ms.RelationshipUpsert(
            source=ref("Person", "b"), type="WORKS_ON", target=ref("Project", "p")
        ),
        ms.RelationshipUpsert(
            source=ref("Project", "p"), type="PART_OF", target=ref("Organization", "o")
        ),
        ms.RelationshipUpsert(
            source=ref("Organization", "o"), type="LOCATED_IN", target=ref("Place", "x")
        ),
    )
    for depth, expected in [(1, ["b"]), (2, ["b", "p"]), (3, ["b", "p", "o"])]:
        reply = await memory_server.entities.GetNeighborhood(
            ms.GetNeighborhoodRequest(entity=ref("Person", "a"), depth=depth, limit=10),
            metadata=memory_server.as_user(),
        )
        assert [n.entity.entity_id for n in reply.neighbors] == expected
        assert [n.distance for n in reply.neighbors] == list(range(1, depth + 1))
        assert len(reply.relationships) == depth
    outgoing_only = await memory_server.entities.GetNeighborhood(
        ms.GetNeighborhoodRequest(
            entity=ref("Project", "p"),
            depth=1,
            limit=10,
            direction=entity_pb2.RELATIONSHIP_DIRECTION_OUTGOING,
        ),
        metadata=memory_server.as_user(),
    )
    assert [n.entity.entity_id for n in outgoing_only.neighbors] == ["o"]
    limited = await memory_server.entities.GetNeighborhood(
        ms.GetNeighborhoodRequest(entity=ref("Person", "a"), depth=3, limit=1),
        metadata=memory_server.as_user(),
    )
    assert limited.truncated
    assert len(limited.neighbors) == 1


async def test_exclusive_relationship_supersedes_the_previous_one(
    memory_server: MemoryServer,
) -> None:
    first = await relate(
        memory_server,
        ms.RelationshipUpsert(
            source=ref("Person", "a"),
            type="WORKS_AT",
            target=ref("Organization", "acme"),
            exclusive=True,
        ),
    )
    second = await relate(
        memory_server,
        ms.RelationshipUpsert(
            source=ref("Person", "a"),
            type="WORKS_AT",
            target=ref("Organization", "globex"),
            exclusive=True,
        ),
    )
    [ended] = second.results[0].superseded_relationships
    assert ended.relationship_id == first.results[0].relationship.relationship_id
    assert ended.superseded_by_relationship_id == second.results[0].relationship.relationship_id
    reply = await memory_server.entities.GetNeighborhood(
        ms.GetNeighborhoodRequest(entity=ref("Person", "a"), depth=1, limit=10),
        metadata=memory_server.as_user(),
    )
    assert [n.entity.entity_id for n in reply.neighbors] == ["globex"]


@pytest.mark.parametrize("depth", [0, 4, -1])
async def test_bad_depth(memory_server: MemoryServer, depth: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await memory_server.entities.GetNeighborhood(
            ms.GetNeighborhoodRequest(entity=ref("Person", "a"), depth=depth, limit=10),
            metadata=memory_server.as_user(),
        )
    details = error_details(failure.value)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "DEPTH_OUT_OF_RANGE"
    assert [v.field for v in details.field_violations] == ["depth"]


async def test_unknown_entity_type(memory_server: MemoryServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await upsert(
            memory_server,
            ms.EntityUpsert(entity=ref("Person", "ok")),
            ms.EntityUpsert(entity=ref("Starship", "enterprise")),
        )
    details = error_details(failure.value)
    assert details.reason == "ENTITY_TYPE_UNKNOWN"
    assert [v.field for v in details.field_violations] == ["entities[1].entity.type"]
    assert "Person" in details.metadata["allowedTypes"].split(",")


async def test_missing_entity_fails_the_batch(memory_server: MemoryServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await memory_server.entities.UpsertRelationships(
            ms.UpsertRelationshipsRequest(
                request_id=str(uuid.uuid4()),
                relationships=[
                    ms.RelationshipUpsert(
                        source=ref("Person", "ghost"), type="KNOWS", target=ref("Person", "b")
                    )
                ],
            ),
            metadata=memory_server.as_user(),
        )
    assert error_details(failure.value).reason == "ENTITY_NOT_FOUND"


async def test_search_and_delete(memory_server: MemoryServer) -> None:
    await upsert(
        memory_server,
        ms.EntityUpsert(entity=ref("Person", "p1"), name="Alice Smith"),
        ms.EntityUpsert(entity=ref("Person", "p2"), name="alan turing"),
        ms.EntityUpsert(entity=ref("Project", "p3"), name="Albatross"),
    )
    found = await memory_server.entities.SearchEntities(
        ms.SearchEntitiesRequest(types=["Person"], name_prefix="al"),
        metadata=memory_server.as_user(),
    )
    assert [e.name for e in found.entities] == ["Alice Smith", "alan turing"]
    deleted = await memory_server.entities.DeleteEntity(
        ms.DeleteEntityRequest(entity=ref("Person", "p1")), metadata=memory_server.as_user()
    )
    assert deleted.entity.HasField("valid_to")
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await memory_server.entities.GetEntity(
            ms.GetEntityRequest(entity=ref("Person", "p1")), metadata=memory_server.as_user()
        )
    assert error_details(gone.value).reason == "ENTITY_NOT_FOUND"
    types = await memory_server.entities.GetEntitySchema(
        ms.GetEntitySchemaRequest(), metadata=memory_server.as_user()
    )
    assert "Person" in [t.name for t in types.entity_types]
