"""pytest fixture for the scripted provider, loaded by :mod:`foredeck_testing.plugin`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from foredeck_testing.provider.server import ScriptedProvider


@pytest.fixture
async def scripted_provider() -> AsyncIterator[ScriptedProvider]:
    """A scripted Anthropic/OpenAI provider server on a free 127.0.0.1 port, closed after use."""
    async with ScriptedProvider() as provider:
        yield provider
