"""What the tool runner's sandbox costs a `python` tool call.

Baseline: spawning the same interpreter bare (``python3 -c pass``) and waiting for it, measured
in the same run; also ``python3 -I -S -c pass``, the interpreter start the sandbox itself uses
(no site packages), which is the fairer floor. Measured: ``Sandbox.run`` of an empty snippet (a
fresh bubblewrap or process sandbox with namespaces, rlimits, the seccomp filter, the uid
switch, the launcher and its report), started on demand and taken from the pool of sandboxes
started ahead of need (each still serves one call only; its replacement starts in the
background, competing for the same cores), and a full ``ExecuteTool`` of the ``python``
built-in through the real server (gRPC, principal check, Redis ledger, pool) on a real Redis.
Throughput: sandboxed calls completed per second with 4 in flight, on this machine's cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis

from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as svc_grpc
from foredeck_kit.logs import configure_logging
from foredeck_kit.metrics import Metrics
from foredeck_stack.stores import RedisProcess
from foredeck_testing.server import running_server
from foredeck_toolrunner.adapters.sandbox import Sandbox, SandboxLimits, SandboxSpec, probe
from foredeck_toolrunner.config import ToolRunnerSettings
from foredeck_toolrunner.errors import DOMAIN
from foredeck_toolrunner.server import SERVICE_NAMES, Deps, ToolRunnerService

WARMUP = 10
SEQUENTIAL = 200
CONCURRENT_CALLS = 200
CONCURRENCY = 4


async def _samples(call: Callable[[], Awaitable[None]], count: int) -> list[float]:
    for _ in range(WARMUP):
        await call()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def _throughput(call: Callable[[], Awaitable[None]]) -> float:
    remaining = CONCURRENT_CALLS

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return CONCURRENT_CALLS / (time.perf_counter() - start)


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run() -> None:
    """Print p50/p99 of a bare spawn, a sandboxed call and a full ExecuteTool, and throughput."""
    configure_logging("toolrunner-bench", level="warning", fmt="console")
    capabilities = await probe()
    python = capabilities.python

    async def bare() -> None:
        process = await asyncio.create_subprocess_exec(python, "-c", "pass")
        await process.wait()

    async def bare_isolated() -> None:
        process = await asyncio.create_subprocess_exec(python, "-I", "-S", "-c", "pass")
        await process.wait()

    cold = Sandbox(capabilities, uid_base=420_000, max_concurrent=CONCURRENCY * 2)
    sandbox = Sandbox(
        capabilities, uid_base=420_100, max_concurrent=CONCURRENCY * 4, pool_size=CONCURRENCY
    )
    spec = SandboxSpec(limits=SandboxLimits(512 << 20, 10, 16, 64, 16 << 20))
    payload = json.dumps({"code": "pass", "arguments": {}}).encode()

    async def started_on_demand() -> None:
        result = await cold.run(spec, payload, time_limit=30, max_output=1 << 20)
        assert result.exit_code == 0, result.stderr_tail

    async def sandboxed() -> None:
        result = await sandbox.run(spec, payload, time_limit=30, max_output=1 << 20)
        assert result.exit_code == 0, result.stderr_tail

    rows = [("bare python3 -c pass", await _samples(bare, SEQUENTIAL), await _throughput(bare))]
    rows.append(
        (
            "bare python3 -I -S -c pass",
            await _samples(bare_isolated, SEQUENTIAL),
            await _throughput(bare_isolated),
        )
    )
    rows.append(
        (
            f"Sandbox.run ({capabilities.kind}, on demand)",
            await _samples(started_on_demand, SEQUENTIAL),
            await _throughput(started_on_demand),
        )
    )
    await sandbox.warm(spec)
    rows.append(
        (
            f"Sandbox.run ({capabilities.kind}, pool of {CONCURRENCY})",
            await _samples(sandboxed, SEQUENTIAL),
            await _throughput(sandboxed),
        )
    )

    with tempfile.TemporaryDirectory() as data:
        async with RedisProcess(Path(data)) as redis_process:
            settings = ToolRunnerSettings(redis_url=redis_process.url, metrics_port=-1)
            deps = Deps(redis=Redis.from_url(redis_process.url), sandbox=sandbox, metrics=Metrics())
            service = ToolRunnerService(settings, deps)
            try:
                async with running_server(
                    service.register,
                    service_names=SERVICE_NAMES,
                    domain=DOMAIN,
                    settings=settings,
                    readiness=service.readiness,
                ) as server:
                    stub = svc_grpc.ToolRunnerServiceStub(server.channel)
                    metadata = server.mint("bench", "bench", ["tools:python"])

                    async def execute() -> None:
                        reply = await stub.ExecuteTool(
                            svc.ExecuteToolRequest(
                                tool_name="python",
                                arguments_json='{"code": "pass"}',
                                idempotency_key=uuid.uuid4().hex,
                            ),
                            metadata=metadata,
                            timeout=60,
                        )
                        assert reply.outcome.WhichOneof("outcome") == "output", reply.outcome

                    rows.append(
                        (
                            "ExecuteTool python (gRPC + Redis)",
                            await _samples(execute, SEQUENTIAL),
                            await _throughput(execute),
                        )
                    )
            finally:
                await service.close()
    await cold.close()

    base = statistics.median(rows[0][1])
    print(
        f"\ntool runner sandbox ({os.cpu_count()} cores, {SEQUENTIAL} sequential calls, "
        f"{CONCURRENT_CALLS} calls at {CONCURRENCY} in flight)"
    )
    print(f"{'':42} {'p50 ms':>8} {'p99 ms':>8} {'x bare p50':>11} {'calls/s':>9}")
    for name, samples, rate in rows:
        print(
            f"{name:42} {_pct(samples, 0.5):8.1f} {_pct(samples, 0.99):8.1f} "
            f"{statistics.median(samples) / base:11.2f} {rate:9.1f}"
        )
