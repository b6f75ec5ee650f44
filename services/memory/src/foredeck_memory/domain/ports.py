"""Ports the use cases depend on; adapters implement them (typing.Protocol, no base classes).

Every vector call takes the :class:`Scope`: the adapter adds the tenant (and user) conditions
itself, so no caller can leave them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from foredeck_memory.domain.models import (
    EntityVersion,
    MemoryRecord,
    RelationshipVersion,
    Scope,
    ScoredMemory,
    VectorFilter,
)


class Embedder(Protocol):
    """Turns texts into unit vectors, batched."""

    @property
    def model_id(self) -> str: ...

    @property
    def dimensions(self) -> int: ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class VectorStore(Protocol):
    """The long-term memory vectors, partitioned by tenant and user."""

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def upsert(self, scope: Scope, items: Sequence[tuple[MemoryRecord, list[float]]]) -> None:
        """Insert or replace the given versions with their vectors."""

    async def set_payload(self, scope: Scope, record: MemoryRecord) -> None:
        """Replace the stored payload of an existing version (vector unchanged)."""

    async def search(
        self,
        scope: Scope,
        vector: list[float],
        limit: int,
        where: VectorFilter,
        min_score: float | None,
    ) -> list[ScoredMemory]:
        """The versions nearest to ``vector`` that pass ``where``, best first."""

    async def search_many(
        self,
        scope: Scope,
        queries: Sequence[tuple[list[float], VectorFilter]],
        limit: int,
        min_score: float | None,
    ) -> list[list[ScoredMemory]]:
        """Several searches planned as one batch; one result list per query, in order."""

    async def scroll(self, scope: Scope, where: VectorFilter, limit: int) -> list[MemoryRecord]:
        """Up to ``limit`` versions passing ``where``, in no particular order."""

    async def delete(self, scope: Scope, memory_ids: Sequence[str]) -> None:
        """Remove the given versions (missing ones are ignored)."""

    async def delete_user(self, scope: Scope) -> int:
        """Remove every version of the scope's user; return how many there were."""

    async def count_tenant(self, tenant_id: str) -> int:
        """How many versions the tenant holds (for the per-tenant gauge)."""

    async def count_user(self, scope: Scope) -> int:
        """How many versions the scope's user holds (to start the user's quota count)."""


@dataclass(frozen=True)
class NeighbourhoodResult:
    """Entities within N hops of a centre, with their distances and the edges used."""

    centre: EntityVersion
    neighbours: list[tuple[EntityVersion, int]]
    relationships: list[RelationshipVersion]
    truncated: bool


RelationshipUpserts = tuple[
    list[tuple[RelationshipVersion, str, list[RelationshipVersion]]], list[EntityVersion]
]
"""Per relationship (current version, outcome, versions superseded), and entities created."""


class GraphStore(Protocol):
    """The tenant-partitioned entity graph and the memory nodes linked into it."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def missing_entities(self, tenant_id: str, keys: Sequence[str]) -> list[str]:
        """Those of ``keys`` (``Type:id``) that have no current entity in the tenant."""

    async def put_memories(self, records: Sequence[MemoryRecord]) -> None:
        """Create or update memory nodes and their links to entities, in one transaction."""

    async def delete_memories(self, tenant_id: str, memory_ids: Sequence[str]) -> int:
        """Remove memory nodes; return how many existed."""

    async def delete_user(
        self, tenant_id: str, user_id: str, subject_keys: Sequence[str]
    ) -> tuple[int, int, int]:
        """Remove a user's memories, facts and subject entities: (memories, entities, rels)."""

    async def upsert_entities(
        self, tenant_id: str, items: Sequence[dict[str, Any]], at: int
    ) -> list[tuple[EntityVersion, str]]:
        """Write a batch of entity upserts in one transaction; (current version, outcome)."""

    async def upsert_relationships(
        self, tenant_id: str, items: Sequence[dict[str, Any]], at: int, create_missing: bool
    ) -> tuple[
        list[tuple[RelationshipVersion, str, list[RelationshipVersion]]], list[EntityVersion]
    ]:
        """Write a batch of relationship upserts in one transaction."""

    async def get_entity(
        self, tenant_id: str, entity_type: str, entity_id: str, at: int
    ) -> EntityVersion | None: ...

    async def neighbourhood(
        self,
        tenant_id: str,
        entity_type: str,
        entity_id: str,
        depth: int,
        rel_types: Sequence[str],
        direction: str,
        limit: int,
        at: int,
    ) -> NeighbourhoodResult | None: ...

    async def search_entities(
        self, tenant_id: str, types: Sequence[str], prefix: str, offset: int, limit: int, at: int
    ) -> list[EntityVersion]: ...

    async def delete_entity(
        self, tenant_id: str, entity_type: str, entity_id: str, purge: bool, at: int
    ) -> tuple[EntityVersion, int] | None: ...


class Outbox(Protocol):
    """Intent records of two-store writes, so a write cut short is rolled back later."""

    async def begin(self, entry: dict[str, Any]) -> str:
        """Record an intent before the first store is written; return its token."""

    async def done(self, token: str) -> None:
        """Forget an intent once both stores hold the write (or it was rolled back)."""

    async def stale(self, older_than_seconds: float) -> list[tuple[str, dict[str, Any]]]:
        """Intents older than the given age: writes that neither finished nor rolled back."""


class Locks(Protocol):
    """Mutual exclusion across replicas, for writes that must be serialised."""

    def hold(self, key: str) -> Any:
        """An async context manager holding the lock named ``key``."""


class Quotas(Protocol):
    """Counts of stored memory versions per tenant and user, with their caps, across replicas."""

    async def reserve(self, scope: Scope, count: int) -> None:
        """Take room for ``count`` new versions, or raise MEMORY_QUOTA_EXCEEDED taking none."""

    async def release(self, scope: Scope, count: int) -> None:
        """Give back room: versions not written after all, or deleted."""
