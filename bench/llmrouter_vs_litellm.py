"""The llmrouter against the LiteLLM proxy, both in front of the same fast fake upstream.

Everything runs on this machine in one run: the scripted provider (``--no-record``) as the
OpenAI-compatible upstream, the router and LiteLLM as separate processes, and the load generator
here. Figures:

- added latency at 1 request in flight: p50/p99 through each proxy minus the same percentile of
  a direct HTTP call to the upstream;
- throughput per core: requests per CPU-second of the proxy process, at the highest concurrency
  whose p99 added latency is at most 50 ms with zero errors;
- streaming added time to first token (p99).

The floor is what any gRPC hop costs: one bare grpc.aio echo round trip plus one direct HTTP
call. LiteLLM comes from its own virtual environment (``$LITELLM_VENV``, by default
``~/.cache/foredeck-bench/litellm-venv``, installed by ``make bench``); without it only the router
and the floor are measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from foredeck.common.v1 import chat_pb2
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as pb
from foredeck.llmrouter.v1.llmrouter_service_pb2_grpc import LlmRouterServiceStub
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    PrincipalSigner,
    format_keys,
    generate_key,
)
from foredeck_stack.stores import RedisProcess, free_port
from foredeck_testing import echo


def _litellm_path() -> Path:
    venv = os.environ.get("LITELLM_VENV") or str(
        Path.home() / ".cache" / "foredeck-bench" / "litellm-venv"
    )
    return Path(venv) / "bin" / "litellm"


WARMUP = 30
SEQUENTIAL = 300
STREAMS = 200
LEVELS = (1, 2, 4, 8, 16, 32, 64)
LEVEL_SECONDS = 3.0
ADDED_P99_LIMIT = 0.050
MODEL = "fake"

Call = Callable[[], Awaitable[None]]


def _pct(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its direct children, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _spawn(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@asynccontextmanager
async def _upstream() -> AsyncIterator[str]:
    process = await _spawn(
        [sys.executable, "-m", "foredeck_testing.provider", "--port", "0", "--no-record"], {}
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            base_url = (await process.stdout.readline()).decode().strip()
        yield base_url
    finally:
        await _stop(process)


@asynccontextmanager
async def _router(upstream: str, redis_url: str, keys: str) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    env = {
        "FOREDECK_LLMROUTER_PORT": str(port),
        "FOREDECK_LLMROUTER_METRICS_PORT": "-1",
        "FOREDECK_LLMROUTER_REDIS_URL": redis_url,
        "FOREDECK_LLMROUTER_PRINCIPAL_KEYS": keys,
        "FOREDECK_LLMROUTER_LOG_LEVEL": "warning",
        "FOREDECK_LLMROUTER_LOCAL_ENABLED": "false",
        "FOREDECK_LLMROUTER_LOCAL_EMBEDDINGS_ENABLED": "false",
        "FOREDECK_LLMROUTER_BUILTIN_MODELS": "false",
        "FOREDECK_LLMROUTER_DEFAULT_MODEL": MODEL,
        "FOREDECK_LLMROUTER_PROVIDERS": json.dumps(
            [{"name": "fake", "base_url": upstream + "/v1"}]
        ),
        "FOREDECK_LLMROUTER_MODELS": json.dumps(
            [{"name": MODEL, "provider": "fake", "capabilities": {"streaming": True}}]
        ),
        "ANTHROPIC_API_KEY": "",
        "OPENAI_API_KEY": "",
    }
    process = await _spawn([sys.executable, "-m", "foredeck_llmrouter"], env)
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel, asyncio.timeout(60):
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        yield address, process.pid
    finally:
        await _stop(process)


@asynccontextmanager
async def _litellm(upstream: str, work: Path) -> AsyncIterator[tuple[str, str, int] | None]:
    litellm = _litellm_path()
    if not litellm.exists():
        yield None
        return
    port = free_port()
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-dummy\n"
    )
    key = "sk-" + secrets.token_hex(32)
    process = await _spawn(
        [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        {"LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client, asyncio.timeout(120):
            while True:
                try:
                    if (await client.get(base + "/health/liveliness")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        yield base, key, process.pid
    finally:
        await _stop(process)


def _body(stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello?"}],
        "max_tokens": 32,
        "stream": stream,
    }


@dataclass
class Target:
    """One way of making the same model call."""

    name: str
    call: Call
    stream_first_token: Callable[[], Awaitable[float]]
    pid: int | None


def _http_target(
    name: str, client: httpx.AsyncClient, url: str, headers: dict[str, str], pid: int | None
) -> Target:
    async def call() -> None:
        response = await client.post(url, json=_body(), headers=headers)
        response.raise_for_status()
        response.json()

    async def first_token() -> float:
        start = time.perf_counter()
        async with client.stream("POST", url, json=_body(stream=True), headers=headers) as response:
            response.raise_for_status()
            first = 0.0
            async for line in response.aiter_lines():
                if (
                    not first
                    and line.startswith("data:")
                    and '"content":"' in line.replace(" ", "")
                ):
                    first = time.perf_counter() - start
            return first

    return Target(name, call, first_token, pid)


def _router_target(channel: grpc.aio.Channel, token: str, pid: int) -> Target:
    stub = LlmRouterServiceStub(channel)
    metadata = ((PRINCIPAL_METADATA_KEY, token),)
    message = chat_pb2.ChatMessage(
        role=chat_pb2.ROLE_USER, parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="Hello?"))]
    )
    from foredeck.llmrouter.v1 import generation_pb2

    sampling = generation_pb2.SamplingParams(max_output_tokens=32)

    async def call() -> None:
        await stub.Generate(
            pb.GenerateRequest(model=MODEL, messages=[message], sampling=sampling),
            metadata=metadata,
            timeout=10,
        )

    async def first_token() -> float:
        start = time.perf_counter()
        first = 0.0
        async for event in stub.StreamGenerate(
            pb.StreamGenerateRequest(model=MODEL, messages=[message], sampling=sampling),
            metadata=metadata,
            timeout=10,
        ):
            if not first and event.WhichOneof("event") == "text_delta":
                first = time.perf_counter() - start
        return first

    return Target("llmrouter", call, first_token, pid)


async def _sequential(call: Call) -> list[float]:
    for _ in range(WARMUP):
        await call()
    samples = []
    for _ in range(SEQUENTIAL):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def _first_tokens(first_token: Callable[[], Awaitable[float]]) -> list[float]:
    for _ in range(WARMUP):
        await first_token()
    return [await first_token() for _ in range(STREAMS)]


async def _level(
    call: Call, concurrency: int, pid: int | None
) -> tuple[float, list[float], int, float]:
    """(requests/s, latencies, errors, proxy CPU seconds) for a fixed time at one concurrency."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + LEVEL_SECONDS
    cpu_before = _cpu_seconds(pid) if pid else 0.0

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu = (_cpu_seconds(pid) - cpu_before) if pid else elapsed
    return len(latencies) / elapsed, latencies, errors, cpu


async def _capacity(target: Target, direct_p50: float) -> tuple[float, float, int, bool]:
    """(requests per CPU-second, requests/s, concurrency, whether p99 added <= 50 ms held).

    The best level is the one with the most requests per CPU-second among those whose p99 added
    latency is within the bound; when none is (a machine busy with other work), the best
    error-free level is reported and flagged.
    """
    within: tuple[float, float, int] | None = None
    any_level: tuple[float, float, int] | None = None
    for concurrency in LEVELS:
        rate, latencies, errors, cpu = await _level(target.call, concurrency, target.pid)
        if errors or len(latencies) < 2:
            print(f"  {target.name} x{concurrency}: {errors} errors")
            break
        added_p99 = _pct(latencies, 99) - direct_p50
        per_core = len(latencies) / cpu if cpu > 0 else 0.0
        print(
            f"  {target.name} x{concurrency}: {rate:8.1f} req/s, p99 added {_ms(added_p99)} ms, "
            f"proxy CPU {cpu / LEVEL_SECONDS:5.2f} cores, {per_core:8.1f} req/CPU-s"
        )
        if any_level is None or per_core > any_level[0]:
            any_level = (per_core, rate, concurrency)
        if added_p99 <= ADDED_P99_LIMIT and (within is None or per_core > within[0]):
            within = (per_core, rate, concurrency)
    if within is not None:
        return (*within, True)
    if any_level is not None:
        return (*any_level, False)
    return (0.0, 0.0, 0, False)


async def _floor_echo() -> list[float]:
    server = grpc.aio.server()

    async def handler(request: echo.Message, context: Any) -> echo.Message:
        return echo.Message(value=request.value)

    echo.register({"Echo": echo.unary(handler)})(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = echo.unary_call(channel, "Echo")
            request = echo.Message(value="x" * 64)

            async def once() -> None:
                await call(request)

            return await _sequential(once)
    finally:
        await server.stop(None)


def _ms(value: float) -> str:
    return f"{value * 1000:9.2f}"


async def run() -> None:
    """Start everything, measure, print the table and the ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-llmrouter-") as tmp:
        work = Path(tmp)
        keys = {"bench": generate_key()}
        token = PrincipalSigner(keys, "bench").mint(
            tenant_id="bench", user_id="bench", permissions=["llm:generate"]
        )
        async with (
            RedisProcess(work / "redis") as redis,
            _upstream() as upstream,
            _router(upstream, redis.url, format_keys(keys)) as (router_address, router_pid),
            _litellm(upstream, work) as litellm,
            httpx.AsyncClient(limits=httpx.Limits(max_connections=200)) as client,
            grpc.aio.insecure_channel(router_address) as channel,
        ):
            direct = _http_target("direct", client, upstream + "/v1/chat/completions", {}, None)
            targets = [_router_target(channel, token, router_pid)]
            if litellm is not None:
                base, key, pid = litellm
                targets.append(
                    _http_target(
                        "litellm",
                        client,
                        base + "/v1/chat/completions",
                        {"Authorization": f"Bearer {key}"},
                        pid,
                    )
                )
            echo_samples = await _floor_echo()
            direct_samples = await _sequential(direct.call)
            direct_ttft = await _first_tokens(direct.stream_first_token)
            results: dict[str, dict[str, float]] = {}
            for target in targets:
                samples = await _sequential(target.call)
                ttft = await _first_tokens(target.stream_first_token)
                per_core, rate, concurrency, bound = await _capacity(
                    target, _pct(direct_samples, 50)
                )
                results[target.name] = {
                    "added_p50": _pct(samples, 50) - _pct(direct_samples, 50),
                    "added_p99": _pct(samples, 99) - _pct(direct_samples, 99),
                    "ttft_added_p99": _pct(ttft, 99) - _pct(direct_ttft, 99),
                    "per_core": per_core,
                    "rate": rate,
                    "concurrency": concurrency,
                    "bound_met": 1.0 if bound else 0.0,
                }

    floor_p50 = _pct(echo_samples, 50)
    floor_p99 = _pct(echo_samples, 99)
    print("\nllmrouter vs LiteLLM proxy: same fake OpenAI-compatible upstream, same run")
    direct_p50, direct_p99 = _pct(direct_samples, 50), _pct(direct_samples, 99)
    print(f"direct upstream call: p50 {_ms(direct_p50)} ms, p99 {_ms(direct_p99)} ms")
    print(f"floor (bare grpc.aio echo): p50 {_ms(floor_p50)} ms, p99 {_ms(floor_p99)} ms")
    print(f"{'metric':<44}{'llmrouter':>12}{'litellm':>12}{'ratio':>9}")
    router = results["llmrouter"]
    peer = results.get("litellm")
    rows = [
        ("added latency p50, 1 in flight (ms)", "added_p50", 1000.0, "<= 0.25"),
        ("added latency p99, 1 in flight (ms)", "added_p99", 1000.0, "<= 0.25"),
        ("stream added TTFT p99 (ms)", "ttft_added_p99", 1000.0, "<= 0.25"),
        ("requests per CPU-second (p99 add <= 50 ms)", "per_core", 1.0, ">= 4"),
        ("requests/s at that point", "rate", 1.0, ""),
        ("concurrency at that point", "concurrency", 1.0, ""),
        ("p99 added <= 50 ms held there (1 = yes)", "bound_met", 1.0, ""),
    ]
    for label, key, scale, goal in rows:
        mine = router[key] * scale
        if peer is None:
            print(f"{label:<44}{mine:>12.2f}{'-':>12}")
            continue
        theirs = peer[key] * scale
        ratio = f"{mine / theirs:8.2f}x" if theirs else "      -"
        print(f"{label:<44}{mine:>12.2f}{theirs:>12.2f}{ratio} {goal}")
    if peer is None:
        print(f"(LiteLLM not installed at {_litellm_path()}; `make bench` installs it)")
