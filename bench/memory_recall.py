"""Long-term memory recall: latency at 10k and 100k memories, ingest throughput, and mem0.

What runs, all in one process and one run so the ratios hold on a noisy machine:

- the memory service (real gRPC server, Qdrant Edge in-process, ArcadeDB over Bolt, Redis,
  ONNX MiniLM) — ingest through ``RememberMany`` (batches of 100, dedup on) for the first
  10,000 memories; the rest of the 100k tier is bulk-loaded straight into the same vector store
  with the same embeddings (recall reads only the vectors, and ingesting 90k more through the
  full dedup path would dominate the run);
- the parts of a recall measured alone: embedding one query, one filtered vector search, one
  graph query (a 1-hop neighbourhood);
- mem0 (``mem0ai``, installed by ``make bench`` into its own virtualenv, ``MEM0_PYTHON``) on the
  same texts and queries, with the same embeddings served over its OpenAI embedder interface:
  one mem0 process per vector store grows through the sizes as the service's stores do
  (``add`` for the first 10,000, then its vector store's ``insert`` in large batches for the
  rest), on Qdrant (qdrant-client local mode, the only way mem0 reaches Qdrant without a
  server; a brute-force scan) and on FAISS (a flat index: exact search).

The vectors of the synthetic texts are computed once and kept under
``~/.cache/foredeck-bench/memory``, keyed by a hash of the texts and the model (embedding 100k
texts on one thread takes longer than the rest of the run; the embedding rate is measured on
its own). Each phase prints its wall time as it ends.

Sizes come from ``MEMORY_BENCH_SIZES`` (default ``10000,100000``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from aiohttp import web

from foredeck.common.v1.memory_pb2 import EntityRef
from foredeck.memory.v1 import memory_service_pb2 as ms
from foredeck_memory.adapters.embedders import LocalEmbedder
from foredeck_memory.domain.long_term import current_filter
from foredeck_memory.domain.models import (
    OPEN_END,
    MemoryRecord,
    Provenance,
    Scope,
    dedup_key,
    now_us,
)
from foredeck_memory.server import MemoryDeps
from foredeck_memory.testing import memory_settings, signing_keys, start_memory_server
from foredeck_stack.stores import ArcadeDbProcess, RedisProcess

QUERIES = 200
WARMUP = 20
LIMIT = 5
BATCH = 100
SERVICE_INGEST = 10_000
CACHE_DIR = Path.home() / ".cache" / "foredeck-bench" / "memory"
EMBED_CHUNK = 5_000
BULK_CHUNK = 5_000
TENANT, USER = "bench-tenant", "bench-user"

_FIRST = [
    "Ada",
    "Ben",
    "Cleo",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kai",
    "Lea",
    "Milo",
    "Nia",
    "Omar",
    "Pia",
    "Quin",
    "Rui",
    "Sol",
    "Tara",
]
_LAST = [
    "Abe",
    "Brook",
    "Cruz",
    "Dahl",
    "Eng",
    "Fox",
    "Gray",
    "Holt",
    "Ives",
    "Jain",
    "Kerr",
    "Lund",
    "Moss",
    "Nash",
    "Ortiz",
    "Park",
]
_FACTS = [
    ("{n} works as a {job} in {city}.", "What is {n}'s job?"),
    ("{n}'s favourite food is {food}.", "What does {n} like to eat?"),
    ("{n} is learning to play the {instrument}.", "Which instrument is {n} learning?"),
    ("{n} moved to {city} last spring.", "Where did {n} move to?"),
    ("{n} is allergic to {allergen}.", "What is {n} allergic to?"),
    ("{n} drives a {colour} {car}.", "What car does {n} drive?"),
]
_WORDS = {
    "job": [
        "nurse",
        "pilot",
        "chef",
        "lawyer",
        "welder",
        "teacher",
        "architect",
        "baker",
        "plumber",
        "dentist",
    ],
    "city": [
        "Oslo",
        "Lima",
        "Porto",
        "Kyoto",
        "Quito",
        "Dakar",
        "Perth",
        "Riga",
        "Cork",
        "Tunis",
        "Bergen",
        "Malmo",
    ],
    "food": [
        "ramen",
        "paella",
        "tacos",
        "sushi",
        "lasagne",
        "curry",
        "falafel",
        "pho",
        "risotto",
        "dumplings",
    ],
    "instrument": [
        "cello",
        "violin",
        "banjo",
        "harp",
        "oboe",
        "trumpet",
        "drums",
        "piano",
        "flute",
        "ukulele",
    ],
    "allergen": ["peanuts", "shellfish", "pollen", "gluten", "latex", "penicillin", "dust", "eggs"],
    "colour": ["red", "blue", "green", "black", "white", "silver", "orange"],
    "car": ["hatchback", "pickup", "van", "sedan", "coupe", "roadster"],
}


def make_data(count: int, seed: int = 11) -> tuple[list[str], list[tuple[str, int]]]:
    """Distinct fact sentences and (query, index of the fact it asks about) pairs."""
    rng = random.Random(seed)
    texts: list[str] = []
    asked: list[tuple[str, int]] = []
    seen: set[str] = set()
    while len(texts) < count:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}{rng.randrange(1000)}"
        fact, question = rng.choice(_FACTS)
        values = {key: rng.choice(words) for key, words in _WORDS.items()}
        text = fact.format(n=name, **values)
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        if len(asked) < QUERIES * 4 and rng.random() < 0.5:
            asked.append((question.format(n=name), len(texts) - 1))
    return texts, asked


def embeddings_cache(texts: list[str], model_id: str) -> Path:
    """Where the vectors of exactly these texts under this model are kept between runs."""
    digest = hashlib.sha256(model_id.encode())
    for text in texts:
        digest.update(b"\x00" + text.encode())
    return CACHE_DIR / f"texts-{len(texts)}-{digest.hexdigest()[:24]}.npy"


async def embed_texts(texts: list[str], embedder: LocalEmbedder, out: TextIO) -> np.ndarray:
    """The MiniLM vectors of ``texts``, computed once and then read from the cache.

    The synthetic data are deterministic, so the same texts and model give the same vectors;
    embedding 100k texts on a shared 2-core machine takes longer than everything else the
    benchmark does, and the embedding rate is measured on its own anyway.
    """
    path = embeddings_cache(texts, embedder.model_id)
    if path.exists():
        cached = np.load(path)
        if cached.shape == (len(texts), embedder.dimensions):
            print(f"embeddings of {len(texts)} texts read from {path}", file=out)
            return np.asarray(cached, dtype=np.float32)
    rows: list[np.ndarray] = []
    started = time.perf_counter()
    for start in range(0, len(texts), EMBED_CHUNK):
        more = await embedder.embed(texts[start : start + EMBED_CHUNK])
        rows.append(np.asarray(more, dtype=np.float32))
        done = start + len(more)
        rate = done / (time.perf_counter() - started)
        print(f"  embedded {done}/{len(texts)} texts ({rate:.0f}/s)", file=out, flush=True)
    vectors = np.concatenate(rows) if rows else np.zeros((0, embedder.dimensions), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, vectors)
    partial.replace(path)
    return vectors


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms_(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


class EmbeddingEndpoint:
    """OpenAI's ``/v1/embeddings`` over precomputed MiniLM vectors, for mem0's embedder."""

    def __init__(self, vectors: dict[str, np.ndarray], embedder: LocalEmbedder) -> None:
        self._vectors = vectors
        self._embedder = embedder
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        # Stored texts were embedded once up front (both sides ingest the same vectors); every
        # other input, a query above all, is embedded now, as the service embeds its queries.
        fresh: dict[str, np.ndarray] = {}
        missing = [t for t in inputs if t not in self._vectors]
        if missing:
            for text, row in zip(missing, await self._embedder.embed(missing), strict=True):
                fresh[text] = np.asarray(row, dtype=np.float32)
        data = []
        for index, text in enumerate(inputs):
            vector = self._vectors[text] if text in self._vectors else fresh[text]
            if body.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(vector.tobytes()).decode()
            else:
                encoded = vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", "fake-emb"),
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }
        )

    def add(self, vectors: dict[str, np.ndarray]) -> None:
        """Serve these stored texts' vectors too."""
        self._vectors.update(vectors)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._embed)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def run_mem0(
    python: str,
    endpoint: EmbeddingEndpoint,
    texts: list[str],
    tiers: list[tuple[int, list[str]]],
    store: str,
    all_vectors: np.ndarray,
    workdir: Path,
) -> dict[str, Any]:
    """One mem0 process on ``store`` growing through the tiers, as the service's stores do.

    It adds the first texts through ``add`` (timed: its ingest), bulk-inserts the rest of each
    tier with the precomputed vectors, and times ``search`` at every tier.
    """
    largest = max(size for size, _ in tiers)
    api_count = min(largest, SERVICE_INGEST)
    bulk_path = workdir / f"mem0-bulk-{store}-{largest}.npy"
    np.save(bulk_path, all_vectors[api_count:largest])
    spec = {
        "openai_base_url": endpoint.base_url,
        "vector_store": store,
        "user_id": USER,
        "texts": texts[:largest],
        "api_count": api_count,
        "bulk_vectors_path": str(bulk_path),
        "tiers": [{"size": size, "queries": queries} for size, queries in tiers],
        "limit": LIMIT,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
        path = handle.name
    try:
        process = await asyncio.create_subprocess_exec(
            python,
            str(Path(__file__).with_name("mem0_peer.py")),
            path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "MEM0_TELEMETRY": "False"},
        )
        stdout, stderr = await process.communicate()
    finally:
        os.unlink(path)
        bulk_path.unlink(missing_ok=True)
    if process.returncode != 0:
        raise RuntimeError(f"mem0 run failed: {stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(stdout)
    return result


class Phases:
    """Wall time of each phase, printed as it ends, so a slow run shows where it goes."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._began = time.perf_counter()

    def done(self, name: str, started: float) -> None:
        now = time.perf_counter()
        print(
            f"  [{now - self._began:7.0f} s] {name}: {now - started:.1f} s",
            file=self._out,
            flush=True,
        )


async def run(out: TextIO = sys.stdout) -> None:
    sizes = sorted(int(s) for s in os.environ.get("MEMORY_BENCH_SIZES", "10000,100000").split(","))
    mem0_python = os.environ.get("MEM0_PYTHON", "")
    largest = max(sizes)
    texts, asked = make_data(largest)
    print(f"\nmemory recall benchmark: sizes {sizes}, {QUERIES} queries, top {LIMIT}", file=out)
    phases = Phases(out)

    with tempfile.TemporaryDirectory(prefix="foredeck-bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisProcess(tmp / "redis")
        arcade = ArcadeDbProcess(tmp / "arcade", default_database="memory")
        await redis.start()
        await arcade.start()
        embedder = LocalEmbedder(batch_size=64, threads=1)
        keys = signing_keys()
        settings = memory_settings(
            redis_url=redis.url,
            bolt_uri=arcade.bolt_uri,
            bolt_user=arcade.user,
            bolt_password=arcade.password,
            graph_database="memory",
            edge_path=tmp / "vectors",
            keys=keys,
        )
        server = await start_memory_server(
            settings, MemoryDeps(embedder=embedder, count_tokens=embedder.count_tokens), keys
        )
        endpoint: EmbeddingEndpoint | None = None
        try:

            def auth() -> tuple[tuple[str, str], ...]:
                # A fresh principal per call: they live minutes, the run takes longer.
                return server.as_user(tenant=TENANT, user=USER)

            vectors = server.host.vectors
            graph = server.host.graph
            assert vectors is not None
            assert graph is not None
            scope = Scope(TENANT, USER)

            # Ingest through the service: RememberMany, batches of 100, duplicates checked.
            first = min(SERVICE_INGEST, largest)
            started = time.perf_counter()
            for start in range(0, first, BATCH):
                await server.long_term.RememberMany(
                    ms.RememberManyRequest(
                        request_id=str(uuid.uuid4()),
                        items=[ms.RememberItem(content=t) for t in texts[start : start + BATCH]],
                    ),
                    metadata=auth(),
                    timeout=120,
                )
            ingest = time.perf_counter() - started
            phases.done("service ingest", started)
            print(
                f"ingest via RememberMany (batch {BATCH}, dedup on): {first} memories in "
                f"{ingest:.1f} s = {first / ingest:.0f} memories/s",
                file=out,
            )

            started = time.perf_counter()
            sample = await embedder.embed(texts[:1000])
            embed_rate = len(sample) / (time.perf_counter() - started)
            print(f"embedding alone (batched): {embed_rate:.0f} texts/s", file=out)

            # The vectors of every text, shared by the bulk load and by mem0 (cached on disk).
            started = time.perf_counter()
            all_vectors = await embed_texts(texts, embedder, out)
            phases.done("embeddings of the texts", started)

            # A small graph so the graph part can be measured alone.
            await server.entities.UpsertRelationships(
                ms.UpsertRelationshipsRequest(
                    request_id=str(uuid.uuid4()),
                    create_missing_entities=True,
                    relationships=[
                        ms.RelationshipUpsert(
                            source=EntityRef(type="Person", entity_id="ada"),
                            type="KNOWS",
                            target=EntityRef(type="Person", entity_id=f"p{i}"),
                        )
                        for i in range(20)
                    ],
                ),
                metadata=auth(),
            )

            loaded = first
            rows: list[dict[str, Any]] = []
            tiers: list[tuple[int, list[tuple[str, int]]]] = []
            for size in sizes:
                started = time.perf_counter()
                while loaded < size:
                    chunk_end = min(size, loaded + BULK_CHUNK)
                    at = now_us()
                    items = []
                    for index in range(loaded, chunk_end):
                        text = texts[index]
                        memory_id = str(uuid.uuid4())
                        record = MemoryRecord(
                            memory_id=memory_id,
                            chain_id=memory_id,
                            content=text,
                            category="fact",
                            metadata={},
                            provenance=Provenance(TENANT, USER),
                            valid_from=at,
                            valid_to=OPEN_END,
                            dedup_key=dedup_key("fact", text),
                            embedding_model=embedder.model_id,
                            create_time=at,
                            update_time=at,
                        )
                        items.append((record, all_vectors[index].tolist()))
                    await vectors.upsert(scope, items)
                    loaded = chunk_end
                phases.done(f"bulk load to {size}", started)
                started = time.perf_counter()
                optimize = getattr(vectors, "optimize", None)
                if optimize is not None:
                    # Build the HNSW index before timing, as a long-running service would have.
                    await optimize()
                phases.done(f"vector index at {size}", started)
                chosen = [(q, i) for q, i in asked if i < size][:QUERIES]
                queries = [q for q, _ in chosen]
                tiers.append((size, chosen))

                started = time.perf_counter()
                for q in queries[:WARMUP]:
                    await server.long_term.Recall(
                        ms.RecallRequest(query=q, limit=LIMIT), metadata=auth()
                    )
                recall: list[float] = []
                hits = 0
                firsts = 0
                for q, index in chosen:
                    begin = time.perf_counter()
                    reply = await server.long_term.Recall(
                        ms.RecallRequest(query=q, limit=LIMIT), metadata=auth()
                    )
                    recall.append(time.perf_counter() - begin)
                    found = [m.memory.content for m in reply.memories]
                    hits += texts[index] in found
                    firsts += bool(found) and found[0] == texts[index]

                embed_alone: list[float] = []
                vector_alone: list[float] = []
                graph_alone: list[float] = []
                for q in queries:
                    begin = time.perf_counter()
                    [qv] = await embedder.embed([q])
                    embed_alone.append(time.perf_counter() - begin)
                    begin = time.perf_counter()
                    await vectors.search(scope, qv, LIMIT, current_filter(now_us()), None)
                    vector_alone.append(time.perf_counter() - begin)
                    begin = time.perf_counter()
                    await graph.neighbourhood(TENANT, "Person", "ada", 1, [], "BOTH", 50, now_us())
                    graph_alone.append(time.perf_counter() - begin)
                phases.done(f"service recall and parts at {size}", started)

                rows.append(
                    {
                        "size": size,
                        "recall": recall,
                        "hit_at_5": hits / len(chosen),
                        "top1": firsts / len(chosen),
                        "embed": embed_alone,
                        "vector": vector_alone,
                        "graph": graph_alone,
                        "ingest_per_s": first / ingest,
                    }
                )

            if mem0_python:
                endpoint = EmbeddingEndpoint(
                    {t: all_vectors[i] for i, t in enumerate(texts)}, embedder
                )
                await endpoint.start()
                for store in ("qdrant", "faiss"):
                    started = time.perf_counter()
                    peer = await run_mem0(
                        mem0_python,
                        endpoint,
                        texts,
                        [(size, [q for q, _ in chosen]) for size, chosen in tiers],
                        store,
                        all_vectors,
                        tmp,
                    )
                    phases.done(
                        f"mem0 on {store} (add {peer['ingest_seconds']:.0f} s, "
                        f"bulk insert {peer['bulk_seconds']:.0f} s)",
                        started,
                    )
                    for (size, chosen), tier in zip(tiers, peer["tiers"], strict=True):
                        row = next(r for r in rows if r["size"] == size)
                        row[f"mem0-{store}"] = {
                            "search_seconds": tier["search_seconds"],
                            "ingest_seconds": peer["ingest_seconds"],
                            "count": peer["count"],
                        }
                        row[f"mem0-{store}-top1"] = sum(
                            texts[index] == top
                            for (_, index), top in zip(chosen, tier["top1"], strict=True)
                        ) / len(chosen)
            for row in rows:
                report(row, out)
        finally:
            await server.stop()
            if endpoint is not None:
                await endpoint.stop()
            embedder.close()
            await arcade.stop()
            await redis.stop()


def report(row: dict[str, Any], out: TextIO) -> None:
    size = row["size"]
    recall = row["recall"]
    p50, p95 = percentile(recall, 50), percentile(recall, 95)
    parts = {k: percentile(row[k], 95) for k in ("embed", "vector", "graph")}
    print(f"\n-- {size:,} memories --", file=out)
    print(f"{'':34} {'p50 ms':>8} {'p95 ms':>8}", file=out)
    print(f"{'service Recall (gRPC)':34} {ms_(p50)} {ms_(p95)}", file=out)
    for name in ("embed", "vector", "graph"):
        samples = row[name]
        print(
            f"{'  alone: ' + name:34} {ms_(percentile(samples, 50))} {ms_(parts[name])}", file=out
        )
    total = sum(parts.values())
    print(
        f"recall p95 / sum of parts' p95 (embed+vector+graph) = {p95 / total:.2f} "
        f"(goal <= 2); without the graph part = {p95 / (parts['embed'] + parts['vector']):.2f}",
        file=out,
    )
    print(
        f"service: the asked fact in the top 5 {row['hit_at_5']:.2f}, first {row['top1']:.2f}",
        file=out,
    )
    for key in ("mem0-qdrant", "mem0-faiss"):
        if key not in row:
            continue
        peer = row[key]
        samples = peer["search_seconds"]
        m50, m95 = percentile(samples, 50), percentile(samples, 95)
        print(
            f"{key + ' search':34} {ms_(m50)} {ms_(m95)}   "
            f"ingest {peer['count'] / peer['ingest_seconds']:.0f} memories/s, "
            f"top1 {row[key + '-top1']:.2f}",
            file=out,
        )
        print(
            f"  service p95 / {key} p95 = {p95 / m95:.3f} (goal <= 0.5)",
            file=out,
        )


if __name__ == "__main__":
    asyncio.run(run())
