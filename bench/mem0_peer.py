"""mem0 (open-source ``mem0ai``) on the memory benchmark's data, run in its own virtualenv.

``python bench/mem0_peer.py SPEC.json`` reads the texts, queries, user id, embedding endpoint and
vector store from the spec, adds the first ``api_count`` texts with ``add(infer=False)`` (no LLM
call) and bulk-inserts the rest straight into mem0's vector store with the precomputed vectors
(the same shortcut the service's side of the benchmark takes beyond 10k), then times ``search``
for each query and prints one JSON object with the timings. It imports nothing from
this repository: ``make bench`` runs it with the interpreter of the virtualenv that holds mem0.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import UTC
from typing import Any


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
        started = time.perf_counter()
        for text in spec["texts"][:api_count]:
            memory.add(text, user_id=user, infer=False)
        ingest_seconds = time.perf_counter() - started
        rest = spec["texts"][api_count:]
        if rest:
            import hashlib
            import uuid
            from datetime import datetime

            import numpy as np

            vectors = np.load(spec["bulk_vectors_path"])
            now = datetime.now(UTC).isoformat()
            for start in range(0, len(rest), 1000):
                chunk = rest[start : start + 1000]
                memory.vector_store.insert(
                    vectors=[v.tolist() for v in vectors[start : start + len(chunk)]],
                    payloads=[
                        {
                            "data": text,
                            "hash": hashlib.md5(text.encode()).hexdigest(),
                            "created_at": now,
                            "updated_at": now,
                            "text_lemmatized": text.lower(),
                            "user_id": user,
                        }
                        for text in chunk
                    ],
                    ids=[str(uuid.uuid4()) for _ in chunk],
                )
        samples = []
        top1 = []
        for query in spec["queries"]:
            begin = time.perf_counter()
            found = memory.search(query, filters={"user_id": user}, top_k=spec["limit"])
            samples.append(time.perf_counter() - begin)
            results = found.get("results", found) if isinstance(found, dict) else found
            top1.append(results[0]["memory"] if results else "")
        json.dump(
            {
                "ingest_seconds": ingest_seconds,
                "count": api_count,
                "search_seconds": samples,
                "top1": top1,
            },
            sys.stdout,
        )


if __name__ == "__main__":
    main()
