"""What the service kit adds to a unary gRPC call.

Baseline: a bare ``grpc.aio`` server with the same echo handler, called through a plain channel
that sends the same ``x-foredeck-principal`` metadata as the kit's client (the bare server
ignores it), so both sides move the same bytes.

Measured, each against the bare baseline of the same run:

- ``kit``: the kit's server (tracing, request context, one JSON log line and metrics per RPC,
  principal verification, error mapping, health and reflection) called through
  ``open_channel`` (deadline capping, principal and request-id propagation, client spans).
  Tracing is on with no exporter.
- ``kit+otlp``: the same with spans exported over OTLP/gRPC to a collector this benchmark runs
  itself (it accepts and discards every export), sampled parent-based at a 10 % trace-id
  ratio (``ServiceSettings`` has no sampling setting yet, so the standard
  ``OTEL_TRACES_SAMPLER`` variables set it for that run).

Each round measures bare, kit and kit+otlp back to back and takes each setup's ratio to that
round's bare run; the median over ``ROUNDS`` rounds is printed, so a burst of load from other
processes on the machine skews one round rather than the result. Log lines are produced and
formatted as in production, then written to ``/dev/null``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
import grpc.aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from foredeck_kit.channels import open_channel
from foredeck_kit.context import outbound_principal
from foredeck_kit.principal import PRINCIPAL_METADATA_KEY, PrincipalSigner
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import setup_telemetry
from foredeck_testing import echo
from foredeck_testing.server import fresh_keys, running_server

WARMUP = 300
SEQUENTIAL = 3000
CONCURRENT_CALLS = 4000
CONCURRENCY = 32
ROUNDS = 5
SAMPLER = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}

Call = Callable[[echo.Message], Awaitable[Any]]


@dataclass
class Figures:
    """One setup's figures in one round."""

    latencies: list[float]
    throughput: float
    cpu_per_call: float
    """Process CPU seconds per call during the throughput phase (client and server together)."""

    @property
    def p50(self) -> float:
        return _pct(self.latencies, 50)

    @property
    def p99(self) -> float:
        return _pct(self.latencies, 99)


async def _echo(request: echo.Message, context: Any) -> echo.Message:
    return echo.Message(value=request.value)


async def _measure(call: Call) -> Figures:
    request = echo.Message(value="x" * 64)
    for _ in range(WARMUP):
        await call(request)
    samples = []
    for _ in range(SEQUENTIAL):
        start = time.perf_counter()
        await call(request)
        samples.append(time.perf_counter() - start)

    remaining = CONCURRENT_CALLS

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(request)

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return Figures(samples, CONCURRENT_CALLS / elapsed, cpu / CONCURRENT_CALLS)


def _pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1] * 1000


def _token() -> str:
    keys = fresh_keys()
    return PrincipalSigner(keys, next(iter(keys))).mint(tenant_id="bench", user_id="bench")


async def _bare() -> Figures:
    server = grpc.aio.server()
    echo.register({"Echo": echo.unary(_echo)})(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    metadata = ((PRINCIPAL_METADATA_KEY, _token()),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo_call = echo.unary_call(channel, "Echo")

            def call(request: echo.Message) -> Any:
                return echo_call(request, metadata=metadata, timeout=5.0)

            return await _measure(call)
    finally:
        await server.stop(None)


class _DiscardingCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that accepts every export and keeps nothing."""

    def __init__(self) -> None:
        self.exports = 0

    def Export(self, request: Any, context: Any) -> Any:
        self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def _collector() -> Iterator[tuple[str, _DiscardingCollector]]:
    # A thread-pool server keeps the collector's work off the event loop being measured.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _DiscardingCollector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def _kit(devnull: TextIO, otlp_endpoint: str | None) -> Figures:
    settings = ServiceSettings(metrics_port=-1)
    if otlp_endpoint is None:
        telemetry = setup_telemetry(
            "bench", settings, environ={}, set_global=False, log_stream=devnull
        )
    else:
        # The exporter and the sampler read the standard variables from the process environment.
        with _environment(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                **SAMPLER,
            }
        ):
            telemetry = setup_telemetry("bench", settings, set_global=False, log_stream=devnull)
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
                    return await _measure(echo.unary_call(channel, "Echo"))
            finally:
                await channel.close(None)
    finally:
        telemetry.shutdown()


METRICS: list[tuple[str, Callable[[Figures], float]]] = [
    ("unary p50 (ms)", lambda f: f.p50),
    ("unary p99 (ms)", lambda f: f.p99),
    ("calls/s", lambda f: f.throughput),
    ("CPU per call (us)", lambda f: f.cpu_per_call * 1e6),
]


async def run() -> None:
    """Measure the three setups and print p50/p99 latency, throughput, CPU and the ratios."""
    rounds: list[dict[str, Figures]] = []
    # Log lines are produced and formatted as in production, then discarded.
    with (
        open(os.devnull, "w") as devnull,  # noqa: ASYNC230 - opening /dev/null does not block
        _collector() as (endpoint, collector),
    ):
        for _ in range(ROUNDS):
            rounds.append(
                {
                    "bare": await _bare(),
                    "kit": await _kit(devnull, None),
                    "kit+otlp": await _kit(devnull, endpoint),
                }
            )
        exports = collector.exports

    print(
        "\nkit overhead: kit server + channel vs bare grpc.aio with the same principal header"
        f"\n(same process; {ROUNDS} rounds, each measuring bare, kit and kit+otlp back to back;"
        "\nfigures are medians over the rounds, ratios the median of each round's ratio to"
        f"\nits own bare run; {CONCURRENCY} calls in flight for calls/s)"
    )
    print(f"{'metric':<22}{'bare':>10}{'kit':>10}{'ratio':>8}{'kit+otlp':>10}{'ratio':>8}")
    for name, value in METRICS:
        line = f"{name:<22}{statistics.median(value(r['bare']) for r in rounds):>10.3f}"
        for key in ("kit", "kit+otlp"):
            figure = statistics.median(value(r[key]) for r in rounds)
            ratio = statistics.median(value(r[key]) / value(r["bare"]) for r in rounds)
            line += f"{figure:>10.3f}{ratio:>7.2f}x"
        print(line)
    print(f"OTLP exports received by the collector: {exports}")
