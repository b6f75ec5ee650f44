"""Small real gRPC services that the `foredeck up` tests publish through a real entry point.

``alpha`` needs Redis; ``beta`` needs Redis, the graph store and alpha (it checks alpha's
health before serving, so it only becomes healthy if the runner started alpha first and
passed its address); ``broken`` exits at start the way a misconfigured service does.
A service reports NOT_SERVING while the Redis key ``fake:<name>:down`` exists, so a test can
make its health change.
Run as ``python -m fake_stack_service`` with the environment the runner builds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from foredeck_stack.services import StackContext, StackService, env_prefix

log = logging.getLogger("fake_stack_service")


def _alpha_env(ctx: StackContext) -> Mapping[str, str]:
    return {**ctx.server_env(), "FAKE_SERVICE": "alpha", "FAKE_REDIS_URL": ctx.redis_url}


def _beta_env(ctx: StackContext) -> Mapping[str, str]:
    return {
        **ctx.server_env(),
        "FAKE_SERVICE": "beta",
        "FAKE_REDIS_URL": ctx.redis_url,
        "FAKE_UPSTREAM": ctx.service_address("alpha"),
    }


def _broken_env(ctx: StackContext) -> Mapping[str, str]:
    return {**ctx.server_env(), "FAKE_SERVICE": "broken"}


ALPHA = StackService(
    name="alpha",
    module="fake_stack_service",
    needs=("redis",),
    env=_alpha_env,
    health_service="fake.Alpha",
)
BETA = StackService(
    name="beta",
    module="fake_stack_service",
    needs=("redis", "graph", "alpha"),
    env=_beta_env,
    health_service="fake.Beta",
)
BROKEN = StackService(name="broken", module="fake_stack_service", needs=("alpha",), env=_broken_env)


async def _upstream_serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service="fake.Alpha"), timeout=5)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def _follow_switch(redis: Redis, name: str, servicer: Any, stop: asyncio.Event) -> None:
    """Serve NOT_SERVING while ``fake:<name>:down`` exists in Redis, SERVING otherwise."""
    down = False
    while not stop.is_set():
        now_down = bool(await redis.exists(f"fake:{name}:down"))
        if now_down != down:
            down = now_down
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if down
                else health_pb2.HealthCheckResponse.SERVING
            )
            await servicer.set(f"fake.{name.title()}", status)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def serve() -> int:
    """Serve the standard health service until SIGTERM or SIGINT; return the exit code."""
    name = os.environ["FAKE_SERVICE"]
    if name == "broken":
        log.error("broken cannot start: required configuration is missing")
        return 3
    prefix = env_prefix(name)
    address = f"{os.environ[prefix + 'HOST']}:{os.environ[prefix + 'PORT']}"
    if not os.environ[prefix + "PRINCIPAL_KEYS"]:
        log.error("%s: no principal keys", name)
        return 4
    redis = Redis.from_url(os.environ["FAKE_REDIS_URL"])
    try:
        await redis.ping()
    except Exception:
        await redis.aclose()
        raise
    upstream = os.environ.get("FAKE_UPSTREAM")
    if upstream is not None and not await _upstream_serving(upstream):
        log.error("%s: upstream %s is not serving", name, upstream)
        return 5

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # not in grpc-stubs
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    for service in ("", f"fake.{name.title()}"):
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s", name, address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    follow = asyncio.create_task(_follow_switch(redis, name, servicer, stop))
    await stop.wait()
    follow.cancel()
    await asyncio.gather(follow, return_exceptions=True)
    await redis.aclose()
    await servicer.enter_graceful_shutdown()
    await server.stop(1)
    log.info("%s stopped gracefully", name)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(asyncio.run(serve()))
