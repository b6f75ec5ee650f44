"""Spans per RPC and per store call, the recall histogram and the per-tenant memory gauge."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck_kit.telemetry import setup_telemetry
from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.server import MemoryDeps
from foredeck_memory.testing import memory_settings, signing_keys, start_memory_server
from foredeck_testing.stores import GraphDatabaseRef


async def test_spans_and_metrics(
    redis_url: str, graph_database: GraphDatabaseRef, tmp_path: Path, embedder: LocalEmbedder
) -> None:
    keys = signing_keys()
    settings = memory_settings(
        redis_url=redis_url,
        bolt_uri=graph_database.uri,
        bolt_user=graph_database.user,
        bolt_password=graph_database.password,
        graph_database=graph_database.name,
        edge_path=tmp_path / "vectors",
        keys=keys,
    ).model_copy(update={"trace_sample_ratio": 1.0})
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        "memory",
        settings,
        environ={},
        span_exporter=spans,
        set_global=False,
        log_stream=io.StringIO(),
    )
    server = await start_memory_server(
        settings,
        MemoryDeps(telemetry=telemetry, embedder=embedder, count_tokens=embedder.count_tokens),
        keys,
    )
    try:
        for content in ("Mia bakes sourdough.", "Noah fixes bikes."):
            await server.long_term.Remember(
                ms.RememberRequest(request_id=str(uuid.uuid4()), content=content),
                metadata=server.as_user(tenant="tenant-obs"),
            )
        await server.long_term.Recall(
            ms.RecallRequest(query="who bakes bread?", limit=2),
            metadata=server.as_user(tenant="tenant-obs"),
        )
        names = {span.name for span in spans.get_finished_spans()}
        assert "foredeck.memory.v1.LongTermMemoryService/Recall" in names
        assert {"qdrant.search", "qdrant.upsert", "neo4j.put_memories"} <= names
        registry = telemetry.metrics.registry
        assert registry.get_sample_value("memory_recall_seconds_count") == 1
        gauge = registry.get_sample_value("memory_long_term_memories", {"tenant_id": "tenant-obs"})
        assert gauge == 2
    finally:
        await server.stop()
        telemetry.shutdown()
