"""Fixtures for the llmrouter tests: a router wired to the scripted provider and real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceStub
from foredeck_kit.errors import domain_for
from foredeck_kit.telemetry import Telemetry
from foredeck_llmrouter.config import LlmRouterSettings
from foredeck_llmrouter.server import RouterDeps, RouterRuntime
from foredeck_llmrouter.servicer import SERVICE_NAME
from foredeck_testing.provider import ScriptedProvider
from foredeck_testing.server import RunningServer, running_server

if TYPE_CHECKING:
    from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceAsyncStub

    RouterFactory = Callable[
        ..., AbstractAsyncContextManager[tuple[RunningServer, LlmRouterServiceAsyncStub]]
    ]


def scripted_settings(
    provider: ScriptedProvider, redis_url: str, **overrides: Any
) -> LlmRouterSettings:
    """Settings pointing both API providers at the scripted provider, local models off."""
    values: dict[str, Any] = {
        "anthropic_api_key": "test-key",
        "anthropic_base_url": provider.anthropic_base_url,
        "openai_api_key": "test-key",
        "openai_base_url": provider.openai_base_url,
        "redis_url": redis_url,
        "local_enabled": False,
        "local_embeddings_enabled": False,
        "retry_base_delay_seconds": 0.001,
        "retry_max_delay_seconds": 0.005,
        "grace_period_seconds": 1.0,
    }
    values.update(overrides)
    return LlmRouterSettings(**values)


@asynccontextmanager
async def start_router(
    settings: LlmRouterSettings,
    deps: RouterDeps | None = None,
    keys: dict[str, bytes] | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[tuple[RunningServer, LlmRouterServiceAsyncStub]]:
    """A real router server on a free port, with the same wiring `build_server` uses."""
    runtime = RouterRuntime(settings, deps or RouterDeps(telemetry=telemetry))
    await runtime.open()
    try:
        async with running_server(
            runtime.register,
            service_names=[SERVICE_NAME],
            domain=domain_for("llmrouter"),
            settings=settings,
            readiness=runtime.readiness,
            keys=keys,
            telemetry=telemetry,
        ) as server:
            yield server, LlmRouterServiceStub(server.channel)
    finally:
        await runtime.close()


@pytest.fixture
def router_factory(scripted_provider: ScriptedProvider, redis_url: str) -> RouterFactory:
    """Start routers against this test's scripted provider and Redis database."""

    def factory(
        *,
        keys: dict[str, bytes] | None = None,
        telemetry: Telemetry | None = None,
        **overrides: Any,
    ) -> AbstractAsyncContextManager[tuple[RunningServer, LlmRouterServiceAsyncStub]]:
        settings = scripted_settings(scripted_provider, redis_url, **overrides)
        return start_router(settings, keys=keys, telemetry=telemetry)

    return factory
