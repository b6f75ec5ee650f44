"""What admission costs the gateway, and how many runs it starts per second.

Admission: the gateway's whole admission of one CreateRun, in process and without gRPC —
credential parsing and hashing, the admission script (API key lookup, state, expiry and
permission; request windows of key, user and tenant; request id; the user's concurrency cap;
reservation against key, user and tenant budgets) and the principal for the downstream call —
against the floor it cannot beat: one EVALSHA round trip of a script that returns at once, on
the same Redis in the same run. Also the admission of a plain call (GetRun) with an API key
and with an HS256 JWT. Goal: p50 within 2x of the EVALSHA round trip.

Throughput: CreateRun through a gateway process (its own interpreter, real gRPC, real Redis)
to the scripted orchestrator running in this process, at a fixed concurrency — with each run
watched for settlement (the default) and with settlement left to the sweeper
(``WATCH_RUNS=false``) — against the scripted orchestrator's SubmitRun called directly at the
same concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from redis.asyncio import Redis

from foredeck.gateway.v1 import gateway_service_pb2 as gw
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as orch
from foredeck.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from foredeck_gateway.admission import AdmissionMetrics, Gate, RunAdmission
from foredeck_gateway.config import GatewaySettings
from foredeck_gateway.credentials import JwtVerifier, hash_secret, new_api_key_secret
from foredeck_gateway.store import KeyRecord, RedisState
from foredeck_gateway.testing import JWT_SECRET, ScriptedOrchestrator, bearer, make_jwt
from foredeck_kit.logs import configure_logging
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    PrincipalSigner,
    format_keys,
    generate_key,
)
from foredeck_stack.stores import RedisProcess, free_port

GATEWAY_COMMAND = ["-m", "foredeck_gateway"]
WARMUP = 300
SAMPLES = 4000
RUNS = 2000
CONCURRENCY = 32


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return (
        statistics.median(ordered) * 1e6,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    )


async def _timed(call: Callable[[int], Awaitable[Any]], count: int) -> list[float]:
    for index in range(WARMUP):
        await call(-index - 1)
    samples: list[float] = []
    for index in range(count):
        started = time.perf_counter()
        await call(index)
        samples.append(time.perf_counter() - started)
    return samples


async def _admission(redis_url: str) -> dict[str, tuple[float, float]]:
    redis = Redis.from_url(redis_url)
    state = RedisState(redis, prefix="bench", timeout=5.0)
    settings = GatewaySettings(
        key_prefix="bench",
        jwt_hs256_secrets=SecretStr(f"idp:{JWT_SECRET}"),
        jwt_issuer="https://idp.test",
        jwt_audience="foredeck",
        default_user_requests_per_minute=1_000_000,
        default_tenant_requests_per_minute=1_000_000,
    )
    keys = {"bench": generate_key()}
    gate = Gate(
        settings,
        state,
        JwtVerifier.from_settings(
            hs256_spec=settings.jwt_hs256_secrets.get_secret_value(),
            public_keys_file=None,
            jwks_file=None,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway=30,
            tenant_claim="tid",
            permissions_claim="scope",
        ),
        PrincipalSigner(keys, "bench"),
        AdmissionMetrics(CollectorRegistry()),
    )
    secret = new_api_key_secret()
    await state.create_key(
        KeyRecord(
            api_key_id="key_bench",
            prefix=secret[:12],
            display_name="bench",
            tenant_id="acme",
            user_id="jo",
            kind="user",
            permissions=["runs:*"],
            key_rpm=1_000_000,
            max_concurrent_runs=10_000,
            run_budget=[0, 1000, 0, 0, 0, 0],
        ),
        hash_secret(secret),
    )
    for budget_id, scope in (("tenant", "tenant"), ("user:jo", "user"), ("key:key_bench", "key")):
        await state.set_budget(
            tenant_id="acme",
            budget_id=budget_id,
            scope=scope,
            user_id="jo" if scope == "user" else "",
            api_key_id="key_bench" if scope == "key" else "",
            fields="tp",
            token_limit=10**15,
            cost_limit=0,
            period="monthly",
            etag="",
            by="bench",
            now_ms=int(time.time() * 1000),
        )
    floor_sha = await redis.script_load("return 1")
    key_md = bearer(secret)
    jwt_md = bearer(make_jwt(scope="runs:read"))

    async def floor(_: int) -> None:
        await redis.evalsha(floor_sha, 0)

    async def create_run(index: int) -> None:
        await gate.admit(
            key_md,
            "CreateRun",
            "runs:create",
            run=RunAdmission(
                reservation_id=f"res-{index}-{uuid.uuid4().hex[:6]}",
                request_id=f"req-{index}-{uuid.uuid4().hex[:6]}",
                fingerprint="bench",
                tokens=0,
                cost=0,
            ),
        )

    async def get_run_key(_: int) -> None:
        await gate.admit(key_md, "GetRun", "runs:read")

    async def get_run_jwt(_: int) -> None:
        await gate.admit(jwt_md, "GetRun", "runs:read")

    results: dict[str, tuple[float, float]] = {}
    rounds: dict[str, list[float]] = {name: [] for name in ("floor", "create", "key", "jwt")}
    for _ in range(3):
        # Interleaved rounds: load from elsewhere on the machine hits every setup alike.
        rounds["floor"] += await _timed(floor, SAMPLES // 3)
        rounds["create"] += await _timed(create_run, SAMPLES // 3)
        rounds["key"] += await _timed(get_run_key, SAMPLES // 3)
        rounds["jwt"] += await _timed(get_run_jwt, SAMPLES // 3)
    for name, samples in rounds.items():
        results[name] = _percentiles(samples)
    await redis.aclose()
    return results


async def _serving(address: str) -> None:
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway at {address} did not start")


@contextlib.asynccontextmanager
async def _gateway_process(env: dict[str, str], log: Path) -> AsyncIterator[str]:
    port = free_port()
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *GATEWAY_COMMAND,
            env={**os.environ, **env, "FOREDECK_GATEWAY_PORT": str(port)},
            stdout=out,
            stderr=out,
        )
    try:
        await _serving(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()


async def _load(call: Callable[[int], Awaitable[Any]], total: int) -> float:
    counter = iter(range(total))

    async def worker() -> None:
        for index in counter:
            await call(index)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return total / (time.perf_counter() - started)


async def _throughput(redis_url: str, work: Path) -> tuple[float, float, float]:
    keys = {"bench": generate_key()}
    orchestrator = ScriptedOrchestrator(keys)
    address = await orchestrator.start()
    redis = Redis.from_url(redis_url)
    secret = new_api_key_secret()
    await RedisState(redis, prefix="gw", timeout=5).create_key(
        KeyRecord(
            api_key_id="key_load",
            prefix=secret[:12],
            display_name="load",
            tenant_id="acme",
            user_id="jo",
            kind="user",
            permissions=["runs:*"],
            key_rpm=1_000_000,
            user_rpm=1_000_000,
            tenant_rpm=1_000_000,
            max_concurrent_runs=10_000,
        ),
        hash_secret(secret),
    )
    await redis.aclose()
    env = {
        "FOREDECK_GATEWAY_REDIS_URL": redis_url,
        "FOREDECK_GATEWAY_ORCHESTRATOR_ADDRESS": address,
        "FOREDECK_GATEWAY_PRINCIPAL_KEYS": format_keys(keys),
        "FOREDECK_GATEWAY_METRICS_PORT": "-1",
        "FOREDECK_GATEWAY_LOG_LEVEL": "warning",
    }
    rates: list[float] = []
    try:
        for watch in ("true", "false"):
            env["FOREDECK_GATEWAY_WATCH_RUNS"] = watch
            async with _gateway_process(env, work / f"gateway-{watch}.log") as gateway_address:
                channel = grpc.aio.insecure_channel(gateway_address)
                stub = gw_grpc.GatewayServiceStub(channel)
                md = bearer(secret)

                async def create(
                    index: int, watch: str = watch, stub: Any = stub, md: Any = md
                ) -> None:
                    await stub.CreateRun(
                        gw.CreateRunRequest(input="task", request_id=f"{watch}-{index}"),
                        metadata=md,
                        timeout=30,
                    )

                await _load(lambda i: create(-i - 1), 200)
                rates.append(await _load(create, RUNS))
                await channel.close(None)
        direct_channel = grpc.aio.insecure_channel(address)
        runs = orch_grpc.RunServiceStub(direct_channel)
        token = PrincipalSigner(keys, "bench").mint(
            tenant_id="acme", user_id="jo", permissions=["runs:*"]
        )
        direct_md = ((PRINCIPAL_METADATA_KEY, token),)

        async def submit(index: int) -> None:
            await runs.SubmitRun(
                orch.SubmitRunRequest(agent_name="a", input="task", request_id=f"d-{index}"),
                metadata=direct_md,
                timeout=30,
            )

        await _load(lambda i: submit(-i - 1), 200)
        direct = await _load(submit, RUNS)
        await direct_channel.close(None)
    finally:
        await orchestrator.stop()
    return rates[0], rates[1], direct


async def run() -> None:
    """Measure and print the admission and throughput figures."""
    # Lines are formatted as in production, but only warnings and worse are written.
    configure_logging("gateway-bench", level="warning")
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        async with RedisProcess(work / "redis") as redis_server:
            admission = await _admission(redis_server.url_for(1))
            watched, swept, direct = await _throughput(redis_server.url_for(2), work)
    floor_p50, floor_p99 = admission["floor"]
    print()
    print("gateway admission (in process, sequential, microseconds)")
    print(f"{'path':<44}{'p50':>9}{'p99':>9}{'p50 ratio':>11}{'p99 ratio':>11}")
    labels = {
        "floor": "EVALSHA round trip (floor)",
        "create": "CreateRun: key + limits + budgets",
        "key": "GetRun: API key + limits",
        "jwt": "GetRun: HS256 JWT + limits",
    }
    for name, label in labels.items():
        p50, p99 = admission[name]
        print(
            f"{label:<44}{p50:>9.0f}{p99:>9.0f}{p50 / floor_p50:>10.2f}x{p99 / floor_p99:>10.2f}x"
        )
    print("goal: CreateRun admission p50 <= 2x the EVALSHA round trip")
    print()
    print(f"CreateRun throughput, {CONCURRENCY} concurrent, {RUNS} runs")
    print(f"{'through the gateway, runs watched (default)':<44}{watched:>9.0f} runs/s")
    print(f"{'through the gateway, settled by the sweeper':<44}{swept:>9.0f} runs/s")
    print(f"{'SubmitRun on the scripted orchestrator':<44}{direct:>9.0f} runs/s")
    print(f"{'ratio (watched / direct)':<44}{watched / direct:>9.2f}")
    print(f"{'ratio (sweeper / direct)':<44}{swept / direct:>9.2f}")


if __name__ == "__main__":
    asyncio.run(run())
