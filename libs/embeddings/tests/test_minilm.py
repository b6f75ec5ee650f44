"""The local embedder against the real int8 ONNX model and tokenizer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from foredeck_embeddings import DIMENSIONS, MAX_TOKENS, AsyncEmbedder, MiniLmEmbedder


@pytest.fixture(scope="module")
def embedder() -> MiniLmEmbedder:
    return MiniLmEmbedder(batch_size=4)


def test_vectors_are_unit_length_and_in_input_order(embedder: MiniLmEmbedder) -> None:
    texts = ["a much longer sentence about the weather in Lisbon in spring", "hi", "cats"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, DIMENSIONS)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Batched and sorted internally, yet each row is the vector of its own text.
    for text, row in zip(texts, vectors, strict=True):
        np.testing.assert_allclose(embedder.embed([text])[0], row, atol=1e-4)


def test_related_sentences_are_closer_than_unrelated_ones(embedder: MiniLmEmbedder) -> None:
    query, related, unrelated = embedder.embed(
        [
            "Where does Alice work?",
            "Alice is employed as an engineer at a shipping company.",
            "The recipe needs two cups of flour and an egg.",
        ]
    )
    assert float(query @ related) > float(query @ unrelated) + 0.2


def test_empty_input_and_long_input(embedder: MiniLmEmbedder) -> None:
    assert embedder.embed([]).shape == (0, DIMENSIONS)
    long_text = "word " * 2000
    assert embedder.count_tokens(long_text) > MAX_TOKENS
    vector = embedder.embed([long_text])
    assert np.isfinite(vector).all()
    with pytest.raises(TypeError):
        embedder.embed("not a list")


async def test_async_embedder_runs_off_the_loop_and_keeps_results_apart(
    embedder: MiniLmEmbedder,
) -> None:
    async_embedder = AsyncEmbedder(embedder, max_pending=8)
    try:
        first, second = await asyncio.gather(
            async_embedder.embed(["first text"]), async_embedder.embed(["second text", "third"])
        )
        assert first.shape == (1, DIMENSIONS)
        assert second.shape == (2, DIMENSIONS)
        np.testing.assert_allclose(first[0], embedder.embed(["first text"])[0], atol=1e-5)
    finally:
        async_embedder.close()
