"""`foredeck up` as a real process: real stores, real services found through a real entry point."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from neo4j import GraphDatabase
from redis import Redis

from foredeck_stack.up import StackNotRunningError, read_stack_file

TESTS_DIR = Path(__file__).resolve().parent
MARKER_VARIABLE = "FOREDECK_UP_TEST_RUN"
CLI = (sys.executable, "-m", "foredeck_client.cli")
ENTRY_POINTS = """\
[foredeck.stack]
alpha = fake_stack_service:ALPHA
beta = fake_stack_service:BETA
broken = fake_stack_service:BROKEN
"""


@dataclass
class Environment:
    """A process environment in which the fake services are installed, tagged with a marker."""

    variables: dict[str, str]
    marker: str

    def leftover_processes(self) -> list[int]:
        """Pids of live processes whose environment carries this test's marker."""
        tag = f"{MARKER_VARIABLE}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if tag in environ.split(b"\0"):
                found.append(int(entry.name))
        return found


@pytest.fixture
def environment(tmp_path: Path) -> Environment:
    """Install the fake services the way a wheel would: a dist-info with entry points."""
    site = tmp_path / "site"
    dist_info = site / "foredeck_fake_stack-0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: foredeck-fake-stack\nVersion: 0\n", encoding="utf-8"
    )
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS, encoding="utf-8")
    python_path = [str(site), str(TESTS_DIR)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    marker = secrets.token_hex(8)
    variables = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(python_path),
        MARKER_VARIABLE: marker,
    }
    return Environment(variables, marker)


@dataclass
class Up:
    """One `foredeck up` process and where its output goes."""

    process: subprocess.Popen[bytes]
    output: Path
    data_dir: Path

    @property
    def text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, within: float = 90.0) -> dict[str, Any]:
        """Poll until this runner's stack.json appears; fail with the output if it exits first."""
        stack_file = self.data_dir / "stack.json"
        deadline = time.monotonic() + within
        while True:
            if stack_file.exists():
                info: dict[str, Any] = json.loads(stack_file.read_text(encoding="utf-8"))
                if info["pid"] == self.process.pid:
                    return info
            if self.process.poll() is not None:
                pytest.fail(f"foredeck up exited with {self.process.returncode}:\n{self.text}")
            if time.monotonic() > deadline:
                pytest.fail(f"foredeck up was not ready within {within} s:\n{self.text}")
            time.sleep(0.05)

    def interrupt(self, within: float = 60.0) -> int:
        """Send SIGINT (Ctrl-C) and return the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(within)


@pytest.fixture
def start_up(environment: Environment, tmp_path: Path) -> Iterator[Any]:
    """Start `foredeck up` processes; any still running at the end is killed."""
    started: list[Up] = []

    def start(data_dir: Path, *args: str) -> Up:
        output = tmp_path / f"up-{len(started)}.out"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "foredeck_client.cli",
                    "up",
                    "--data-dir",
                    str(data_dir),
                    *args,
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=environment.variables,
            )
        up = Up(process, output, data_dir)
        started.append(up)
        return up

    yield start
    for up in started:
        if up.process.poll() is None:
            up.process.kill()
            up.process.wait(30)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serving(address: str, service: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def graph_query(info: dict[str, Any], query: str) -> list[Any]:
    graph = info["components"]["arcadedb"]
    password = Path(graph["password_file"]).read_text(encoding="utf-8").strip()
    with GraphDatabase.driver(graph["bolt_uri"], auth=(graph["user"], password)) as driver:
        # No database named: the stack's default graph database answers.
        records, _, _ = driver.execute_query(query)
    return [record[0] for record in records]


def test_up_runs_the_stack_keeps_state_and_stops_in_reverse_order(
    tmp_path: Path, start_up: Any, environment: Environment
) -> None:
    data_dir = tmp_path / "data"
    up = start_up(data_dir, "--only", "beta")  # alpha comes along: beta needs it
    info = up.wait_ready()

    components = info["components"]
    assert list(components) == ["redis", "arcadedb", "alpha", "beta"]
    assert read_stack_file(data_dir) == info
    with Redis.from_url(components["redis"]["url"]) as redis:
        assert redis.ping()
        redis.set("stack:probe", "kept")
    assert graph_query(info, "MERGE (p:Probe {id: 1}) RETURN p.id") == [1]
    assert serving(components["alpha"]["address"], "fake.Alpha")
    assert serving(components["beta"]["address"], "fake.Beta")
    keys_file = data_dir / "principal-keys.json"
    delegation_file = data_dir / "delegation-keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(delegation_file.stat().st_mode) == 0o600
    keys = keys_file.read_text(encoding="utf-8")
    delegation = delegation_file.read_text(encoding="utf-8")
    gateway_kids = set(json.loads(keys)["keys"])
    delegation_kids = set(json.loads(delegation)["keys"])
    assert delegation_kids
    assert not gateway_kids & delegation_kids

    second = start_up(data_dir, "--only", "alpha")
    assert second.process.wait(30) == 2
    assert "in use by another `foredeck up`" in second.text
    assert read_stack_file(data_dir) == info

    assert up.interrupt() == 0
    for component in components.values():
        assert not process_exists(component["pid"]), component
    assert environment.leftover_processes() == []
    assert not (data_dir / "stack.json").exists()
    stops = [up.text.index(f"stopping {name} ") for name in ("beta", "alpha", "arcadedb", "redis")]
    assert stops == sorted(stops)
    assert "beta stopped gracefully" in (data_dir / "logs" / "beta.log").read_text()

    again = start_up(data_dir, "--only", "")
    info = again.wait_ready()
    assert list(info["components"]) == ["redis", "arcadedb"]
    with Redis.from_url(info["components"]["redis"]["url"]) as redis:
        assert redis.get("stack:probe") == b"kept"
    assert graph_query(info, "MATCH (p:Probe) RETURN count(p)") == [1]
    assert keys_file.read_text(encoding="utf-8") == keys
    assert delegation_file.read_text(encoding="utf-8") == delegation
    assert again.interrupt() == 0
    assert environment.leftover_processes() == []


def test_up_stops_everything_when_a_service_cannot_start(
    tmp_path: Path, start_up: Any, environment: Environment
) -> None:
    data_dir = tmp_path / "data"
    up = start_up(data_dir, "--only", "broken")

    code = up.process.wait(90)

    assert code == 1, up.text
    assert "broken exited with code 3 before it was healthy" in up.text
    assert "broken cannot start: required configuration is missing" in up.text
    assert "stopping alpha" in up.text
    assert environment.leftover_processes() == []
    assert not (data_dir / "stack.json").exists()


def test_up_rejects_an_unknown_service_before_starting_anything(
    tmp_path: Path, start_up: Any
) -> None:
    data_dir = tmp_path / "data"
    up = start_up(data_dir, "--only", "alpha,nope")

    assert up.process.wait(30) == 2
    assert "unknown service(s) nope (known: alpha, beta, broken" in up.text
    assert not (data_dir / "redis").exists()


def test_children_do_not_outlive_a_killed_runner(
    tmp_path: Path, start_up: Any, environment: Environment
) -> None:
    data_dir = tmp_path / "data"
    up = start_up(data_dir, "--only", "alpha")
    up.wait_ready()

    up.process.kill()
    up.process.wait(30)

    deadline = time.monotonic() + 30
    while leftovers := environment.leftover_processes():
        if time.monotonic() > deadline:
            pytest.fail(f"processes outlived the killed runner: {leftovers}")
        time.sleep(0.05)
    with pytest.raises(StackNotRunningError, match="is gone"):
        read_stack_file(data_dir)
    again = start_up(data_dir, "--only", "alpha")
    assert list(again.wait_ready()["components"]) == ["redis", "arcadedb", "alpha"]
    assert again.interrupt() == 0


def wait_for_text(up: Up, text: str, within: float = 30.0) -> None:
    """Poll the runner's output until ``text`` appears; fail if it exits or time runs out."""
    deadline = time.monotonic() + within
    while text not in up.text:
        if up.process.poll() is not None:
            pytest.fail(f"foredeck up exited with {up.process.returncode}:\n{up.text}")
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} did not appear within {within} s:\n{up.text}")
        time.sleep(0.05)


def test_up_prints_progress_and_health_changes_and_leaves_logs_in_their_files(
    tmp_path: Path, start_up: Any, environment: Environment
) -> None:
    data_dir = tmp_path / "data"
    up = start_up(data_dir, "--only", "alpha")
    info = up.wait_ready()
    alpha = info["components"]["alpha"]["address"]

    for name in ("redis", "arcadedb", "alpha"):
        assert f"{name:<8}  starting" in up.text
    assert f"alpha     ready on {alpha} (" in up.text
    assert "foredeck logs NAME" in up.text
    # The service's own log line is in its file, not on the terminal.
    assert "alpha listening on" in (data_dir / "logs" / "alpha.log").read_text()
    assert "alpha listening on" not in up.text
    assert "| " not in up.text

    with Redis.from_url(info["components"]["redis"]["url"]) as redis:
        redis.set("fake:alpha:down", "1")
        wait_for_text(up, "alpha     health NOT_SERVING")
        redis.delete("fake:alpha:down")
        wait_for_text(up, "alpha     health SERVING again")

    shown = subprocess.run(
        [*CLI, "logs", "alpha", "--no-follow", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=environment.variables,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"alpha listening on {alpha}" in shown.stdout
    assert up.interrupt() == 0

    streamed = start_up(data_dir, "--only", "alpha", "--logs")
    address = streamed.wait_ready()["components"]["alpha"]["address"]
    wait_for_text(streamed, f"alpha    | INFO alpha listening on {address}")
    assert streamed.interrupt() == 0
    assert environment.leftover_processes() == []


def test_logs_names_the_known_components_when_asked_for_an_unknown_one(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "redis.log").write_text("ready\n", encoding="utf-8")

    shown = subprocess.run(
        [*CLI, "logs", "nope", "--no-follow", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert shown.returncode == 2
    assert "no log for 'nope'" in shown.stderr
    assert "known: redis" in shown.stderr
