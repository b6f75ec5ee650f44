"""Long-term memory over gRPC on real Redis, ArcadeDB over Bolt, Qdrant Edge and ONNX MiniLM."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from foredeck.common.v1 import memory_pb2 as common_memory_pb2
from foredeck.memory.v1 import memory_pb2
from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck_kit.errors import error_details
from foredeck_memory.testing import MemoryServer

FACTS = [
    "Alice's favourite programming language is Rust.",
    "The quarterly sales meeting moved to Thursday afternoon.",
    "Bob is allergic to peanuts and shellfish.",
    "The production database runs PostgreSQL 16 on three replicas.",
    "Carol prefers window seats on long flights.",
    "Our office cat is called Biscuit and sleeps on the printer.",
]


async def remember(server: MemoryServer, content: str, **kwargs: object) -> ms.RememberResponse:
    kwargs.setdefault("request_id", str(uuid.uuid4()))
    reply: ms.RememberResponse = await server.long_term.Remember(
        ms.RememberRequest(content=content, **kwargs),  # type: ignore[arg-type]
        metadata=server.as_user(),
    )
    return reply


async def test_recall_ranks_the_relevant_memory_first(memory_server: MemoryServer) -> None:
    for fact in FACTS:
        reply = await remember(memory_server, fact)
        assert reply.outcome == memory_pb2.REMEMBER_OUTCOME_CREATED
    queries = {
        "What food can Bob not eat?": FACTS[2],
        "Which SQL engine backs production?": FACTS[3],
        "What is the name of the pet at work?": FACTS[5],
        "Which coding language does Alice like best?": FACTS[0],
    }
    for query, expected in queries.items():
        found = await memory_server.long_term.Recall(
            ms.RecallRequest(query=query, limit=3), metadata=memory_server.as_user()
        )
        assert found.memories[0].memory.content == expected, query
        scores = [m.score for m in found.memories]
        assert scores == sorted(scores, reverse=True)
        assert found.memories[0].memory.provenance.tenant_id == "tenant-a"


async def test_exact_and_near_duplicates_merge(memory_server: MemoryServer) -> None:
    first = await remember(memory_server, "Dana lives in Lisbon.", metadata=None)
    again = await remember(memory_server, "  dana LIVES in lisbon. ")
    assert again.outcome == memory_pb2.REMEMBER_OUTCOME_MERGED_EXACT_DUPLICATE
    assert again.memory.memory_id == first.memory.memory_id
    assert again.memory.merge_count == 1
    near = await remember(memory_server, "Dana lives in Lisbon!", near_duplicate_threshold=0.9)
    assert near.outcome == memory_pb2.REMEMBER_OUTCOME_MERGED_NEAR_DUPLICATE
    assert near.similarity >= 0.9
    separate = await remember(
        memory_server, "Dana lives in Lisbon.", dedup_policy=memory_pb2.DEDUP_POLICY_NONE
    )
    assert separate.outcome == memory_pb2.REMEMBER_OUTCOME_CREATED
    assert separate.memory.memory_id != first.memory.memory_id


async def test_fact_key_supersedes_and_keeps_history(memory_server: MemoryServer) -> None:
    old = await remember(memory_server, "Erin's home city is Oslo.", fact_key="erin.home_city")
    new = await remember(memory_server, "Erin's home city is Bergen.", fact_key="erin.home_city")
    assert new.outcome == memory_pb2.REMEMBER_OUTCOME_SUPERSEDED
    assert new.superseded_memory.memory_id == old.memory.memory_id
    assert new.superseded_memory.valid_to == new.memory.valid_from
    assert new.memory.supersedes_memory_id == old.memory.memory_id
    history = await memory_server.long_term.GetMemoryHistory(
        ms.GetMemoryHistoryRequest(memory_id=new.memory.memory_id),
        metadata=memory_server.as_user(),
    )
    assert [m.content for m in history.memories] == [
        "Erin's home city is Oslo.",
        "Erin's home city is Bergen.",
    ]
    assert history.memories[0].state == common_memory_pb2.MEMORY_STATE_SUPERSEDED
    now = await memory_server.long_term.Recall(
        ms.RecallRequest(query="Where does Erin live?", limit=5), metadata=memory_server.as_user()
    )
    assert [m.memory.content for m in now.memories] == ["Erin's home city is Bergen."]
    before = memory_pb2.MemoryFilter()
    before.as_of.CopyFrom(old.memory.create_time)
    then = await memory_server.long_term.Recall(
        ms.RecallRequest(query="Where does Erin live?", limit=5, filter=before),
        metadata=memory_server.as_user(),
    )
    assert [m.memory.content for m in then.memories] == ["Erin's home city is Oslo."]

    updated = await memory_server.long_term.UpdateMemory(
        ms.UpdateMemoryRequest(
            request_id=str(uuid.uuid4()),
            memory_id=new.memory.memory_id,
            content="Erin's home city is Trondheim.",
            update_mask=field_mask_pb2.FieldMask(paths=["content"]),
        ),
        metadata=memory_server.as_user(),
    )
    assert updated.superseded_memory.memory_id == new.memory.memory_id
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await memory_server.long_term.UpdateMemory(
            ms.UpdateMemoryRequest(
                request_id=str(uuid.uuid4()),
                memory_id=new.memory.memory_id,
                content="Erin's home city is Tromsø.",
                update_mask=field_mask_pb2.FieldMask(paths=["content"]),
            ),
            metadata=memory_server.as_user(),
        )
    assert error_details(stale.value).reason == "MEMORY_SUPERSEDED"


async def test_remember_is_idempotent_by_request_id(memory_server: MemoryServer) -> None:
    first = await remember(memory_server, "Frank drinks oat milk.", request_id="req-1")
    again = await remember(memory_server, "Frank drinks oat milk.", request_id="req-1")
    assert again.replayed
    assert again.memory.memory_id == first.memory.memory_id
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await remember(memory_server, "Frank drinks soy milk.", request_id="req-1")
    assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(reused.value).reason == "REQUEST_ID_REUSED"


@pytest.mark.parametrize(
    ("request_", "reason", "field"),
    [
        (
            ms.RememberRequest(request_id=str(uuid.uuid4()), content="   "),
            "CONTENT_EMPTY",
            "content",
        ),
        (
            ms.RememberRequest(request_id=str(uuid.uuid4()), content="x" * (32 * 1024 + 1)),
            "CONTENT_TOO_LARGE",
            "content",
        ),
        (
            ms.RememberRequest(
                request_id=str(uuid.uuid4()),
                content="ok",
                entity_refs=[common_memory_pb2.EntityRef(type="Spaceship", entity_id="x")],
            ),
            "ENTITY_TYPE_UNKNOWN",
            "entity_refs[0].type",
        ),
        (
            ms.RememberRequest(request_id=str(uuid.uuid4()), content="ok", category="Bad Category"),
            "INVALID_REQUEST",
            "category",
        ),
    ],
)
async def test_remember_rejects_bad_input(
    memory_server: MemoryServer, request_: ms.RememberRequest, reason: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await memory_server.long_term.Remember(request_, metadata=memory_server.as_user())
    details = error_details(failure.value)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == reason
    assert details.domain == "memory.foredeck.dev"
    assert [v.field for v in details.field_violations] == [field]


@pytest.mark.parametrize("limit", [0, 101, -1])
async def test_recall_rejects_bad_limit(memory_server: MemoryServer, limit: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await memory_server.long_term.Recall(
            ms.RecallRequest(query="anything", limit=limit), metadata=memory_server.as_user()
        )
    details = error_details(failure.value)
    assert details.reason == "LIMIT_OUT_OF_RANGE"
    assert [v.field for v in details.field_violations] == ["limit"]


async def test_recall_needs_read_permission(memory_server: MemoryServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await memory_server.long_term.Recall(
            ms.RecallRequest(query="anything", limit=1),
            metadata=memory_server.as_user(permissions=["memory:write"]),
        )
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_remember_many_embeds_a_batch_and_dedups_inside_it(
    memory_server: MemoryServer,
) -> None:
    reply = await memory_server.long_term.RememberMany(
        ms.RememberManyRequest(
            request_id="batch-1",
            items=[
                ms.RememberItem(content="Ivan plays the cello."),
                ms.RememberItem(content="ivan plays the CELLO."),
                ms.RememberItem(content="Ivan's team is Platform.", fact_key="ivan.team"),
                ms.RememberItem(content="Ivan's team is Search.", fact_key="ivan.team"),
            ],
        ),
        metadata=memory_server.as_user(),
    )
    outcomes = [r.outcome for r in reply.results]
    assert outcomes == [
        memory_pb2.REMEMBER_OUTCOME_CREATED,
        memory_pb2.REMEMBER_OUTCOME_MERGED_EXACT_DUPLICATE,
        memory_pb2.REMEMBER_OUTCOME_CREATED,
        memory_pb2.REMEMBER_OUTCOME_SUPERSEDED,
    ]
    assert reply.results[1].memory.memory_id == reply.results[0].memory.memory_id
    assert reply.results[3].superseded_memory.memory_id == reply.results[2].memory.memory_id
    listed = await memory_server.long_term.ListMemories(
        ms.ListMemoriesRequest(), metadata=memory_server.as_user()
    )
    assert sorted(m.content for m in listed.memories) == [
        "Ivan plays the cello.",
        "Ivan's team is Search.",
    ]


async def test_remember_many_rejects_a_bad_item_before_writing(
    memory_server: MemoryServer,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await memory_server.long_term.RememberMany(
            ms.RememberManyRequest(
                request_id="batch-2",
                items=[ms.RememberItem(content="fine"), ms.RememberItem(content=" ")],
            ),
            metadata=memory_server.as_user(),
        )
    details = error_details(failure.value)
    assert details.reason == "CONTENT_EMPTY"
    assert [v.field for v in details.field_violations] == ["items[1].content"]
    listed = await memory_server.long_term.ListMemories(
        ms.ListMemoriesRequest(), metadata=memory_server.as_user()
    )
    assert list(listed.memories) == []


async def test_update_with_a_stale_etag_is_aborted(memory_server: MemoryServer) -> None:
    first = await remember(memory_server, "Judy's desk is on floor 3.")
    merged = await remember(memory_server, "judy's desk is on floor 3.", metadata=None)
    assert merged.memory.etag != first.memory.etag
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await memory_server.long_term.UpdateMemory(
            ms.UpdateMemoryRequest(
                request_id=str(uuid.uuid4()),
                memory_id=first.memory.memory_id,
                content="Judy's desk is on floor 4.",
                etag=first.memory.etag,
            ),
            metadata=memory_server.as_user(),
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert error_details(stale.value).reason == "ETAG_MISMATCH"
    updated = await memory_server.long_term.UpdateMemory(
        ms.UpdateMemoryRequest(
            request_id=str(uuid.uuid4()),
            memory_id=first.memory.memory_id,
            content="Judy's desk is on floor 4.",
            etag=merged.memory.etag,
        ),
        metadata=memory_server.as_user(),
    )
    assert updated.memory.content == "Judy's desk is on floor 4."
    assert updated.memory.supersedes_memory_id == first.memory.memory_id


async def test_a_run_acts_only_for_itself(memory_server: MemoryServer) -> None:
    as_run = memory_server.as_run("run-7")
    stored = await memory_server.long_term.Remember(
        ms.RememberRequest(request_id=str(uuid.uuid4()), content="Kim prefers tea."),
        metadata=as_run,
    )
    assert stored.memory.provenance.run_id == "run-7"
    with pytest.raises(grpc.aio.AioRpcError) as other_run:
        await memory_server.long_term.Remember(
            ms.RememberRequest(
                request_id=str(uuid.uuid4()), content="Kim prefers coffee.", run_id="run-8"
            ),
            metadata=as_run,
        )
    assert other_run.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(other_run.value).reason == "DELEGATION_NOT_ALLOWED"
    with pytest.raises(grpc.aio.AioRpcError) as forget:
        await memory_server.long_term.ForgetUser(ms.ForgetUserRequest(), metadata=as_run)
    assert error_details(forget.value).reason == "DELEGATION_NOT_ALLOWED"


async def test_delete_retires_or_purges(memory_server: MemoryServer) -> None:
    first = await remember(memory_server, "Olga's locker is number 12.", fact_key="olga.locker")
    second = await remember(memory_server, "Olga's locker is number 14.", fact_key="olga.locker")
    retired = await memory_server.long_term.DeleteMemory(
        ms.DeleteMemoryRequest(memory_id=first.memory.memory_id),
        metadata=memory_server.as_user(),
    )
    assert retired.memory.memory_id == second.memory.memory_id
    assert retired.memory.state == common_memory_pb2.MEMORY_STATE_RETIRED
    history = await memory_server.long_term.GetMemoryHistory(
        ms.GetMemoryHistoryRequest(memory_id=first.memory.memory_id),
        metadata=memory_server.as_user(),
    )
    assert len(history.memories) == 2
    purged = await memory_server.long_term.DeleteMemory(
        ms.DeleteMemoryRequest(memory_id=second.memory.memory_id, purge=True),
        metadata=memory_server.as_user(),
    )
    assert purged.purged_version_count == 2
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await memory_server.long_term.GetMemory(
            ms.GetMemoryRequest(memory_id=first.memory.memory_id),
            metadata=memory_server.as_user(),
        )
    assert error_details(gone.value).reason == "MEMORY_NOT_FOUND"
    again = await memory_server.long_term.DeleteMemory(
        ms.DeleteMemoryRequest(memory_id=second.memory.memory_id, purge=True, allow_missing=True),
        metadata=memory_server.as_user(),
    )
    assert not again.HasField("memory")
