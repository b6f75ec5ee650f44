"""The escape attempts that the process sandbox (no bubblewrap) must still stop: it keeps
rlimits, seccomp, the scrubbed environment, network and PID namespaces where the host allows
them, the per-call uid when the runner is root, and the kill of everything at the end. (Its
file system is the host's: see the README for what it does not protect.)"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from foredeck.toolrunner.v1 import execution_pb2
from foredeck_toolrunner.adapters.sandbox import SandboxCapabilities

from .conftest import Runner
from .test_toolrunner_escape import (
    ATTEMPT,
    CONNECT,
    assert_all_blocked,
    counting_server,
    eventually_empty,
    processes_with,
    reach,
    run_python,
    stdout_of,
)


@pytest.fixture(autouse=True)
def _namespaces(process_capabilities: SandboxCapabilities) -> None:
    if not (process_capabilities.network_namespaces and process_capabilities.pid_namespaces):
        pytest.skip("the host allows no network or PID namespaces")


async def test_environment_is_scrubbed(
    process_toolrunner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "secret-" + uuid.uuid4().hex
    monkeypatch.setenv("FOREDECK_TOOLRUNNER_TEST_SECRET", secret)
    code = "import os\nprint(dict(os.environ))"
    output = stdout_of(await run_python(process_toolrunner, code))
    assert secret not in output
    assert "FOREDECK_" not in output


async def test_shadow_is_unreadable_as_the_calls_uid(
    process_toolrunner: Runner, process_capabilities: SandboxCapabilities
) -> None:
    if not process_capabilities.root or not os.access("/etc/shadow", os.R_OK):
        pytest.skip("needs a runner running as root (its calls get their own uid)")
    first_line = Path("/etc/shadow").read_text().splitlines()[0]  # noqa: ASYNC240 - small file
    code = ATTEMPT + 'attempt("shadow", lambda: open("/etc/shadow").read())'
    output = stdout_of(await run_python(process_toolrunner, code))
    assert first_line not in output
    assert_all_blocked(output, ["shadow"])


async def test_loopback_server_is_unreachable(process_toolrunner: Runner) -> None:
    async with counting_server("127.0.0.1") as (port, connections):
        await reach("127.0.0.1", port)
        output = stdout_of(
            await run_python(process_toolrunner, CONNECT, host="127.0.0.1", port=port)
        )
        assert_all_blocked(output, ["connect"])
        assert len(connections) == 1


async def test_daemonised_grandchild_is_killed(process_toolrunner: Runner) -> None:
    marker = "daemon-" + uuid.uuid4().hex
    code = f"""
import os, sys
read_end, write_end = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(write_end, b"up")
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
    os._exit(0)
os.close(write_end)
print("STARTED", os.read(read_end, 8).decode())
"""
    reply = await run_python(process_toolrunner, code)
    assert stdout_of(reply).startswith("STARTED up")
    assert await eventually_empty(lambda: processes_with(marker)) == []


async def test_forbidden_system_call_and_memory_bomb(process_toolrunner: Runner) -> None:
    traced = await run_python(
        process_toolrunner, "import ctypes\nctypes.CDLL(None).ptrace(16, 1, 0, 0)"
    )
    assert traced.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_SANDBOX_VIOLATION
    bomb = await run_python(process_toolrunner, "blob = bytearray(8 * 1024 ** 3)")
    assert bomb.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_RESOURCE_LIMIT_EXCEEDED
    assert bomb.sandbox.kind == execution_pb2.SANDBOX_KIND_PROCESS
