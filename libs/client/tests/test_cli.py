"""The `foredeck` CLI as a process against a scripted gateway: piped, JSON, terminal, errors."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .scripted_gateway import KEY, ScriptedGateway, threaded_gateway

CLI = (sys.executable, "-m", "foredeck_client.cli")


@pytest.fixture
def gateway() -> Iterator[tuple[str, ScriptedGateway]]:
    with threaded_gateway() as running:
        yield running


def _env(address: str, key: str = KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOREDECK_")}
    return {**env, "FOREDECK_ADDRESS": address, "FOREDECK_API_KEY": key}


def _cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60, check=False
    )


def test_run_piped_prints_one_plain_line_per_event_and_the_answer(
    gateway: tuple[str, ScriptedGateway],
) -> None:
    address, servicer = gateway
    done = _cli("run", "What is 17 * 23?", "--agent", "calc", env=_env(address))

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("run run-")
    assert "step 2 tool_call: multiply" in lines
    assert 'tool calculator {"expression": "17 * 23"}' in lines
    assert "tool result: 391" in lines
    assert "succeeded · 150 tokens (120 in, 30 out), $0.0000" in lines
    assert lines[-1] == "17 * 23 = 391"
    assert "\x1b[" not in done.stdout  # no terminal codes in a pipe
    assert servicer.create_requests[0].agent_name == "calc"


def test_run_json_prints_one_json_document_per_line(
    gateway: tuple[str, ScriptedGateway],
) -> None:
    address, _ = gateway
    done = _cli("run", "What is 17 * 23?", "--json", env=_env(address))

    assert done.returncode == 0, done.stderr
    documents = [json.loads(line) for line in done.stdout.splitlines()]
    assert "run" in documents[0]
    events = [d["event"] for d in documents if "event" in d]
    assert len(events) == 12
    assert events[5]["tool_call_finished"]["result"]["content"] == "391"
    assert documents[-1]["run"]["output"] == "17 * 23 = 391"


def test_run_on_a_terminal_draws_a_live_display(gateway: tuple[str, ScriptedGateway]) -> None:
    address, _ = gateway
    main, replica = pty.openpty()
    env = {**_env(address), "COLUMNS": "100", "TERM": "xterm-256color"}
    process = subprocess.Popen(
        [*CLI, "run", "What is 17 * 23?"], stdout=replica, stderr=replica, env=env
    )
    os.close(replica)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the other side closed: the process is gone
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(main)
    assert process.wait(30) == 0
    text = output.decode("utf-8", errors="replace")
    assert "\x1b[" in text  # drawn with terminal codes
    assert "calculator" in text
    assert "17 * 23 = 391" in text
    assert "succeeded" in text


def test_errors_are_one_readable_line_with_what_to_do_next(
    gateway: tuple[str, ScriptedGateway], tmp_path: Path
) -> None:
    address, _ = gateway
    refused = _cli("run", "hello", env=_env(address, "fdk_wrong"))
    assert refused.returncode == 4
    assert refused.stderr.splitlines()[0] == "foredeck run: invalid credentials (API_KEY_INVALID)"
    assert "FOREDECK_API_KEY" in refused.stderr
    assert "Traceback" not in refused.stderr

    invalid = _cli("run", "", env=_env(address))
    assert invalid.returncode == 4
    assert "input: empty" in invalid.stderr

    missing = _cli("show", "nope", env=_env(address))
    assert missing.returncode == 4
    assert "RUN_NOT_FOUND" in missing.stderr

    env = {k: v for k, v in os.environ.items() if not k.startswith("FOREDECK_")}
    unconfigured = _cli("runs", env=env, cwd=tmp_path)
    assert unconfigured.returncode == 2
    assert "FOREDECK_ADDRESS" in unconfigured.stderr
    assert "Traceback" not in unconfigured.stderr
