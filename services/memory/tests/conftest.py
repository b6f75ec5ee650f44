"""Fixtures of the memory service's tests: a real memory server on real stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from pydantic import SecretStr

from foredeck.memory.v1 import memory_service_pb2_grpc
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY, PrincipalSigner, format_keys
from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.config import MemorySettings
from foredeck_memory.server import MemoryDeps, MemoryHost, build_server
from foredeck_testing.server import fresh_keys
from foredeck_testing.stores import GraphDatabaseRef


@pytest.fixture(scope="session")
def embedder() -> Iterable[LocalEmbedder]:
    """One ONNX MiniLM session for the whole test run."""
    model = LocalEmbedder(batch_size=32, threads=1)
    yield model
    model.close()


@dataclass
class MemoryServer:
    """A running memory server with stubs and a principal signer."""

    host: MemoryHost
    channel: grpc.aio.Channel
    signer: PrincipalSigner

    @property
    def working(self) -> memory_service_pb2_grpc.WorkingMemoryServiceStub:
        return memory_service_pb2_grpc.WorkingMemoryServiceStub(self.channel)

    @property
    def long_term(self) -> memory_service_pb2_grpc.LongTermMemoryServiceStub:
        return memory_service_pb2_grpc.LongTermMemoryServiceStub(self.channel)

    @property
    def entities(self) -> memory_service_pb2_grpc.EntityMemoryServiceStub:
        return memory_service_pb2_grpc.EntityMemoryServiceStub(self.channel)

    def as_user(
        self, tenant: str = "tenant-a", user: str = "user-a", permissions: Iterable[str] = ("*",)
    ) -> tuple[tuple[str, str], ...]:
        token = self.signer.mint(tenant_id=tenant, user_id=user, permissions=permissions)
        return ((PRINCIPAL_METADATA_KEY, token),)


def memory_settings(
    redis_url: str,
    graph: GraphDatabaseRef,
    edge_path: Path,
    keys: dict[str, bytes],
    **extra: object,
) -> MemorySettings:
    """Settings pointing at the test's own Redis database, graph database and shard."""
    return MemorySettings(
        redis_url=redis_url,
        neo4j_uri=graph.uri,
        neo4j_user=graph.user,
        neo4j_password=SecretStr(graph.password),
        neo4j_database=graph.name,
        edge_path=str(edge_path),
        principal_keys=format_keys(keys),
        grace_period_seconds=1.0,
        metrics_port=-1,
        **extra,  # type: ignore[arg-type]
    )


async def start_memory_server(
    settings: MemorySettings, deps: MemoryDeps, keys: dict[str, bytes]
) -> MemoryServer:
    """Start a memory server and wait until health shows SERVING."""
    host = build_server(settings, deps)
    await host.start()
    await host.wait_ready()
    channel = grpc.aio.insecure_channel(host.address)
    kid = next(iter(keys))
    signer = PrincipalSigner(
        keys, kid, issuer=settings.principal_issuer, audience=settings.principal_audience
    )
    return MemoryServer(host=host, channel=channel, signer=signer)


@pytest_asyncio.fixture
async def memory_server(
    redis_url: str, graph_database: GraphDatabaseRef, tmp_path: Path, embedder: LocalEmbedder
) -> AsyncIterator[MemoryServer]:
    """A memory server on this test's Redis database, graph database and Edge shard."""
    keys = fresh_keys()
    settings = memory_settings(redis_url, graph_database, tmp_path / "vectors", keys)
    server = await start_memory_server(
        settings, MemoryDeps(embedder=embedder, count_tokens=embedder.count_tokens), keys
    )
    try:
        yield server
    finally:
        await server.channel.close()
        await server.host.stop(0)
