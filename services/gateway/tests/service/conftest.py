"""Fixtures: the gateway on a real gRPC server, real Redis, and the scripted orchestrator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from foredeck_gateway.testing import Gateway, running_gateway


@pytest_asyncio.fixture
async def gateway(redis_url: str) -> AsyncIterator[Gateway]:
    """The gateway on a free port, its Redis database empty, the orchestrator scripted."""
    async with running_gateway(redis_url) as running:
        yield running
