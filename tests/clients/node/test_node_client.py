"""A Node.js client, built from proto/ and stock gRPC packages only, against a real kit server.

The server is the kit's real runtime (interceptors, principal checks, error mapping) serving the
schema-free echo service; ``call_echo.js`` calls it with ``@grpc/grpc-js`` and decodes
``grpc-status-details-bin`` with protobufjs and the vendored ``proto/google/rpc`` files. This is
what a client in another language sees on the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from foredeck_kit.errors import ServiceError
from foredeck_testing.echo import SERVICE_NAME, Context, Message, register, unary
from foredeck_testing.node import node_with_packages
from foredeck_testing.server import RunningServer, running_server

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "call_echo.js"
DOMAIN = "kittest.foredeck.dev"
RETRY_AFTER = timedelta(seconds=2, milliseconds=500)
CALL_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` binary, with this folder's locked packages installed."""
    return node_with_packages(HERE)


async def _echo(request: Message, context: Context) -> Message:
    return Message(value=request.value)


async def _fail(request: Message, context: Context) -> Message:
    raise ServiceError.downstream_unavailable(
        "memory", RETRY_AFTER, upstream_reason="STORE_UNAVAILABLE"
    )


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    handlers = {"Echo": unary(_echo), "Fail": unary(_fail)}
    async with running_server(
        register(handlers), service_names=[SERVICE_NAME], domain=DOMAIN
    ) as srv:
        yield srv


async def _call(node: str, address: str, method: str, principal: str | None) -> dict[str, Any]:
    """Run ``call_echo.js`` against ``address`` and return the JSON object it prints."""
    env = {k: v for k, v in os.environ.items() if k != "FOREDECK_PRINCIPAL"}
    if principal is not None:
        env["FOREDECK_PRINCIPAL"] = principal
    # The server runs in this event loop, so the client must run without blocking it.
    process = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        "--address",
        address,
        "--method",
        method,
        "--value",
        "ahoy",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


async def test_node_client_decodes_error_details(node: str, server: RunningServer) -> None:
    token = server.token()
    echoed, unavailable, anonymous = await asyncio.gather(
        _call(node, server.address, "Echo", token),
        _call(node, server.address, "Fail", token),
        _call(node, server.address, "Fail", None),
    )

    # Every contract in proto/ loads in Node with proto-loader.
    assert "foredeck.llmrouter.v1.LlmRouterService" in echoed["services"]
    assert len(echoed["services"]) >= 5
    assert echoed["ok"] is True
    assert echoed["value"] == "ahoy"

    assert unavailable["ok"] is False
    assert unavailable["codeName"] == "UNAVAILABLE"
    assert unavailable["reason"] == "DOWNSTREAM_UNAVAILABLE"
    assert unavailable["domain"] == DOMAIN
    assert unavailable["errorMetadata"] == {
        "downstream": "memory",
        "upstreamReason": "STORE_UNAVAILABLE",
    }
    assert unavailable["retryDelaySeconds"] == RETRY_AFTER.total_seconds()
    status = unavailable["status"]
    assert status["code"] == unavailable["code"] == 14
    assert status["message"] == unavailable["message"]
    assert [d["type"] for d in status["details"]] == [
        "google.rpc.ErrorInfo",
        "google.rpc.RetryInfo",
    ]

    assert anonymous["ok"] is False
    assert anonymous["codeName"] == "UNAUTHENTICATED"
    assert anonymous["reason"] == "PRINCIPAL_MISSING"
    assert anonymous["domain"] == DOMAIN
    assert anonymous["retryDelaySeconds"] is None
    assert [d["type"] for d in anonymous["status"]["details"]] == ["google.rpc.ErrorInfo"]
