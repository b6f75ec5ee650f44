"""Fixtures: the tool runner on a real gRPC server with a real Redis and the real sandbox."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as svc_grpc
from foredeck_kit.approval import ApprovalTokenSigner, ApprovalTokenVerifier
from foredeck_kit.metrics import Metrics
from foredeck_kit.telemetry import Telemetry
from foredeck_testing.server import RunningServer, running_server
from foredeck_toolrunner.adapters.sandbox import Sandbox, SandboxCapabilities, probe
from foredeck_toolrunner.config import ToolRunnerSettings
from foredeck_toolrunner.errors import DOMAIN
from foredeck_toolrunner.server import SERVICE_NAMES, Deps, ToolRunnerService

if TYPE_CHECKING:
    from foredeck.toolrunner.v1.toolrunner_service_pb2_grpc import (
        ToolRegistryServiceAsyncStub,
        ToolRunnerServiceAsyncStub,
    )


DELEGATION_KEYS = {"orchestrator-test": b"d" * 48}
"""The orchestrator's delegation keys as the tests' runner knows them."""


def approval_signer() -> ApprovalTokenSigner:
    """Mints approval tokens the test runner accepts."""
    return ApprovalTokenSigner(DELEGATION_KEYS, "orchestrator-test")


@dataclass
class Runner:
    """A running tool runner: stubs, principals and the service's parts."""

    server: RunningServer
    service: ToolRunnerService
    registry: ToolRegistryServiceAsyncStub
    runner: ToolRunnerServiceAsyncStub
    spans: InMemorySpanExporter

    def md(
        self, *permissions: str, tenant: str = "tenant-a", user: str = "user-a"
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata with a principal holding ``permissions`` (all when none given)."""
        return self.server.mint(tenant, user, permissions or ("*",))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sandbox_capabilities() -> SandboxCapabilities:
    """What isolation this host offers, probed once."""
    return await probe()


@pytest_asyncio.fixture
async def toolrunner(
    redis_url: str, sandbox_capabilities: SandboxCapabilities
) -> AsyncIterator[Runner]:
    """The tool runner serving on a free port, its Redis database empty."""
    async with _serve(redis_url, sandbox_capabilities) as runner:
        yield runner


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def process_capabilities() -> SandboxCapabilities:
    """The process sandbox (no bubblewrap), as a host without bubblewrap would have it."""
    return await probe("process")


@pytest_asyncio.fixture
async def process_toolrunner(
    redis_url: str, process_capabilities: SandboxCapabilities
) -> AsyncIterator[Runner]:
    """The tool runner forced onto its process sandbox."""
    async with _serve(redis_url, process_capabilities) as runner:
        yield runner


@contextlib.asynccontextmanager
async def _serve(
    redis_url: str, sandbox_capabilities: SandboxCapabilities
) -> AsyncIterator[Runner]:
    """The runner on a free port with the given sandbox, torn down after the block."""
    settings = ToolRunnerSettings(redis_url=redis_url, grace_period_seconds=1.0, metrics_port=-1)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = Metrics()
    deps = Deps(
        redis=Redis.from_url(redis_url),
        sandbox=Sandbox(sandbox_capabilities, uid_base=420_000, max_concurrent=16, pool_size=2),
        telemetry=Telemetry(service_name="toolrunner", metrics=metrics, tracer_provider=provider),
        metrics=metrics,
        approval_verifier=ApprovalTokenVerifier(DELEGATION_KEYS, reason="APPROVAL_INVALID"),
    )
    service = ToolRunnerService(settings, deps)
    try:
        async with running_server(
            service.register,
            service_names=SERVICE_NAMES,
            domain=DOMAIN,
            settings=settings,
            readiness=service.readiness,
        ) as server:
            yield Runner(
                server,
                service,
                svc_grpc.ToolRegistryServiceStub(server.channel),
                svc_grpc.ToolRunnerServiceStub(server.channel),
                spans,
            )
    finally:
        await service.close()
        provider.shutdown()


@pytest.fixture
def bubblewrap(sandbox_capabilities: SandboxCapabilities) -> SandboxCapabilities:
    """Skip without bubblewrap; fail when it is installed but the sandbox cannot use it.

    ``make setup`` installs it when run as root, so on CI a broken bubblewrap sandbox fails
    the escape suite instead of quietly skipping it.
    """
    if sandbox_capabilities.kind != "bubblewrap":
        if shutil.which("bwrap") is not None:
            pytest.fail(f"bubblewrap is installed but unusable: {sandbox_capabilities.notes}")
        pytest.skip("bubblewrap is not installed")
    return sandbox_capabilities
