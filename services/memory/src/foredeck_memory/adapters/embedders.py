"""Embedders: the local MiniLM model (the default) and an embedding model through llmrouter."""

from __future__ import annotations

from collections.abc import Sequence

from foredeck_embeddings import AsyncEmbedder, MiniLmEmbedder
from foredeck_memory.clients import LlmRouterClient


class LocalEmbedder:
    """all-MiniLM-L6-v2 int8 ONNX on onnxruntime, batched on one worker thread."""

    def __init__(self, *, batch_size: int = 32, threads: int = 1) -> None:
        self._model = MiniLmEmbedder(batch_size=batch_size, threads=threads)
        self._async = AsyncEmbedder(self._model)

    @property
    def model_id(self) -> str:
        return self._model.model_id

    @property
    def dimensions(self) -> int:
        return self._model.dimensions

    def count_tokens(self, text: str) -> int:
        """Word pieces in ``text``, without truncation."""
        return self._model.count_tokens(text)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = await self._async.embed(list(texts))
        return [row.tolist() for row in vectors]

    def close(self) -> None:
        self._async.close()


class RouterEmbedder:
    """An embedding model served by llmrouter's Embed RPC."""

    def __init__(self, client: LlmRouterClient, model: str, dimensions: int) -> None:
        self._client = client
        self._model = model
        self._dimensions = dimensions

    @property
    def model_id(self) -> str:
        return self._model

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return await self._client.embed(self._model, list(texts), self._dimensions)
