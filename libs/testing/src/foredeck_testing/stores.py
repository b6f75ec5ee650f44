"""pytest fixtures backed by real stores: one redis-server and one ArcadeDB Bolt server per session.

Each server starts the first time a test asks for it. Tests get isolation without paying a
server start each: a freshly flushed Redis database index, and a new graph database.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from foredeck_stack.stores import ArcadeDbProcess, RedisProcess

if TYPE_CHECKING:
    from neo4j import AsyncDriver
    from redis.asyncio import Redis

__all__ = [
    "GraphDatabaseRef",
    "arcadedb_server",
    "graph_database",
    "neo4j_driver",
    "redis_client",
    "redis_server",
    "redis_url",
    "stores_data_dir",
]

_REDIS_DATABASES = 16


@dataclass(frozen=True)
class GraphDatabaseRef:
    """Where one test's graph database lives and how to log in to it."""

    uri: str
    """``bolt://`` URI of the server."""
    user: str
    password: str
    name: str
    """Database name: pass it as ``database_=`` / ``database=`` to the driver."""
    http_url: str
    """ArcadeDB's HTTP API on the same server."""

    @property
    def auth(self) -> tuple[str, str]:
        """``(user, password)`` for ``neo4j.AsyncGraphDatabase.driver``."""
        return (self.user, self.password)


@pytest.fixture(scope="session")
def stores_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the session's store data and logs (kept by pytest for inspection)."""
    return tmp_path_factory.mktemp("foredeck-stores")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def redis_server(stores_data_dir: Path) -> AsyncIterator[RedisProcess]:
    """A real redis-server for the whole session, stopped at the end."""
    async with RedisProcess(stores_data_dir / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def _redis_database_numbers() -> Iterator[int]:
    return itertools.cycle(range(_REDIS_DATABASES))


@pytest_asyncio.fixture
async def redis_url(redis_server: RedisProcess, _redis_database_numbers: Iterator[int]) -> str:
    """URL of an empty Redis database for this test.

    Consecutive tests use different database indexes (flushed first), so a connection a
    previous test left behind cannot write into this test's data.
    """
    from redis.asyncio import Redis

    url = redis_server.url_for(next(_redis_database_numbers))
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A ``redis.asyncio`` client (bytes responses) on this test's database, closed after."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def arcadedb_server(stores_data_dir: Path) -> AsyncIterator[ArcadeDbProcess]:
    """A real ArcadeDB server with its Bolt endpoint for the whole session, stopped at the end."""
    async with ArcadeDbProcess(stores_data_dir / "arcadedb") as server:
        yield server


@pytest.fixture(scope="session")
def _graph_database_numbers() -> Iterator[int]:
    return itertools.count(1)


@pytest_asyncio.fixture
async def graph_database(
    arcadedb_server: ArcadeDbProcess, _graph_database_numbers: Iterator[int]
) -> AsyncIterator[GraphDatabaseRef]:
    """A new, empty graph database for this test, dropped after it."""
    name = f"t{next(_graph_database_numbers)}_{secrets.token_hex(4)}"
    await arcadedb_server.create_database(name)
    try:
        yield GraphDatabaseRef(
            uri=arcadedb_server.bolt_uri,
            user=arcadedb_server.user,
            password=arcadedb_server.password,
            name=name,
            http_url=arcadedb_server.http_url,
        )
    finally:
        await arcadedb_server.drop_database(name)


@pytest_asyncio.fixture
async def neo4j_driver(graph_database: GraphDatabaseRef) -> AsyncIterator[AsyncDriver]:
    """An async Neo4j driver logged in to this test's server; name ``graph_database.name``."""
    from neo4j import AsyncGraphDatabase

    driver = AsyncGraphDatabase.driver(graph_database.uri, auth=graph_database.auth)
    try:
        yield driver
    finally:
        await driver.close()
