"""The images' health check script against a real kit server: it follows the gRPC health service."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from foredeck_kit.errors import domain_for
from foredeck_kit.handlers import Context
from foredeck_stack.stores import free_port
from foredeck_testing.echo import SERVICE_NAME, Message, register, unary
from foredeck_testing.server import running_server

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"


async def echo(request: Message, context: Context) -> Message:
    return request


async def run_check(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--timeout",
        "5",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode().strip()


async def test_healthcheck_passes_while_serving_and_fails_once_a_dependency_is_down() -> None:
    async with running_server(
        register({"Echo": unary(echo)}),
        service_names=[SERVICE_NAME],
        domain=domain_for("kittest"),
    ) as server:
        port = str(server.port)
        assert await run_check("--port", port) == (0, "SERVING")
        # The port comes from the service's own variable when that is set.
        env = {"FOREDECK_KITTEST_PORT": port, "PATH": ""}
        code, status = await run_check(
            "--port-env", "FOREDECK_KITTEST_PORT", "--port", "1", env=env
        )
        assert (code, status) == (0, "SERVING")
        assert await run_check("--port", port, "--service", SERVICE_NAME) == (0, "SERVING")

        watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest())
        server.host.report_dependency("redis", healthy=False)
        async with asyncio.timeout(10):
            async for update in watch:
                if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
        watch.cancel()
        assert await run_check("--port", port) == (1, "NOT_SERVING")


async def test_healthcheck_fails_when_nothing_listens() -> None:
    code, status = await run_check("--port", str(free_port()), "--timeout", "1")
    assert code == 1
    assert "UNAVAILABLE" in status
