"""Local sentence embeddings: all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, no torch.

Shared by every service that embeds text locally (the llmrouter's Embed RPC, memory's
long-term store), so both produce the same vectors for the same text.
"""

from foredeck_embeddings.minilm import (
    DIMENSIONS,
    MAX_TOKENS,
    MODEL_ID,
    AsyncEmbedder,
    MiniLmEmbedder,
    default_model_path,
    default_tokenizer_path,
)

__all__ = [
    "DIMENSIONS",
    "MAX_TOKENS",
    "MODEL_ID",
    "AsyncEmbedder",
    "MiniLmEmbedder",
    "default_model_path",
    "default_tokenizer_path",
]
