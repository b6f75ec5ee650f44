"""The entity graph and memory nodes over Bolt: Neo4j 5 in production, ArcadeDB locally.

Tenant partitioning is enforced here and only here: every node and relationship carries
``tenant_id``, every Cypher statement is a constant of this module whose labelled patterns all
match ``tenant_id: $tenant``, and :func:`_run` refuses a statement that does not (checked once
per statement text) and always binds ``$tenant`` from the caller's verified principal. Writes
go through managed transactions only, with parameters, never string-built Cypher.

Model: ``(:FdEntity {tenant_id, ekey, etype, entity_id})`` is an entity's identity;
``(:FdEntityVersion {tenant_id, ekey, version, current, ...})`` its versions;
``(:FdEntity)-[:FD_REL {tenant_id, rel_id, rtype, version, current, ...}]->(:FdEntity)`` the
relationship versions; ``(:FdMemory {tenant_id, user_id, memory_id, ...})-[:FD_ABOUT]->
(:FdEntity)`` the long-term memories' nodes. Times are integer microseconds.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from neo4j import AsyncDriver, AsyncManagedTransaction
from neo4j.exceptions import DriverError, Neo4jError, ServiceUnavailable, SessionExpired

from foredeck_kit.logs import get_logger
from foredeck_memory.domain import errors
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.models import (
    OPEN_END,
    EntityVersion,
    MemoryRecord,
    Provenance,
    RelationshipVersion,
    entity_key,
    split_entity_key,
)
from foredeck_memory.domain.ports import NeighbourhoodResult

_VARIABLE_LENGTH = re.compile(r":\s*FD_\w+\s*\*")
_LABELLED = re.compile(r"[(\[]\s*\w*\s*:\s*(Fd\w+|FD_\w+)\b(?!\*)\s*(\{[^})\]]*\})?")


@functools.lru_cache(maxsize=256)
def check_partitioned(query: str) -> str:
    """Return ``query`` if every labelled pattern in it is bound to ``tenant_id: $tenant``.

    Variable-length relationship patterns must also filter each hop by ``$tenant``.
    """
    for match in _LABELLED.finditer(query):
        props = match.group(2) or ""
        if "tenant_id: $tenant" not in props:
            raise ValueError(f"unpartitioned pattern in graph query: {match.group(0)!r}")
    if _VARIABLE_LENGTH.search(query) and "r.tenant_id = $tenant" not in query:
        raise ValueError("a variable-length pattern must filter every hop by tenant")
    return query


async def _run(
    tx: AsyncManagedTransaction, query: str, tenant: str, **params: Any
) -> list[dict[str, Any]]:
    result = await tx.run(check_partitioned(query), tenant=tenant, **params)
    return [record.data() async for record in result]


SCHEMA = (
    "CREATE CONSTRAINT fd_entity_key IF NOT EXISTS FOR (e:FdEntity) "
    "REQUIRE (e.tenant_id, e.ekey) IS UNIQUE",
    "CREATE INDEX fd_entity_version IF NOT EXISTS FOR (v:FdEntityVersion) ON (v.tenant_id, v.ekey)",
    "CREATE INDEX fd_entity_version_user IF NOT EXISTS FOR (v:FdEntityVersion) "
    "ON (v.tenant_id, v.user_id)",
    "CREATE CONSTRAINT fd_memory_key IF NOT EXISTS FOR (m:FdMemory) "
    "REQUIRE (m.tenant_id, m.memory_id) IS UNIQUE",
    "CREATE INDEX fd_memory_user IF NOT EXISTS FOR (m:FdMemory) ON (m.tenant_id, m.user_id)",
)

Q_MISSING = """
UNWIND $keys AS key
OPTIONAL MATCH (v:FdEntityVersion {tenant_id: $tenant, ekey: key, current: true})
WITH key, count(v) AS n WHERE n = 0
RETURN key
"""

Q_PUT_MEMORIES = """
UNWIND $rows AS row
MERGE (m:FdMemory {tenant_id: $tenant, memory_id: row.memory_id})
SET m += row.props
"""

Q_UNLINK_MEMORIES = """
MATCH (m:FdMemory {tenant_id: $tenant})-[old:FD_ABOUT {tenant_id: $tenant}]->
  (:FdEntity {tenant_id: $tenant})
WHERE m.memory_id IN $ids
DELETE old
"""

Q_LINK_MEMORIES = """
UNWIND $links AS link
MATCH (m:FdMemory {tenant_id: $tenant, memory_id: link.memory_id})
MATCH (e:FdEntity {tenant_id: $tenant, ekey: link.ekey})
CREATE (m)-[:FD_ABOUT {tenant_id: $tenant}]->(e)
"""

Q_DELETE_MEMORIES = """
MATCH (m:FdMemory {tenant_id: $tenant})
WHERE m.memory_id IN $ids
DETACH DELETE m
RETURN count(*) AS n
"""

Q_COUNT_USER_MEMORIES = """
MATCH (m:FdMemory {tenant_id: $tenant, user_id: $user})
RETURN count(m) AS n
"""

Q_DELETE_USER_MEMORIES = """
MATCH (m:FdMemory {tenant_id: $tenant, user_id: $user})
DETACH DELETE m
"""

Q_USER_ENTITY_VERSIONS = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, user_id: $user})
RETURN v.ekey AS ekey, count(v) AS n
"""

Q_DELETE_USER_ENTITY_VERSIONS = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, user_id: $user})
DELETE v
"""

Q_USER_RELS = """
MATCH (:FdEntity {tenant_id: $tenant})
  -[r:FD_REL {tenant_id: $tenant, user_id: $user}]->
  (:FdEntity {tenant_id: $tenant})
RETURN count(r) AS n
"""

Q_DELETE_USER_RELS = """
MATCH (:FdEntity {tenant_id: $tenant})
  -[r:FD_REL {tenant_id: $tenant, user_id: $user}]->
  (:FdEntity {tenant_id: $tenant})
DELETE r
"""

Q_ENTITY_VERSION_COUNT = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, ekey: $ekey})
RETURN count(v) AS n
"""

Q_ENTITY_RELS_COUNT = """
MATCH (e:FdEntity {tenant_id: $tenant, ekey: $ekey})
  -[r:FD_REL {tenant_id: $tenant}]-
  (:FdEntity {tenant_id: $tenant})
RETURN count(r) AS n
"""

Q_PURGE_ENTITY = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, ekey: $ekey})
DELETE v
WITH count(*) AS ignored
MATCH (e:FdEntity {tenant_id: $tenant, ekey: $ekey})
DETACH DELETE e
"""

Q_CURRENT_ENTITY = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, ekey: $ekey, current: true})
RETURN properties(v) AS v
"""

Q_RETIRE_ENTITY_VERSION = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, ekey: $ekey, current: true})
SET v.current = false, v.valid_to = $valid_to, v.update_time = $at
"""

Q_ENSURE_ENTITY = """
MERGE (e:FdEntity {tenant_id: $tenant, ekey: $ekey})
ON CREATE SET e.etype = $etype, e.entity_id = $entity_id
"""

Q_CREATE_ENTITY_VERSION = """
CREATE (v:FdEntityVersion {tenant_id: $tenant, ekey: $ekey})
SET v += $props
RETURN properties(v) AS v
"""

Q_ENTITY_AT = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, ekey: $ekey})
WHERE v.valid_from <= $at AND v.valid_to > $at
RETURN properties(v) AS v
ORDER BY v.version DESC
LIMIT 1
"""

Q_ENTITIES_AT = """
MATCH (v:FdEntityVersion {tenant_id: $tenant})
WHERE v.ekey IN $ekeys AND v.valid_from <= $at AND v.valid_to > $at
RETURN properties(v) AS v
ORDER BY v.version DESC
"""

Q_CURRENT_REL = """
MATCH (a:FdEntity {tenant_id: $tenant, ekey: $source})
  -[r:FD_REL {tenant_id: $tenant, rtype: $rtype, current: true}]->
  (b:FdEntity {tenant_id: $tenant, ekey: $target})
RETURN properties(r) AS r
"""

Q_CURRENT_RELS_FROM = """
MATCH (a:FdEntity {tenant_id: $tenant, ekey: $source})
  -[r:FD_REL {tenant_id: $tenant, rtype: $rtype, current: true}]->
  (b:FdEntity {tenant_id: $tenant})
RETURN properties(r) AS r, b.ekey AS target
"""

Q_END_REL = """
MATCH (:FdEntity {tenant_id: $tenant})
  -[r:FD_REL {tenant_id: $tenant, rel_id: $rel_id}]->
  (:FdEntity {tenant_id: $tenant})
SET r.current = false, r.valid_to = $valid_to, r.superseded_by = $superseded_by, r.update_time = $at
RETURN properties(r) AS r
"""

Q_CREATE_REL = """
MATCH (a:FdEntity {tenant_id: $tenant, ekey: $source}),
  (b:FdEntity {tenant_id: $tenant, ekey: $target})
CREATE (a)-[r:FD_REL {tenant_id: $tenant}]->(b)
SET r += $props
RETURN properties(r) AS r
"""

Q_RETIRE_RELS_OF = """
MATCH (e:FdEntity {tenant_id: $tenant, ekey: $ekey})
  -[r:FD_REL {tenant_id: $tenant, current: true}]-
  (:FdEntity {tenant_id: $tenant})
SET r.current = false, r.valid_to = $at, r.update_time = $at
RETURN count(r) AS n
"""

Q_SEARCH = """
MATCH (v:FdEntityVersion {tenant_id: $tenant, current: true})
WHERE ($types = [] OR v.etype IN $types) AND toLower(v.name) STARTS WITH $prefix
  AND v.valid_from <= $at AND v.valid_to > $at
RETURN properties(v) AS v
ORDER BY v.name, v.etype, v.entity_id
SKIP $offset
LIMIT $limit
"""

_HOP = (
    "all(r IN rs WHERE r.tenant_id = $tenant AND r.valid_from <= $at AND r.valid_to > $at"
    " AND ($types = [] OR r.rtype IN $types))"
)
_REACH_TEMPLATE = (
    "MATCH (c:FdEntity {tenant_id: $tenant, ekey: $ekey}) "
    "MATCH p = (c)%s(n:FdEntity {tenant_id: $tenant}) "
    "WHERE n.ekey <> $ekey AND " + _HOP + " "
    "RETURN n.ekey AS ekey, min(length(p)) AS d ORDER BY d, ekey LIMIT $limit"
)
_PATTERNS = {
    ("OUTGOING", 1): "-[rs:FD_REL*1..1]->",
    ("OUTGOING", 2): "-[rs:FD_REL*1..2]->",
    ("OUTGOING", 3): "-[rs:FD_REL*1..3]->",
    ("INCOMING", 1): "<-[rs:FD_REL*1..1]-",
    ("INCOMING", 2): "<-[rs:FD_REL*1..2]-",
    ("INCOMING", 3): "<-[rs:FD_REL*1..3]-",
    ("BOTH", 1): "-[rs:FD_REL*1..1]-",
    ("BOTH", 2): "-[rs:FD_REL*1..2]-",
    ("BOTH", 3): "-[rs:FD_REL*1..3]-",
}
# Variable-length bounds cannot be parameters in Cypher, so each (direction, depth) has its own
# fixed statement; nothing from a request is ever spliced into query text.
Q_REACH = {key: _REACH_TEMPLATE % pattern for key, pattern in _PATTERNS.items()}

Q_RELS_AMONG = """
MATCH (a:FdEntity {tenant_id: $tenant})
  -[r:FD_REL {tenant_id: $tenant}]->
  (b:FdEntity {tenant_id: $tenant})
WHERE a.ekey IN $ekeys AND b.ekey IN $ekeys AND r.valid_from <= $at AND r.valid_to > $at
  AND ($types = [] OR r.rtype IN $types)
RETURN properties(r) AS r, a.ekey AS source, b.ekey AS target
"""


def _entity(props: dict[str, Any]) -> EntityVersion:
    return EntityVersion(
        entity_type=str(props["etype"]),
        entity_id=str(props["entity_id"]),
        name=str(props.get("name", "")),
        properties=json.loads(props.get("props") or "{}"),
        provenance=Provenance(
            str(props["tenant_id"]),
            str(props.get("user_id", "")),
            str(props.get("run_id", "")),
            str(props.get("step_id", "")),
        ),
        valid_from=int(props["valid_from"]),
        valid_to=int(props["valid_to"]),
        version=int(props["version"]),
        create_time=int(props.get("create_time", props["valid_from"])),
        update_time=int(props.get("update_time", props["valid_from"])),
    )


def _relationship(props: dict[str, Any], source: str, target: str) -> RelationshipVersion:
    return RelationshipVersion(
        relationship_id=str(props["rel_id"]),
        source=split_entity_key(source),
        rel_type=str(props["rtype"]),
        target=split_entity_key(target),
        properties=json.loads(props.get("props") or "{}"),
        provenance=Provenance(
            str(props["tenant_id"]),
            str(props.get("user_id", "")),
            str(props.get("run_id", "")),
            str(props.get("step_id", "")),
        ),
        valid_from=int(props["valid_from"]),
        valid_to=int(props["valid_to"]),
        version=int(props["version"]),
        superseded_by=str(props.get("superseded_by", "")),
        create_time=int(props.get("create_time", props["valid_from"])),
        update_time=int(props.get("update_time", props["valid_from"])),
    )


def _apply_props(current: dict[str, Any], given: dict[str, Any], mode: str) -> dict[str, Any]:
    if mode == "REPLACE":
        return {k: v for k, v in given.items() if v is not None}
    merged = dict(current)
    for key, value in given.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Neo4jGraphStore:
    """A :class:`~foredeck_memory.domain.ports.GraphStore` over the official neo4j driver."""

    def __init__(self, driver: AsyncDriver, database: str) -> None:
        self._driver = driver
        self._database = database
        self._log = get_logger("foredeck_memory.graph")

    async def open(self) -> None:
        """Create constraints and indexes idempotently; tolerate what the server lacks."""
        for statement in SCHEMA:
            try:
                await self._driver.execute_query(statement, database_=self._database)
            except (ServiceUnavailable, SessionExpired, OSError) as exc:
                raise StoreDown("neo4j", exc) from exc
            except Neo4jError as exc:
                # ArcadeDB accepts these statements; a server that rejects one still works,
                # only slower or without the uniqueness guard, so start and say so.
                self._log.warning("graph schema statement refused", error=str(exc)[:200])

    async def close(self) -> None:
        await self._driver.close()

    async def ping(self) -> None:
        try:
            await self._driver.verify_connectivity()
            await self._driver.execute_query("RETURN 1 AS ok", database_=self._database)
        except Exception as exc:
            raise StoreDown("neo4j", exc) from exc

    async def _write(self, fn: Any, *args: Any) -> Any:
        try:
            async with self._driver.session(database=self._database) as session:
                return await session.execute_write(fn, *args)
        except errors.Fault:
            raise
        except (DriverError, ServiceUnavailable, SessionExpired, OSError) as exc:
            raise StoreDown("neo4j", exc) from exc
        except Neo4jError as exc:
            if exc.is_retryable():
                raise StoreDown("neo4j", exc) from exc
            raise

    async def _read(self, fn: Any, *args: Any) -> Any:
        try:
            async with self._driver.session(database=self._database) as session:
                return await session.execute_read(fn, *args)
        except errors.Fault:
            raise
        except (DriverError, ServiceUnavailable, SessionExpired, OSError) as exc:
            raise StoreDown("neo4j", exc) from exc
        except Neo4jError as exc:
            if exc.is_retryable():
                raise StoreDown("neo4j", exc) from exc
            raise

    async def missing_entities(self, tenant_id: str, keys: Sequence[str]) -> list[str]:
        async def work(tx: AsyncManagedTransaction) -> list[str]:
            rows = await _run(tx, Q_MISSING, tenant_id, keys=list(keys))
            return [str(r["key"]) for r in rows]

        result: list[str] = await self._read(work)
        return result

    async def put_memories(self, records: Sequence[MemoryRecord]) -> None:
        if not records:
            return
        tenants = {r.provenance.tenant_id for r in records}
        if len(tenants) != 1:
            raise ValueError("one call writes one tenant's memories")
        [tenant] = tenants
        rows = [
            {
                "memory_id": r.memory_id,
                "props": {
                    "user_id": r.provenance.user_id,
                    "run_id": r.provenance.run_id,
                    "step_id": r.provenance.step_id,
                    "chain_id": r.chain_id,
                    "category": r.category,
                    "fact_key": r.fact_key,
                    "valid_from": r.valid_from,
                    "valid_to": r.valid_to,
                    "superseded_by": r.superseded_by,
                    "retired": r.retired,
                    "create_time": r.create_time,
                    "update_time": r.update_time,
                },
            }
            for r in records
        ]
        links = [{"memory_id": r.memory_id, "ekey": key} for r in records for key in r.entity_refs]

        async def work(tx: AsyncManagedTransaction) -> None:
            await _run(tx, Q_PUT_MEMORIES, tenant, rows=rows)
            await _run(tx, Q_UNLINK_MEMORIES, tenant, ids=[r.memory_id for r in records])
            if links:
                await _run(tx, Q_LINK_MEMORIES, tenant, links=links)

        await self._write(work)

    async def delete_memories(self, tenant_id: str, memory_ids: Sequence[str]) -> int:
        async def work(tx: AsyncManagedTransaction) -> int:
            rows = await _run(tx, Q_DELETE_MEMORIES, tenant_id, ids=list(memory_ids))
            return int(rows[0]["n"]) if rows else 0

        result: int = await self._write(work)
        return result

    async def delete_user(
        self, tenant_id: str, user_id: str, subject_keys: Sequence[str]
    ) -> tuple[int, int, int]:
        async def work(tx: AsyncManagedTransaction) -> tuple[int, int, int]:
            memories = (await _run(tx, Q_COUNT_USER_MEMORIES, tenant_id, user=user_id))[0]["n"]
            await _run(tx, Q_DELETE_USER_MEMORIES, tenant_id, user=user_id)
            touched = await _run(tx, Q_USER_ENTITY_VERSIONS, tenant_id, user=user_id)
            entity_versions = sum(int(r["n"]) for r in touched)
            await _run(tx, Q_DELETE_USER_ENTITY_VERSIONS, tenant_id, user=user_id)
            rels = int((await _run(tx, Q_USER_RELS, tenant_id, user=user_id))[0]["n"])
            await _run(tx, Q_DELETE_USER_RELS, tenant_id, user=user_id)
            # Entities left with no version at all, and the user's own subject entities, go.
            for ekey in sorted({str(r["ekey"]) for r in touched} | set(subject_keys)):
                left = int((await _run(tx, Q_ENTITY_VERSION_COUNT, tenant_id, ekey=ekey))[0]["n"])
                if ekey in subject_keys or left == 0:
                    rel_rows = await _run(tx, Q_ENTITY_RELS_COUNT, tenant_id, ekey=ekey)
                    rels += int(rel_rows[0]["n"]) if rel_rows else 0
                    entity_versions += left
                    await _run(tx, Q_PURGE_ENTITY, tenant_id, ekey=ekey)
            return int(memories), entity_versions, rels

        result: tuple[int, int, int] = await self._write(work)
        return result

    async def upsert_entities(
        self, tenant_id: str, items: Sequence[dict[str, Any]], at: int
    ) -> list[tuple[EntityVersion, str]]:
        async def work(tx: AsyncManagedTransaction) -> list[tuple[EntityVersion, str]]:
            out: list[tuple[EntityVersion, str]] = []
            for index, item in enumerate(items):
                ekey = entity_key(item["type"], item["entity_id"])
                rows = await _run(tx, Q_CURRENT_ENTITY, tenant_id, ekey=ekey)
                current = rows[0]["v"] if rows else None
                valid_from = item["valid_from"] if item["valid_from"] is not None else at
                valid_to = item["valid_to"] if item["valid_to"] is not None else OPEN_END
                base_props = json.loads(current.get("props") or "{}") if current else {}
                props = _apply_props(base_props, item["properties"], item["properties_mode"])
                name = item["name"] or (current["name"] if current else item["entity_id"])
                if current is not None:
                    unchanged = (
                        name == current.get("name")
                        and _dumps(props) == (current.get("props") or "{}")
                        and valid_to == int(current["valid_to"])
                    )
                    if unchanged:
                        out.append((_entity(current), "UNCHANGED"))
                        continue
                    if valid_from < int(current["valid_from"]):
                        raise errors.validity_range_invalid(
                            f"entities[{index}].valid_from",
                            "before the current version's valid_from",
                        )
                    await _run(
                        tx,
                        Q_RETIRE_ENTITY_VERSION,
                        tenant_id,
                        ekey=ekey,
                        valid_to=valid_from,
                        at=at,
                    )
                await _run(
                    tx,
                    Q_ENSURE_ENTITY,
                    tenant_id,
                    ekey=ekey,
                    etype=item["type"],
                    entity_id=item["entity_id"],
                )
                version_props = {
                    "etype": item["type"],
                    "entity_id": item["entity_id"],
                    "name": name,
                    "props": _dumps(props),
                    "user_id": item["user_id"],
                    "run_id": item["run_id"],
                    "step_id": item["step_id"],
                    "valid_from": valid_from,
                    "valid_to": valid_to,
                    "version": int(current["version"]) + 1 if current else 1,
                    "current": True,
                    "create_time": int(current["create_time"]) if current else at,
                    "update_time": at,
                }
                created = await _run(
                    tx, Q_CREATE_ENTITY_VERSION, tenant_id, ekey=ekey, props=version_props
                )
                out.append((_entity(created[0]["v"]), "SUPERSEDED" if current else "CREATED"))
            return out

        result: list[tuple[EntityVersion, str]] = await self._write(work)
        return result

    async def upsert_relationships(
        self, tenant_id: str, items: Sequence[dict[str, Any]], at: int, create_missing: bool
    ) -> tuple[
        list[tuple[RelationshipVersion, str, list[RelationshipVersion]]], list[EntityVersion]
    ]:
        async def work(
            tx: AsyncManagedTransaction,
        ) -> tuple[
            list[tuple[RelationshipVersion, str, list[RelationshipVersion]]], list[EntityVersion]
        ]:
            created_entities: list[EntityVersion] = []
            ends = []
            for item in items:
                for end in (item["source"], item["target"]):
                    if end not in ends:
                        ends.append(end)
            for end in ends:
                ekey = entity_key(*end)
                if await _run(tx, Q_CURRENT_ENTITY, tenant_id, ekey=ekey):
                    continue
                if not create_missing:
                    raise errors.entity_not_found(*end)
                await _run(
                    tx, Q_ENSURE_ENTITY, tenant_id, ekey=ekey, etype=end[0], entity_id=end[1]
                )
                props = {
                    "etype": end[0],
                    "entity_id": end[1],
                    "name": end[1],
                    "props": "{}",
                    "user_id": items[0]["user_id"],
                    "run_id": items[0]["run_id"],
                    "step_id": items[0]["step_id"],
                    "valid_from": at,
                    "valid_to": OPEN_END,
                    "version": 1,
                    "current": True,
                    "create_time": at,
                    "update_time": at,
                }
                rows = await _run(tx, Q_CREATE_ENTITY_VERSION, tenant_id, ekey=ekey, props=props)
                created_entities.append(_entity(rows[0]["v"]))

            out: list[tuple[RelationshipVersion, str, list[RelationshipVersion]]] = []
            for index, item in enumerate(items):
                source = entity_key(*item["source"])
                target = entity_key(*item["target"])
                valid_from = item["valid_from"] if item["valid_from"] is not None else at
                valid_to = item["valid_to"] if item["valid_to"] is not None else OPEN_END
                rows = await _run(
                    tx, Q_CURRENT_REL, tenant_id, source=source, target=target, rtype=item["type"]
                )
                current = rows[0]["r"] if rows else None
                base = json.loads(current.get("props") or "{}") if current else {}
                props = _apply_props(base, item["properties"], item["properties_mode"])
                superseded: list[RelationshipVersion] = []
                if current is not None:
                    same = _dumps(props) == (current.get("props") or "{}") and valid_to == int(
                        current["valid_to"]
                    )
                    if same:
                        out.append((_relationship(current, source, target), "UNCHANGED", []))
                        continue
                    if valid_from < int(current["valid_from"]):
                        raise errors.validity_range_invalid(
                            f"relationships[{index}].valid_from",
                            "before the current version's valid_from",
                        )
                rel_id = str(uuid.uuid4())
                to_end: list[tuple[dict[str, Any], str]] = []
                if current is not None:
                    to_end.append((current, target))
                if item["exclusive"]:
                    others = await _run(
                        tx, Q_CURRENT_RELS_FROM, tenant_id, source=source, rtype=item["type"]
                    )
                    to_end.extend(
                        (row["r"], str(row["target"]))
                        for row in others
                        if str(row["target"]) != target
                    )
                for old, old_target in to_end:
                    ended = await _run(
                        tx,
                        Q_END_REL,
                        tenant_id,
                        rel_id=old["rel_id"],
                        valid_to=max(valid_from, int(old["valid_from"])),
                        superseded_by=rel_id,
                        at=at,
                    )
                    superseded.append(_relationship(ended[0]["r"], source, old_target))
                rel_props = {
                    "rel_id": rel_id,
                    "rtype": item["type"],
                    "props": _dumps(props),
                    "user_id": item["user_id"],
                    "run_id": item["run_id"],
                    "step_id": item["step_id"],
                    "valid_from": valid_from,
                    "valid_to": valid_to,
                    "version": int(current["version"]) + 1 if current else 1,
                    "current": True,
                    "superseded_by": "",
                    "create_time": int(current["create_time"]) if current else at,
                    "update_time": at,
                }
                created = await _run(
                    tx, Q_CREATE_REL, tenant_id, source=source, target=target, props=rel_props
                )
                outcome = "SUPERSEDED" if current else "CREATED"
                out.append((_relationship(created[0]["r"], source, target), outcome, superseded))
            return out, created_entities

        result: tuple[
            list[tuple[RelationshipVersion, str, list[RelationshipVersion]]], list[EntityVersion]
        ] = await self._write(work)
        return result

    async def get_entity(
        self, tenant_id: str, entity_type: str, entity_id: str, at: int
    ) -> EntityVersion | None:
        async def work(tx: AsyncManagedTransaction) -> EntityVersion | None:
            rows = await _run(
                tx, Q_ENTITY_AT, tenant_id, ekey=entity_key(entity_type, entity_id), at=at
            )
            return _entity(rows[0]["v"]) if rows else None

        result: EntityVersion | None = await self._read(work)
        return result

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
    ) -> NeighbourhoodResult | None:
        centre_key = entity_key(entity_type, entity_id)
        reach = Q_REACH[(direction, depth)]

        async def work(tx: AsyncManagedTransaction) -> NeighbourhoodResult | None:
            centre_rows = await _run(tx, Q_ENTITY_AT, tenant_id, ekey=centre_key, at=at)
            if not centre_rows:
                return None
            centre = _entity(centre_rows[0]["v"])
            # One more than asked, to tell whether the result was truncated; reached entities
            # with no version valid at `at` are dropped, so fetch a margin beyond that too.
            reached = await _run(
                tx,
                reach,
                tenant_id,
                ekey=centre_key,
                at=at,
                types=list(rel_types),
                limit=max(limit * 2, limit + 1),
            )
            distances = {str(r["ekey"]): int(r["d"]) for r in reached}
            version_rows = await _run(tx, Q_ENTITIES_AT, tenant_id, ekeys=list(distances), at=at)
            versions: dict[str, EntityVersion] = {}
            for row in version_rows:
                entity = _entity(row["v"])
                versions.setdefault(entity_key(entity.entity_type, entity.entity_id), entity)
            ordered = sorted(
                (ekey for ekey in distances if ekey in versions),
                key=lambda k: (distances[k], k),
            )
            truncated = len(ordered) > limit
            kept = ordered[:limit]
            rel_rows = await _run(
                tx,
                Q_RELS_AMONG,
                tenant_id,
                ekeys=[centre_key, *kept],
                at=at,
                types=list(rel_types),
            )
            rels = [_relationship(r["r"], str(r["source"]), str(r["target"])) for r in rel_rows]
            rels.sort(key=lambda r: r.relationship_id)
            return NeighbourhoodResult(
                centre=centre,
                neighbours=[(versions[k], distances[k]) for k in kept],
                relationships=rels,
                truncated=truncated,
            )

        result: NeighbourhoodResult | None = await self._read(work)
        return result

    async def search_entities(
        self, tenant_id: str, types: Sequence[str], prefix: str, offset: int, limit: int, at: int
    ) -> list[EntityVersion]:
        async def work(tx: AsyncManagedTransaction) -> list[EntityVersion]:
            rows = await _run(
                tx,
                Q_SEARCH,
                tenant_id,
                types=list(types),
                prefix=prefix.lower(),
                offset=offset,
                limit=limit,
                at=at,
            )
            return [_entity(r["v"]) for r in rows]

        result: list[EntityVersion] = await self._read(work)
        return result

    @staticmethod
    async def _version_count(tx: AsyncManagedTransaction, tenant_id: str, ekey: str) -> int:
        rows = await _run(tx, Q_ENTITY_VERSION_COUNT, tenant_id, ekey=ekey)
        return int(rows[0]["n"]) if rows else 0

    async def delete_entity(
        self, tenant_id: str, entity_type: str, entity_id: str, purge: bool, at: int
    ) -> tuple[EntityVersion, int] | None:
        ekey = entity_key(entity_type, entity_id)

        async def work(tx: AsyncManagedTransaction) -> tuple[EntityVersion, int] | None:
            if purge:
                rows = await _run(tx, Q_ENTITY_AT, tenant_id, ekey=ekey, at=OPEN_END - 1)
                latest = await _run(tx, Q_CURRENT_ENTITY, tenant_id, ekey=ekey)
                versions = int(
                    (await _run(tx, Q_ENTITY_VERSION_COUNT, tenant_id, ekey=ekey))[0]["n"]
                )
                if versions == 0:
                    return None
                rel_rows = await _run(tx, Q_ENTITY_RELS_COUNT, tenant_id, ekey=ekey)
                rels = int(rel_rows[0]["n"]) if rel_rows else 0
                last = latest[0]["v"] if latest else (rows[0]["v"] if rows else None)
                await _run(tx, Q_PURGE_ENTITY, tenant_id, ekey=ekey)
                if last is None:
                    return None
                return _entity(last), rels
            current = await _run(tx, Q_CURRENT_ENTITY, tenant_id, ekey=ekey)
            if not current:
                versions = int(
                    (await _run(tx, Q_ENTITY_VERSION_COUNT, tenant_id, ekey=ekey))[0]["n"]
                )
                if versions == 0:
                    return None
                last_rows = await _run(tx, Q_ENTITY_AT, tenant_id, ekey=ekey, at=at)
                if last_rows:
                    return _entity(last_rows[0]["v"]), 0
                return None
            valid_to = max(at, int(current[0]["v"]["valid_from"]))
            await _run(tx, Q_RETIRE_ENTITY_VERSION, tenant_id, ekey=ekey, valid_to=valid_to, at=at)
            retired = dict(current[0]["v"], valid_to=valid_to, current=False, update_time=at)
            rel_rows = await _run(tx, Q_RETIRE_RELS_OF, tenant_id, ekey=ekey, at=at)
            return _entity(retired), int(rel_rows[0]["n"]) if rel_rows else 0

        result: tuple[EntityVersion, int] | None = await self._write(work)
        return result
