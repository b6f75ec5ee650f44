"""Local embeddings: all-MiniLM-L6-v2 through the shared `foredeck_embeddings` library."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from foredeck_embeddings import AsyncEmbedder, MiniLmEmbedder
from foredeck_llmrouter.domain.errors import Failure, ProviderFailure
from foredeck_llmrouter.domain.model import EmbeddingResult, Usage


class LocalEmbeddings:
    """`EmbeddingProvider` for the embedded MiniLM model, loaded off the event loop."""

    def __init__(self, *, threads: int = 1, max_pending: int = 64) -> None:
        self._threads = threads
        self._max_pending = max_pending
        self._embedder: AsyncEmbedder | None = None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._embedder is not None

    async def load(self) -> None:
        """Load the ONNX model and tokenizer on a worker thread (once)."""
        if self._embedder is None:
            threads = self._threads
            embedder = await asyncio.to_thread(lambda: MiniLmEmbedder(threads=threads))
            self._embedder = AsyncEmbedder(embedder, max_pending=self._max_pending)

    def close(self) -> None:
        """Stop the worker thread."""
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None

    async def embed(
        self, provider_model: str, texts: Sequence[str], dimensions: int, time_limit: float
    ) -> EmbeddingResult:
        """Unit vectors of 384 floats, in input order."""
        embedder = self._embedder
        if embedder is None:
            raise ProviderFailure(Failure.UNAVAILABLE, upstream_status=503)
        try:
            vectors = await embedder.embed(texts)
        except RuntimeError:
            raise ProviderFailure(
                Failure.RATE_LIMITED, upstream_status=429, retry_after=0.5
            ) from None
        tokens = sum(embedder.embedder.count_tokens(t) for t in texts)
        return EmbeddingResult(
            vectors=[row.tolist() for row in vectors], usage=Usage(input_tokens=tokens)
        )
