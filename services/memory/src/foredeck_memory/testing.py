"""Helpers for tests that run a real memory server: settings, start-up and typed stubs.

Used by this package's own tests and by cross-service tests; nothing here runs at import.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import SecretStr

from foredeck.memory.v1 import memory_service_pb2_grpc
from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    PrincipalSigner,
    format_keys,
    generate_key,
)
from foredeck_memory.config import MemorySettings
from foredeck_memory.server import MemoryDeps, MemoryHost, build_server


def signing_keys() -> dict[str, bytes]:
    """A fresh single-key set for signing and verifying principals."""
    return {"memory-test": generate_key()}


def delegation_signing_keys() -> dict[str, bytes]:
    """A fresh key set for the orchestrator's delegated principals (its own key id)."""
    return {"memory-test-run": generate_key()}


@dataclass
class MemoryServer:
    """A running memory server with typed stubs and a principal signer."""

    host: MemoryHost
    channel: grpc.aio.Channel
    signer: PrincipalSigner
    delegation: DelegationSigner | None = None

    @property
    def working(self) -> memory_service_pb2_grpc.WorkingMemoryServiceAsyncStub:
        return memory_service_pb2_grpc.WorkingMemoryServiceStub(self.channel)

    @property
    def long_term(self) -> memory_service_pb2_grpc.LongTermMemoryServiceAsyncStub:
        return memory_service_pb2_grpc.LongTermMemoryServiceStub(self.channel)

    @property
    def entities(self) -> memory_service_pb2_grpc.EntityMemoryServiceAsyncStub:
        return memory_service_pb2_grpc.EntityMemoryServiceStub(self.channel)

    def as_user(
        self, tenant: str = "tenant-a", user: str = "user-a", permissions: Iterable[str] = ("*",)
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying a principal for ``tenant`` / ``user``."""
        token = self.signer.mint(tenant_id=tenant, user_id=user, permissions=permissions)
        return ((PRINCIPAL_METADATA_KEY, token),)

    def as_run(
        self,
        run_id: str,
        tenant: str = "tenant-a",
        user: str = "user-a",
        permissions: Iterable[str] = ("*",),
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying a principal the orchestrator minted for ``run_id``."""
        if self.delegation is None:
            raise RuntimeError("the server was started without delegation keys")
        claims = RunClaims(tenant_id=tenant, user_id=user, permissions=tuple(permissions))
        return ((PRINCIPAL_METADATA_KEY, self.delegation.mint_for_run(claims, run_id)),)

    async def stop(self) -> None:
        """Close the channel and stop the server (stores flushed and closed)."""
        await self.channel.close(None)
        await self.host.stop(0)


def memory_settings(
    *,
    redis_url: str,
    bolt_uri: str,
    bolt_user: str,
    bolt_password: str,
    graph_database: str,
    edge_path: Path,
    keys: dict[str, bytes],
    llmrouter_address: str = "",
    summarization_model: str = "local-small",
    delegation_keys: dict[str, bytes] | None = None,
    embedding_model: str = "",
    embedding_dimensions: int = 384,
) -> MemorySettings:
    """Settings pointing at a test's own Redis database, graph database and shard."""
    return MemorySettings(
        redis_url=redis_url,
        neo4j_uri=bolt_uri,
        neo4j_user=bolt_user,
        neo4j_password=SecretStr(bolt_password),
        neo4j_database=graph_database,
        edge_path=str(edge_path),
        principal_keys=SecretStr(format_keys(keys)),
        delegation_keys=SecretStr(format_keys(delegation_keys) if delegation_keys else ""),
        embedding_model=embedding_model,
        embedding_dimensions=embedding_dimensions,
        llmrouter_address=llmrouter_address,
        summarization_model=summarization_model,
        grace_period_seconds=1.0,
        metrics_port=-1,
    )


async def start_memory_server(
    settings: MemorySettings,
    deps: MemoryDeps,
    keys: dict[str, bytes],
    delegation_keys: dict[str, bytes] | None = None,
) -> MemoryServer:
    """Start a memory server and return once health shows SERVING."""
    host = build_server(settings, deps)
    await host.start()
    await host.wait_ready()
    channel = grpc.aio.insecure_channel(host.address)
    signer = PrincipalSigner(
        keys,
        next(iter(keys)),
        issuer=settings.principal_issuer,
        audience=settings.principal_audience,
    )
    delegation = None
    if delegation_keys:
        delegation = DelegationSigner(
            delegation_keys, next(iter(delegation_keys)), audience=settings.principal_audience
        )
    return MemoryServer(host=host, channel=channel, signer=signer, delegation=delegation)
