"""Unit tests of the memory domain and the one place that partitions graph queries."""

from __future__ import annotations

import pytest

from foredeck_memory.adapters import neo4j_graph
from foredeck_memory.adapters.vector_filters import conditions
from foredeck_memory.config import MemorySettings, parse_named_list
from foredeck_memory.domain import errors, validation
from foredeck_memory.domain.models import OPEN_END, Scope, VectorFilter, dedup_key, valid_at


def test_every_graph_statement_is_partitioned_by_tenant() -> None:
    statements = [
        value
        for name, value in vars(neo4j_graph).items()
        if name.startswith("Q_") and isinstance(value, str)
    ]
    statements += list(neo4j_graph.Q_REACH.values())
    assert len(statements) > 25
    for statement in statements:
        assert neo4j_graph.check_partitioned(statement) == statement


@pytest.mark.parametrize(
    "query",
    [
        "MATCH (e:FdEntity) RETURN e",
        "MATCH (e:FdEntity {ekey: $ekey}) RETURN e",
        "MATCH (a:FdEntity {tenant_id: $tenant})-[r:FD_REL]->(b) RETURN b",
        "MATCH (a:FdEntity {tenant_id: $tenant})-[rs:FD_REL*1..3]-(b:FdEntity {tenant_id: $tenant})"
        " RETURN b",
    ],
)
def test_unpartitioned_statements_are_refused(query: str) -> None:
    with pytest.raises(ValueError, match=r"tenant|unpartitioned"):
        neo4j_graph.check_partitioned(query)


def test_dedup_key_normalises_case_space_and_unicode() -> None:
    assert dedup_key("fact", "Café  au LAIT ") == dedup_key("fact", "cafe\u0301 au lait")
    assert dedup_key("fact", "tea") != dedup_key("preference", "tea")


def test_vector_conditions_always_start_with_the_partition() -> None:
    conds = conditions(Scope("t", "u"), VectorFilter(equals={"category": "fact"}))
    assert [(c.key, c.value) for c in conds[:2]] == [("tenant_id", "t"), ("user_id", "u")]
    with pytest.raises(ValueError, match="partition"):
        conditions(Scope("t", "u"), VectorFilter(any_of={"user_id": ["someone"]}))
    with pytest.raises(ValueError, match="tenant"):
        conditions(None, VectorFilter())


def test_valid_at_selects_half_open_intervals() -> None:
    (_, _, before), (_, after, _) = valid_at(100)
    assert before == 101
    assert after == 101
    assert OPEN_END > 2**61


def test_content_checks() -> None:
    with pytest.raises(errors.Fault) as empty:
        validation.check_content("content", " \n", 10)
    assert empty.value.reason == "CONTENT_EMPTY"
    with pytest.raises(errors.Fault) as large:
        validation.check_content("content", "ééé", 5)
    assert large.value.reason == "CONTENT_TOO_LARGE"
    assert large.value.metadata["actualBytes"] == "6"


def test_type_catalogue_from_settings() -> None:
    settings = MemorySettings()
    types = validation.TypeCatalogue(
        parse_named_list(settings.entity_types), parse_named_list("WORKS_ON:works on")
    )
    with pytest.raises(errors.Fault) as unknown:
        types.check_entity_types([("entities[0].entity.type", "Dragon")])
    assert unknown.value.reason == "ENTITY_TYPE_UNKNOWN"
    with pytest.raises(errors.Fault) as rel:
        types.check_relationship_types([("relationships[0].type", "KNOWS")])
    assert rel.value.reason == "RELATIONSHIP_TYPE_INVALID"
    types.check_relationship_types([("relationships[0].type", "WORKS_ON")])


def test_quota_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = MemorySettings()
    assert (defaults.max_memories_per_tenant, defaults.max_memories_per_user) == (
        1_000_000,
        100_000,
    )
    monkeypatch.setenv("FOREDECK_MEMORY_MAX_MEMORIES_PER_TENANT", "0")
    monkeypatch.setenv("FOREDECK_MEMORY_MAX_MEMORIES_PER_USER", "25")
    settings = MemorySettings()
    assert (settings.max_memories_per_tenant, settings.max_memories_per_user) == (0, 25)


def test_quota_fault_names_its_subject() -> None:
    fault = errors.memory_quota_exceeded("user", "u-1", 10, 9, 2)
    assert (fault.kind, fault.reason) == (errors.FaultKind.EXHAUSTED, "MEMORY_QUOTA_EXCEEDED")
    assert fault.metadata == {"quota": "memories", "limit": "10", "subject": "user"}
    assert [subject for subject, _ in fault.quota_violations] == ["user:u-1"]
