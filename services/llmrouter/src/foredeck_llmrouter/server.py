"""Building the llmrouter server: adapters wired from settings, the servicer, the host.

`build_server(settings, deps)` is what ``main()`` runs; tests open a `RouterRuntime` themselves
and hand its `register` and `readiness` to the kit's test server, so both run the same wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import grpc.aio
import openai
import redis.asyncio as aioredis
from opentelemetry import trace

from foredeck.llmrouter.v1 import llmrouter_service_pb2_grpc
from foredeck_kit.errors import domain_for
from foredeck_kit.logs import get_logger
from foredeck_kit.metrics import Metrics
from foredeck_kit.server import ServiceHost
from foredeck_kit.telemetry import Telemetry
from foredeck_llmrouter.adapters.anthropic_provider import AnthropicProvider
from foredeck_llmrouter.adapters.circuits import CircuitConfig, RedisCircuitStore
from foredeck_llmrouter.adapters.local_embeddings import LocalEmbeddings
from foredeck_llmrouter.adapters.local_provider import (
    LocalModel,
    LocalModelConfig,
    LocalProvider,
    bundled_model_path,
)
from foredeck_llmrouter.adapters.openai_provider import OpenAiProvider
from foredeck_llmrouter.adapters.recorder import RedisResponseRecorder
from foredeck_llmrouter.adapters.telemetry import TelemetryObserver
from foredeck_llmrouter.catalog_config import LOCAL_PROVIDER, build_catalog
from foredeck_llmrouter.config import LlmRouterSettings
from foredeck_llmrouter.domain.catalog import ProviderKind
from foredeck_llmrouter.domain.policy import RetryPolicy
from foredeck_llmrouter.domain.ports import ChatProvider, EmbeddingProvider
from foredeck_llmrouter.domain.router import Router
from foredeck_llmrouter.servicer import SERVICE_NAME, LlmRouterServicer

# A self-hosted server that needs no key still gets one: the openai SDK refuses to start without.
_PLACEHOLDER_KEY = "not-needed"


@dataclass
class RouterDeps:
    """What the router takes from its caller rather than building from settings."""

    telemetry: Telemetry | None = None
    local_model: LocalModel | None = None
    """An already built local model to share (tests load SmolLM2 once for several servers)."""
    local_embeddings: LocalEmbeddings | None = None


class RouterRuntime:
    """The clients, models and router a running service holds; opened in the event loop."""

    def __init__(self, settings: LlmRouterSettings, deps: RouterDeps | None = None) -> None:
        self.settings = settings
        self.deps = deps or RouterDeps()
        self.catalog = build_catalog(settings)
        self.router: Router | None = None
        self.circuits: RedisCircuitStore | None = None
        self.local_model: LocalModel | None = None
        self.local_embeddings: LocalEmbeddings | None = None
        self._redis: aioredis.Redis | None = None
        self._closers: list[Any] = []
        self._loading: list[asyncio.Task[None]] = []
        self._log = get_logger("foredeck.llmrouter")

    async def open(self) -> None:
        """Create the clients and start loading the local models on their threads."""
        s = self.settings
        telemetry = self.deps.telemetry
        metrics = telemetry.metrics if telemetry else Metrics()
        tracer_provider = telemetry.tracer_provider if telemetry else trace.NoOpTracerProvider()
        self._redis = aioredis.Redis.from_url(s.redis_url)
        self.circuits = RedisCircuitStore(
            self._redis,
            CircuitConfig(
                failure_threshold=s.circuit_failure_threshold,
                failure_window=s.circuit_failure_window_seconds,
                cooldown=s.circuit_cooldown_seconds,
                probe_timeout=s.circuit_probe_timeout_seconds,
            ),
        )
        chat: dict[str, ChatProvider] = {}
        embed: dict[str, EmbeddingProvider] = {}
        for spec in self.catalog.providers.values():
            if spec.kind is ProviderKind.ANTHROPIC and spec.credentials_configured:
                key = (
                    s.anthropic_api_key
                    if spec.name == "anthropic"
                    else next(p.api_key for p in s.providers if p.name == spec.name)
                )
                anthropic_client = anthropic.AsyncAnthropic(
                    api_key=key.get_secret_value(),
                    base_url=spec.base_url or None,
                    max_retries=0,
                )
                self._closers.append(anthropic_client.close)
                chat[spec.name] = AnthropicProvider(anthropic_client)
            elif spec.kind in (ProviderKind.OPENAI, ProviderKind.OPENAI_COMPATIBLE):
                if not spec.credentials_configured:
                    continue
                key = (
                    s.openai_api_key
                    if spec.name == "openai"
                    else next(p.api_key for p in s.providers if p.name == spec.name)
                )
                openai_client = openai.AsyncOpenAI(
                    api_key=key.get_secret_value() or _PLACEHOLDER_KEY,
                    base_url=spec.base_url or None,
                    max_retries=0,
                )
                self._closers.append(openai_client.close)
                provider = OpenAiProvider(
                    openai_client, compatible=spec.kind is ProviderKind.OPENAI_COMPATIBLE
                )
                chat[spec.name] = provider
                embed[spec.name] = provider
        if s.local_enabled:
            self.local_model = self.deps.local_model or LocalModel(
                LocalModelConfig(
                    model_path=Path(s.local_model_path)
                    if s.local_model_path
                    else bundled_model_path(),
                    context_tokens=s.local_context_tokens,
                    threads=s.local_threads,
                    queue_limit=s.local_queue_limit,
                )
            )
            chat[LOCAL_PROVIDER] = LocalProvider(self.local_model)
            if self.deps.local_model is None:
                self._closers.append(self.local_model.close)
            self._loading.append(
                asyncio.create_task(self._load(self.local_model.load, "local model"))
            )
        if s.local_embeddings_enabled:
            self.local_embeddings = self.deps.local_embeddings or LocalEmbeddings()
            embed[LOCAL_PROVIDER] = self.local_embeddings
            if self.deps.local_embeddings is None:
                self._closers.append(self.local_embeddings.close)
            self._loading.append(
                asyncio.create_task(self._load(self.local_embeddings.load, "local embeddings"))
            )
        self.router = Router(
            self.catalog,
            chat,
            embed,
            self.circuits,
            RetryPolicy(
                max_attempts=s.retry_max_attempts,
                base_delay=s.retry_base_delay_seconds,
                max_delay=s.retry_max_delay_seconds,
                max_retry_after=s.retry_max_retry_after_seconds,
                attempt_timeout=s.attempt_timeout_seconds,
            ),
            TelemetryObserver(metrics, tracer_provider),
        )

    async def _load(self, load: Any, what: str) -> None:
        try:
            await load()
        except Exception as error:
            self._log.error("model load failed", model=what, error=repr(error))
            raise

    @property
    def servicer(self) -> LlmRouterServicer:
        """The servicer over the opened router."""
        if self.router is None:
            raise RuntimeError("runtime not opened")
        assert self._redis is not None
        return LlmRouterServicer(
            self.router,
            (self.settings.circuit_failure_threshold, self.settings.circuit_failure_window_seconds),
            RedisResponseRecorder(
                self._redis, retention_seconds=self.settings.response_retention_seconds
            ),
        )

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service's handlers to a server."""
        llmrouter_service_pb2_grpc.add_LlmRouterServiceServicer_to_server(self.servicer, server)

    async def readiness(self) -> bool:
        """Ready once Redis answers and the enabled local models are loaded."""
        if self._redis is None:
            return False
        for task in self._loading:
            if task.done() and task.exception() is not None:
                return False
        if self.local_model is not None and not self.local_model.loaded:
            return False
        if self.local_embeddings is not None and not self.local_embeddings.loaded:
            return False
        return bool(await self._redis.ping())

    async def close(self) -> None:
        """Close clients and stop model threads."""
        for task in self._loading:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for closer in reversed(self._closers):
            result = closer()
            if asyncio.iscoroutine(result):
                await result
        self._closers.clear()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


class _RouterHost(ServiceHost):
    """A ServiceHost that opens the runtime before serving and closes it after stopping."""

    def __init__(self, runtime: RouterRuntime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runtime = runtime

    async def start(self) -> int:
        await self._runtime.open()
        return await super().start()

    async def _stop(self, grace: float | None) -> None:
        try:
            await super()._stop(grace)
        finally:
            await self._runtime.close()


def build_server(settings: LlmRouterSettings, deps: RouterDeps | None = None) -> ServiceHost:
    """The llmrouter server, ready to `serve`; nothing opens until it starts."""
    runtime = RouterRuntime(settings, deps)
    telemetry = runtime.deps.telemetry
    return _RouterHost(
        runtime,
        settings=settings,
        domain=domain_for("llmrouter"),
        register=runtime.register,
        service_names=[SERVICE_NAME],
        verifier=settings.principal_verifier(),
        readiness=runtime.readiness,
        telemetry=telemetry,
    )
