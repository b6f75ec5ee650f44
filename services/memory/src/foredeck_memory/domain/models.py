"""Domain records of the memory service and the time helpers they share.

Times are integer microseconds since the epoch (exact, comparable in every store). An open-ended
validity is stored as :data:`OPEN_END` so that "valid at t" is one range condition everywhere.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

OPEN_END = 2**62
"""The ``valid_to`` of an open-ended fact: later than any real instant."""


def now_us() -> int:
    """The current time in integer microseconds since the epoch."""
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Scope:
    """Who a call acts for: tenant and user, taken only from the verified principal."""

    tenant_id: str
    user_id: str


@dataclass(frozen=True)
class Provenance:
    """Which tenant, user, run and step wrote a fact."""

    tenant_id: str
    user_id: str
    run_id: str = ""
    step_id: str = ""


_SPACE = re.compile(r"\s+")


def normalise(content: str) -> str:
    """NFC, case-folded, whitespace collapsed: the text the duplicate key is taken over."""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", content).casefold()).strip()


def dedup_key(category: str, content: str) -> str:
    """The deterministic duplicate key: SHA-256 of the category and the normalised content."""
    digest = hashlib.sha256()
    digest.update(category.encode())
    digest.update(b"\x00")
    digest.update(normalise(content).encode())
    return digest.hexdigest()


class MemoryState:
    """Where a version stands, the same names as ``foredeck.memory.v1.MemoryState``."""

    CURRENT = "CURRENT"
    SUPERSEDED = "SUPERSEDED"
    RETIRED = "RETIRED"
    EXPIRED = "EXPIRED"
    PENDING = "PENDING"


@dataclass(frozen=True)
class MemoryRecord:
    """One version of a long-term memory as both stores hold it."""

    memory_id: str
    chain_id: str
    content: str
    category: str
    metadata: dict[str, Any]
    provenance: Provenance
    valid_from: int
    valid_to: int
    dedup_key: str
    embedding_model: str
    create_time: int
    update_time: int
    fact_key: str = ""
    entity_refs: tuple[str, ...] = ()
    supersedes: str = ""
    superseded_by: str = ""
    merge_count: int = 0
    retired: bool = False

    def state(self, at: int) -> str:
        """The version's state at ``at``."""
        if self.superseded_by:
            return MemoryState.SUPERSEDED
        if self.retired:
            return MemoryState.RETIRED
        if self.valid_from > at:
            return MemoryState.PENDING
        if self.valid_to <= at:
            return MemoryState.EXPIRED
        return MemoryState.CURRENT

    @property
    def etag(self) -> str:
        """Changes whenever the version changes in place (a merge, the end of its validity)."""
        digest = hashlib.sha256(
            f"{self.memory_id}:{self.update_time}:{self.valid_to}:{self.merge_count}:"
            f"{self.superseded_by}:{int(self.retired)}".encode()
        )
        return digest.hexdigest()[:20]

    def to_payload(self) -> dict[str, Any]:
        """The vector store payload; ``tenant_id`` and ``user_id`` are the partition keys."""
        return {
            "tenant_id": self.provenance.tenant_id,
            "user_id": self.provenance.user_id,
            "run_id": self.provenance.run_id,
            "step_id": self.provenance.step_id,
            "memory_id": self.memory_id,
            "chain_id": self.chain_id,
            "content": self.content,
            "category": self.category,
            "metadata": self.metadata,
            "valid_from": self.valid_from,
            "valid_to": self.valid_to,
            "dedup_key": self.dedup_key,
            "fact_key": self.fact_key,
            "entity_refs": list(self.entity_refs),
            "supersedes": self.supersedes,
            "superseded_by": self.superseded_by,
            "merge_count": self.merge_count,
            "retired": self.retired,
            "embedding_model": self.embedding_model,
            "create_time": self.create_time,
            "update_time": self.update_time,
        }

    @staticmethod
    def from_payload(payload: dict[str, Any]) -> MemoryRecord:
        """Rebuild a record from its vector store payload."""
        return MemoryRecord(
            memory_id=str(payload["memory_id"]),
            chain_id=str(payload.get("chain_id") or payload["memory_id"]),
            content=str(payload["content"]),
            category=str(payload["category"]),
            metadata=dict(payload.get("metadata") or {}),
            provenance=Provenance(
                tenant_id=str(payload["tenant_id"]),
                user_id=str(payload["user_id"]),
                run_id=str(payload.get("run_id", "")),
                step_id=str(payload.get("step_id", "")),
            ),
            valid_from=int(payload["valid_from"]),
            valid_to=int(payload["valid_to"]),
            dedup_key=str(payload["dedup_key"]),
            embedding_model=str(payload.get("embedding_model", "")),
            create_time=int(payload["create_time"]),
            update_time=int(payload["update_time"]),
            fact_key=str(payload.get("fact_key", "")),
            entity_refs=tuple(str(r) for r in payload.get("entity_refs") or ()),
            supersedes=str(payload.get("supersedes", "")),
            superseded_by=str(payload.get("superseded_by", "")),
            merge_count=int(payload.get("merge_count", 0)),
            retired=bool(payload.get("retired", False)),
        )

    def evolve(self, **changes: Any) -> MemoryRecord:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


def entity_key(entity_type: str, entity_id: str) -> str:
    """The ``Type:id`` text form of an entity reference, as stored in memory payloads."""
    return f"{entity_type}:{entity_id}"


def split_entity_key(key: str) -> tuple[str, str]:
    """The inverse of :func:`entity_key`."""
    entity_type, _, entity_id = key.partition(":")
    return entity_type, entity_id


@dataclass(frozen=True)
class ScoredMemory:
    """A recalled memory with its cosine similarity to the query."""

    record: MemoryRecord
    score: float


@dataclass(frozen=True)
class VectorFilter:
    """Conditions on payload fields beyond the tenant and user, which adapters always add.

    ``equals`` holds exact matches (``metadata.key`` paths allowed), ``any_of`` list
    membership, ``ranges`` (field, gte, lt) integer ranges with ``None`` for an open side.
    """

    equals: dict[str, str | int | bool | float] = field(default_factory=dict)
    any_of: dict[str, list[str]] = field(default_factory=dict)
    ranges: list[tuple[str, int | None, int | None]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


def valid_at(at: int) -> list[tuple[str, int | None, int | None]]:
    """Range conditions selecting versions whose validity holds at ``at``."""
    return [("valid_from", None, at + 1), ("valid_to", at + 1, None)]


@dataclass(frozen=True)
class EntityVersion:
    """One version of an entity of the tenant's graph."""

    entity_type: str
    entity_id: str
    name: str
    properties: dict[str, Any]
    provenance: Provenance
    valid_from: int
    valid_to: int
    version: int
    create_time: int
    update_time: int


@dataclass(frozen=True)
class RelationshipVersion:
    """One version of a typed, directed relationship between two entities."""

    relationship_id: str
    source: tuple[str, str]
    rel_type: str
    target: tuple[str, str]
    properties: dict[str, Any]
    provenance: Provenance
    valid_from: int
    valid_to: int
    version: int
    superseded_by: str
    create_time: int
    update_time: int
