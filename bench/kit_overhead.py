"""What the service kit adds to a unary gRPC call.

Baseline: a bare ``grpc.aio`` server with the same echo handler, called through a plain channel.
Measured: the kit's server (OpenTelemetry, request context + JSON log line + metrics, principal
verification, error mapping, health and reflection) called through ``open_channel`` (deadline
capping, principal and request-id propagation, tracing). Both run in this process, in the same
run, so the ratio holds on a noisy machine even when absolute times drift.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import grpc
import grpc.aio

from foredeck_kit.channels import open_channel
from foredeck_kit.context import outbound_principal
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_testing import echo
from foredeck_testing.server import running_server

WARMUP = 300
SEQUENTIAL = 3000
CONCURRENT_CALLS = 4000
CONCURRENCY = 32


async def _echo(request: echo.Message, context: Any) -> echo.Message:
    return echo.Message(value=request.value)


async def _sequential(call: Callable[[echo.Message], Awaitable[Any]]) -> list[float]:
    request = echo.Message(value="x" * 64)
    for _ in range(WARMUP):
        await call(request)
    samples = []
    for _ in range(SEQUENTIAL):
        start = time.perf_counter()
        await call(request)
        samples.append(time.perf_counter() - start)
    return samples


async def _throughput(call: Callable[[echo.Message], Awaitable[Any]]) -> float:
    request = echo.Message(value="x" * 64)
    remaining = CONCURRENT_CALLS

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(request)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return CONCURRENT_CALLS / (time.perf_counter() - start)


def _pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1] * 1000


async def _bare() -> tuple[list[float], float]:
    server = grpc.aio.server()
    echo.register({"Echo": echo.unary(_echo)})(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = echo.unary_call(channel, "Echo")
            return await _sequential(call), await _throughput(call)
    finally:
        await server.stop(None)


async def _kit(devnull: TextIO) -> tuple[list[float], float]:
    telemetry = setup_telemetry(
        "bench", ServiceSettings(metrics_port=-1), environ={}, set_global=False, log_stream=devnull
    )
    try:
        async with running_server(
            echo.register({"Echo": echo.unary(_echo)}),
            service_names=[echo.SERVICE_NAME],
            domain="bench.foredeck.dev",
            telemetry=telemetry,
        ) as running:
            channel = open_channel(
                running.address, default_timeout=5.0, tracer_provider=telemetry.tracer_provider
            )
            try:
                with outbound_principal(running.token()):
                    call = echo.unary_call(channel, "Echo")
                    return await _sequential(call), await _throughput(call)
            finally:
                await channel.close(None)
    finally:
        telemetry.shutdown()


async def run() -> None:
    """Measure both setups and print p50/p99 latency, throughput and the ratios."""
    bare_lat, bare_tput = await _bare()
    # Log lines are produced and formatted as in production, then discarded.
    with open(os.devnull, "w") as devnull:  # noqa: ASYNC230 - opening /dev/null does not block
        kit_lat, kit_tput = await _kit(devnull)
    rows = [
        ("unary p50 (ms)", _pct(bare_lat, 50), _pct(kit_lat, 50)),
        ("unary p99 (ms)", _pct(bare_lat, 99), _pct(kit_lat, 99)),
        (f"calls/s at {CONCURRENCY} in flight", bare_tput, kit_tput),
    ]
    print("\nkit overhead: kit server + channel vs bare grpc.aio (same process, same run)")
    print(f"{'metric':<28}{'bare':>12}{'kit':>12}{'ratio':>9}")
    for name, bare, kit in rows:
        print(f"{name:<28}{bare:>12.3f}{kit:>12.3f}{kit / bare:>8.2f}x")
