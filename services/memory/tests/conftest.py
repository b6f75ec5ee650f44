"""Fixtures of the memory service's tests: a real memory server on real stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
import pytest_asyncio

from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.server import MemoryDeps
from foredeck_memory.testing import (
    MemoryServer,
    delegation_signing_keys,
    memory_settings,
    signing_keys,
    start_memory_server,
)
from foredeck_testing.stores import GraphDatabaseRef


@pytest.fixture(scope="session")
def embedder() -> Iterable[LocalEmbedder]:
    """One ONNX MiniLM session for the whole test run."""
    model = LocalEmbedder(batch_size=32, threads=1)
    yield model
    model.close()


@pytest_asyncio.fixture
async def memory_server(
    redis_url: str, graph_database: GraphDatabaseRef, tmp_path: Path, embedder: LocalEmbedder
) -> AsyncIterator[MemoryServer]:
    """A memory server on this test's Redis database, graph database and Edge shard."""
    keys = signing_keys()
    delegation = delegation_signing_keys()
    settings = memory_settings(
        redis_url=redis_url,
        bolt_uri=graph_database.uri,
        bolt_user=graph_database.user,
        bolt_password=graph_database.password,
        graph_database=graph_database.name,
        edge_path=tmp_path / "vectors",
        keys=keys,
        delegation_keys=delegation,
    )
    server = await start_memory_server(
        settings,
        MemoryDeps(embedder=embedder, count_tokens=embedder.count_tokens),
        keys,
        delegation,
    )
    try:
        yield server
    finally:
        await server.stop()
