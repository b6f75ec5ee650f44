"""mem0 (open-source ``mem0ai``) on the memory benchmark's data, run in its own virtualenv.

``python bench/mem0_peer.py SPEC.json`` reads the texts, tiers (a size and its queries each),
user id, embedding endpoint and vector store from the spec, adds the first ``api_count`` texts
with ``add(infer=False)`` (no LLM call), then grows tier by tier: it bulk-inserts the texts up
to the tier's size straight into mem0's vector store with the precomputed vectors (the same
shortcut the service's side of the benchmark takes beyond 10k) and times ``search`` for each of
the tier's queries. It prints one JSON object with the timings. It imports nothing from
this repository: ``make bench`` runs it with the interpreter of the virtualenv that holds mem0.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np

BULK_CHUNK = 10_000
"""Texts per bulk insert: mem0's FAISS store rewrites its whole index file on every insert."""


def _config(spec: dict[str, Any], workdir: str) -> dict[str, Any]:
    base = spec["openai_base_url"]
    if spec["vector_store"] == "faiss":
        store: dict[str, Any] = {
            "provider": "faiss",
            "config": {
                "collection_name": "bench",
                "path": os.path.join(workdir, "faiss"),
                "embedding_model_dims": 384,
                "distance_strategy": "cosine",
            },
        }
    else:
        store = {
            "provider": "qdrant",
            "config": {
                "collection_name": "bench",
                "path": os.path.join(workdir, "qdrant"),
                "embedding_model_dims": 384,
                "on_disk": False,
            },
        }
    return {
        "llm": {
            "provider": "openai",
            "config": {"model": "fake", "api_key": "sk-dummy", "openai_base_url": base},
        },
        "embedder": {
            "provider": "openai",
            "config": {
                "model": "fake-emb",
                "api_key": "sk-dummy",
                "openai_base_url": base,
                "embedding_dims": 384,
            },
        },
        "vector_store": store,
        "history_db_path": os.path.join(workdir, "history.db"),
    }


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    os.environ["MEM0_TELEMETRY"] = "False"
    # mem0 lives only in the benchmark's own virtualenv.
    from mem0 import Memory  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as workdir:
        memory = Memory.from_config(_config(spec, workdir))
        user = spec["user_id"]
        api_count = spec["api_count"]
        texts = spec["texts"]
        started = time.perf_counter()
        for text in texts[:api_count]:
            memory.add(text, user_id=user, infer=False)
        ingest_seconds = time.perf_counter() - started
        vectors = np.load(spec["bulk_vectors_path"]) if len(texts) > api_count else None
        loaded = api_count
        bulk_seconds = 0.0
        tiers = []
        for tier in spec["tiers"]:
            begin = time.perf_counter()
            while loaded < tier["size"]:
                end = min(tier["size"], loaded + BULK_CHUNK)
                assert vectors is not None
                _bulk_insert(
                    memory, user, texts[loaded:end], vectors[loaded - api_count : end - api_count]
                )
                loaded = end
            bulk_seconds += time.perf_counter() - begin
            samples = []
            top1 = []
            for query in tier["queries"]:
                begin = time.perf_counter()
                found = memory.search(query, filters={"user_id": user}, top_k=spec["limit"])
                samples.append(time.perf_counter() - begin)
                results = found.get("results", found) if isinstance(found, dict) else found
                top1.append(results[0]["memory"] if results else "")
            tiers.append({"size": tier["size"], "search_seconds": samples, "top1": top1})
        json.dump(
            {
                "ingest_seconds": ingest_seconds,
                "count": api_count,
                "bulk_seconds": bulk_seconds,
                "tiers": tiers,
            },
            sys.stdout,
        )


def _bulk_insert(memory: Any, user: str, texts: list[str], vectors: Any) -> None:
    """Insert texts with their vectors straight into mem0's vector store, in one call."""
    now = datetime.now(UTC).isoformat()
    memory.vector_store.insert(
        vectors=[v.tolist() for v in vectors],
        payloads=[
            {
                "data": text,
                "hash": hashlib.md5(text.encode()).hexdigest(),
                "created_at": now,
                "updated_at": now,
                "text_lemmatized": text.lower(),
                "user_id": user,
            }
            for text in texts
        ],
        ids=[str(uuid.uuid4()) for _ in texts],
    )


if __name__ == "__main__":
    main()
