"""``build_server(settings, deps)``: the factory both ``main()`` and the tests use.

The stores are opened when the host starts and closed after it stops (the Qdrant Edge shard is
flushed last). A store that fails a call turns health NOT_SERVING until a probe finds it back.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from neo4j import AsyncGraphDatabase
from redis.asyncio import Redis

from foredeck.memory.v1 import memory_service_pb2_grpc
from foredeck_kit.channels import idempotent_methods, open_channel
from foredeck_kit.errors import domain_for
from foredeck_kit.logs import get_logger
from foredeck_kit.server import ServiceHost
from foredeck_kit.telemetry import Telemetry
from foredeck_memory.adapters.embedders import LocalEmbedder, RouterEmbedder
from foredeck_memory.adapters.neo4j_graph import Neo4jGraphStore
from foredeck_memory.adapters.qdrant_edge import EdgeVectorStore
from foredeck_memory.adapters.redis_sessions import RedisSessionStore
from foredeck_memory.adapters.redis_support import (
    IdempotencyRecords,
    RedisLocks,
    RedisOutbox,
    RedisQuotas,
)
from foredeck_memory.clients import LlmRouterClient
from foredeck_memory.config import MemorySettings, parse_named_list
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.long_term import LongTermMemory
from foredeck_memory.domain.ports import Embedder, GraphStore, VectorStore
from foredeck_memory.domain.validation import TypeCatalogue
from foredeck_memory.domain.working import WorkingMemory
from foredeck_memory.observability import MemoryMetrics, traced
from foredeck_memory.servicer import (
    EntityMemoryServicer,
    LongTermMemoryServicer,
    WorkingMemoryServicer,
)

SERVICE_NAMES = (
    "foredeck.memory.v1.WorkingMemoryService",
    "foredeck.memory.v1.LongTermMemoryService",
    "foredeck.memory.v1.EntityMemoryService",
)
TOKENIZER_NAME = "all-MiniLM-L6-v2-wordpiece"

_PROBE_FIRST = 0.05
_PROBE_MAX = 2.0
_REPAIR_INTERVAL = 10.0


@dataclass
class MemoryDeps:
    """Objects a caller may supply instead of having them built from the settings.

    Tests pass a shared embedder (one ONNX session per process), a vector store on
    qdrant-client's local mode, or wrappers that fail on purpose.
    """

    telemetry: Telemetry | None = None
    embedder: Embedder | None = None
    count_tokens: Any = None
    vectors: VectorStore | None = None
    graph: GraphStore | None = None
    redis: Redis | None = None
    llmrouter_channel: grpc.aio.Channel | None = None
    extra_closers: list[Any] = field(default_factory=list)


class MemoryHost(ServiceHost):
    """The kit's host plus the memory service's stores, their health and the outbox repair."""

    def __init__(self, settings: MemorySettings, deps: MemoryDeps, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.memory_settings = settings
        self.deps = deps
        self.redis: Redis | None = None
        self.vectors: VectorStore | None = None
        self.graph: GraphStore | None = None
        self.embedder: Embedder | None = None
        self.long_term: LongTermMemory | None = None
        self.working: WorkingMemory | None = None
        self.metrics_memory: MemoryMetrics | None = None
        self._down: set[str] = set()
        self._probe: asyncio.Task[None] | None = None
        self._repair: asyncio.Task[None] | None = None
        self._owned: list[Any] = []
        self._log = get_logger("foredeck_memory.server")

    def store_down(self, store: str) -> None:
        """Mark a store down: health NOT_SERVING until a probe finds it answering again."""
        if self._health is None or self._stopping.is_set():
            return
        self._down.add(store)
        self.report_dependency(store, healthy=False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_stores())

    async def _ping(self, store: str) -> None:
        if store == "redis":
            assert self.redis is not None
            try:
                await self.redis.ping()
            except Exception as exc:
                raise StoreDown("redis", exc) from exc
        elif store == "qdrant":
            assert self.vectors is not None
            await self.vectors.ping()
        elif store == "neo4j":
            assert self.graph is not None
            await self.graph.ping()

    async def _probe_stores(self) -> None:
        self._log.warning("store down; health NOT_SERVING", stores=sorted(self._down))
        delay = _PROBE_FIRST
        while self._down and not self._stopping.is_set():
            for store in sorted(self._down):
                try:
                    await self._ping(store)
                except Exception:
                    continue
                self._down.discard(store)
                self.report_dependency(store, healthy=True)
            if not self._down:
                break
            # Backoff between probes of a store that is still down.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            delay = min(delay * 2, _PROBE_MAX)
        if not self._stopping.is_set():
            self._log.info("stores back; health SERVING")

    async def open_stores(self) -> None:
        """Open Redis, the vector store and the graph, and build the use cases."""
        s = self.memory_settings
        tracer = self.telemetry.tracer_provider if self.telemetry else None
        self.redis = self.deps.redis or Redis.from_url(s.redis_url)
        if self.deps.redis is None:
            self._owned.append(self.redis)
        llm_channel = self.deps.llmrouter_channel
        if llm_channel is None and s.llmrouter_address:
            from foredeck.llmrouter.v1 import llmrouter_service_pb2

            llm_channel = open_channel(
                s.llmrouter_address,
                settings=s,
                retry_methods=idempotent_methods(
                    llmrouter_service_pb2.DESCRIPTOR.services_by_name["LlmRouterService"]
                ),
                tracer_provider=tracer,
            )
            self._owned.append(llm_channel)
        router = LlmRouterClient(llm_channel) if llm_channel is not None else None

        local: LocalEmbedder | None = None
        embedder = self.deps.embedder
        count_tokens = self.deps.count_tokens
        if embedder is None:
            if s.embedding_model:
                if router is None:
                    raise RuntimeError("embedding_model needs llmrouter_address")
                embedder = RouterEmbedder(router, s.embedding_model, s.embedding_dimensions)
            else:
                local = await asyncio.to_thread(
                    LocalEmbedder, batch_size=s.embedding_batch_size, threads=s.embedding_threads
                )
                embedder = local
                self._owned.append(local)
        if count_tokens is None:
            if local is None:
                local = await asyncio.to_thread(LocalEmbedder, batch_size=1, threads=1)
                self._owned.append(local)
            count_tokens = local.count_tokens
        self.embedder = embedder

        vectors = self.deps.vectors
        if vectors is None:
            if s.vector_backend == "edge":
                vectors = EdgeVectorStore(s.edge_path, embedder.dimensions)
            else:
                from qdrant_client import AsyncQdrantClient

                from foredeck_memory.adapters.qdrant_server import QdrantServerVectorStore

                key = s.qdrant_api_key.get_secret_value() or None
                vectors = QdrantServerVectorStore(
                    AsyncQdrantClient(url=s.qdrant_url, api_key=key),
                    s.qdrant_collection,
                    embedder.dimensions,
                )
        await vectors.open()
        self.vectors = traced(vectors, "qdrant", tracer)

        graph = self.deps.graph
        if graph is None:
            # Short retry and connect budgets: a graph that is down must surface as
            # GRAPH_STORE_UNAVAILABLE within the caller's deadline, not after 30 s of retries.
            driver = AsyncGraphDatabase.driver(
                s.neo4j_uri,
                auth=(s.neo4j_user, s.neo4j_password.get_secret_value()),
                max_transaction_retry_time=s.neo4j_retry_seconds,
                connection_timeout=s.neo4j_connect_timeout_seconds,
                connection_acquisition_timeout=s.neo4j_connect_timeout_seconds * 2,
            )
            graph = Neo4jGraphStore(driver, s.neo4j_database)
        await graph.open()
        self.graph = traced(graph, "neo4j", tracer)

        self.long_term = LongTermMemory(
            vectors=self.vectors,
            graph=self.graph,
            embedder=embedder,
            outbox=traced(RedisOutbox(self.redis), "redis", tracer),
            locks=RedisLocks(self.redis),
            near_duplicate_threshold=s.near_duplicate_threshold,
            quotas=traced(
                RedisQuotas(
                    self.redis,
                    max_per_tenant=s.max_memories_per_tenant,
                    max_per_user=s.max_memories_per_user,
                    count_tenant=self.vectors.count_tenant,
                    count_user=self.vectors.count_user,
                ),
                "redis",
                tracer,
            ),
        )
        self.working = WorkingMemory(
            store=traced(RedisSessionStore(self.redis), "redis", tracer),
            count_tokens=count_tokens,
            tokenizer_name=TOKENIZER_NAME,
            summariser=router,
            default_summary_model=s.summarization_model,
            default_ttl_seconds=s.session_ttl_seconds,
            max_messages=s.max_session_messages,
        )

    async def start(self) -> int:
        await self.open_stores()
        port = await super().start()
        self._repair = asyncio.get_running_loop().create_task(self._repair_loop())
        return port

    async def _repair_loop(self) -> None:
        assert self.long_term is not None
        while not self._stopping.is_set():
            try:
                repaired = await self.long_term.repair(
                    self.memory_settings.outbox_repair_after_seconds
                )
                if repaired:
                    self._log.warning("rolled back unfinished two-store writes", count=repaired)
            except Exception as exc:
                self._log.warning("outbox repair failed; will retry", error=repr(exc))
            # Periodic background work, not synchronisation: wake early when stopping.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=_REPAIR_INTERVAL)

    async def _stop(self, grace: float | None) -> None:
        await super()._stop(grace)
        for task in (self._probe, self._repair):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.close_stores()

    async def close_stores(self) -> None:
        """Close what this host opened; the vector shard is flushed before it closes."""
        for store in (self.vectors, self.graph):
            if store is not None:
                with contextlib.suppress(Exception):
                    await store.close()
        for owned in reversed(self._owned):
            with contextlib.suppress(Exception):
                closer = getattr(owned, "aclose", None) or getattr(owned, "close", None)
                if closer is not None:
                    result = closer()
                    if asyncio.iscoroutine(result):
                        await result
        for closer in self.deps.extra_closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await result


def build_server(settings: MemorySettings, deps: MemoryDeps | None = None) -> MemoryHost:
    """Describe the memory server; stores open and the port binds in ``start()``."""
    deps = deps or MemoryDeps()
    types = TypeCatalogue(
        parse_named_list(settings.entity_types), parse_named_list(settings.relationship_types)
    )
    retry_after = timedelta(seconds=settings.store_retry_after_seconds)
    holder: dict[str, MemoryHost] = {}

    def register(server: grpc.aio.Server) -> None:
        host = holder["host"]
        assert host.long_term is not None
        assert host.working is not None
        assert host.graph is not None
        assert host.redis is not None
        metrics = MemoryMetrics(host.metrics.registry)
        host.metrics_memory = metrics
        common: dict[str, Any] = {
            "on_store_down": host.store_down,
            "retry_after": retry_after,
            "idempotency": IdempotencyRecords(host.redis),
        }
        memory_service_pb2_grpc.add_WorkingMemoryServiceServicer_to_server(
            WorkingMemoryServicer(host.working, **common), server
        )
        memory_service_pb2_grpc.add_LongTermMemoryServiceServicer_to_server(
            LongTermMemoryServicer(host.long_term, host.working, types, metrics, **common), server
        )
        memory_service_pb2_grpc.add_EntityMemoryServiceServicer_to_server(
            EntityMemoryServicer(host.graph, types, **common), server
        )

    async def readiness() -> bool:
        host = holder["host"]
        for store in ("redis", "qdrant", "neo4j"):
            await host._ping(store)
        return True

    host = MemoryHost(
        settings,
        deps,
        domain=domain_for("memory"),
        register=register,
        service_names=SERVICE_NAMES,
        # ForgetUser is gateway-only: no run may erase a user.
        verifier=settings.principal_verifier(
            gateway_only_methods=["/foredeck.memory.v1.LongTermMemoryService/ForgetUser"]
        ),
        readiness=readiness,
        telemetry=deps.telemetry,
    )
    holder["host"] = host
    return host


__all__ = ["SERVICE_NAMES", "MemoryDeps", "MemoryHost", "build_server"]
