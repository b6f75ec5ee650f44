"""Typed wrapper over llmrouter's stub: summaries (Generate) and remote embeddings (Embed).

llmrouter's errors are never forwarded as they are: each is mapped to memory's own reason
(SUMMARIZATION_FAILED / SUMMARIZATION_REJECTED / EMBEDDING_FAILED) with llmrouter's reason kept
in ``upstreamReason``. Deadlines are capped by the inbound call through the kit's channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc

from foredeck.common.v1 import chat_pb2
from foredeck.llmrouter.v1 import generation_pb2, llmrouter_service_pb2, llmrouter_service_pb2_grpc
from foredeck_kit.errors import error_details
from foredeck_memory.domain.errors import Fault, FaultKind

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


@dataclass(frozen=True)
class GeneratedText:
    """A summary written by llmrouter, with the model that wrote it and what it consumed."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int


class LlmRouterClient:
    """Calls llmrouter for the memory service."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 60.0) -> None:
        self._stub = llmrouter_service_pb2_grpc.LlmRouterServiceStub(channel)
        self._timeout = timeout

    async def summarise(
        self, model: str, system_prompt: str, transcript: str, max_tokens: int, request_id: str
    ) -> GeneratedText:
        """Ask ``model`` for a summary of ``transcript`` no longer than ``max_tokens``."""
        request = llmrouter_service_pb2.GenerateRequest(
            model=model,
            system_prompt=system_prompt,
            messages=[
                chat_pb2.ChatMessage(
                    role=chat_pb2.ROLE_USER,
                    parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=transcript))],
                )
            ],
            sampling=generation_pb2.SamplingParams(max_output_tokens=max_tokens, temperature=0.0),
            request_id=request_id,
        )
        try:
            reply = await self._stub.Generate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise _summary_fault(model, err) from err
        text = "".join(
            part.text.text for part in reply.message.parts if part.WhichOneof("part") == "text"
        ).strip()
        if not text:
            raise Fault(
                FaultKind.UNAVAILABLE,
                "SUMMARIZATION_FAILED",
                "summarisation produced no text",
                metadata={"model": model},
                retry_after=timedelta(seconds=1),
            )
        return GeneratedText(
            text=text,
            model=reply.model or model,
            input_tokens=reply.usage.input_tokens,
            output_tokens=reply.usage.output_tokens,
        )

    async def embed(self, model: str, texts: list[str], dimensions: int) -> list[list[float]]:
        """Embed ``texts`` with ``model`` through llmrouter."""
        request = llmrouter_service_pb2.EmbedRequest(
            model=model, texts=texts, dimensions=dimensions, truncate=True
        )
        try:
            reply = await self._stub.Embed(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            details = error_details(err)
            metadata = {"embeddingModel": model}
            if details.reason:
                metadata["upstreamReason"] = details.reason
            raise Fault(
                FaultKind.UNAVAILABLE,
                "EMBEDDING_FAILED",
                "embedding failed",
                metadata=metadata,
                retry_after=details.retry_after or timedelta(seconds=1),
            ) from err
        ordered = sorted(reply.embeddings, key=lambda e: e.index)
        return [list(e.values) for e in ordered]


def _summary_fault(model: str, err: grpc.aio.AioRpcError) -> Fault:
    details = error_details(err)
    metadata = {"model": model}
    if details.reason:
        metadata["upstreamReason"] = details.reason
    if err.code() in _RETRYABLE:
        return Fault(
            FaultKind.UNAVAILABLE,
            "SUMMARIZATION_FAILED",
            "summarisation failed",
            metadata=metadata,
            retry_after=details.retry_after or timedelta(seconds=1),
        )
    return Fault(
        FaultKind.PRECONDITION,
        "SUMMARIZATION_REJECTED",
        "summarisation was refused",
        metadata=metadata,
    )
