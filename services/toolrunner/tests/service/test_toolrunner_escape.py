"""Escape attempts from the sandbox of the `python` tool: each must fail, and each test proves
both that the target was really there (the test reaches it itself) and that the tool did not.

Network targets are only loopback servers and a network namespace the test creates; loops in
the attempts are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as svc

from .conftest import Runner

pytestmark = pytest.mark.usefixtures("bubblewrap")


async def run_python(
    runner: Runner, code: str, tool: str = "python", **arguments: object
) -> svc.ExecuteToolResponse:
    request = svc.ExecuteToolRequest(
        tool_name=tool,
        arguments_json=json.dumps({"code": code, "input": arguments}),
        idempotency_key=uuid.uuid4().hex,
    )
    return await runner.runner.ExecuteTool(request, metadata=runner.md(), timeout=60)


def stdout_of(reply: svc.ExecuteToolResponse) -> str:
    assert reply.outcome.WhichOneof("outcome") == "output", reply.outcome
    return str(json.loads(reply.outcome.output.output_json)["stdout"])


ATTEMPT = """
def attempt(label, action):
    try:
        result = action()
    except BaseException as error:
        print(label, "BLOCKED", type(error).__name__)
    else:
        print(label, "ESCAPED", repr(result)[:200])
"""


def assert_all_blocked(output: str, labels: list[str]) -> None:
    lines = dict(line.split(" ", 1) for line in output.strip().splitlines())
    for label in labels:
        assert lines[label].startswith("BLOCKED"), (label, lines[label])


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


async def eventually_empty(probe: object, deadline: float = 10.0) -> list[int]:
    """Poll a /proc scan until it is empty or the deadline passes; return the last scan."""
    assert callable(probe)
    end = time.monotonic() + deadline
    while True:
        left = probe()
        if not left or time.monotonic() > end:
            return list(left)
        await asyncio.sleep(0.05)


async def test_cannot_read_shadow_or_other_secrets(toolrunner: Runner) -> None:
    shadow = Path("/etc/shadow")
    if not os.access(shadow, os.R_OK):
        pytest.skip("the test itself cannot read /etc/shadow")
    first_line = shadow.read_text().splitlines()[0]  # noqa: ASYNC240 - a small local file
    code = (
        ATTEMPT
        + """
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("proc_root", lambda: open("/proc/1/root/etc/shadow").read())
attempt("root_home", lambda: __import__("os").listdir("/root/.ssh"))
attempt("passwd", lambda: open("/etc/passwd").read())
"""
    )
    reply = await run_python(toolrunner, code)
    output = stdout_of(reply)
    assert first_line not in output
    assert_all_blocked(output, ["shadow", "proc_root", "root_home", "passwd"])
    assert reply.sandbox.kind == execution_pb2.SANDBOX_KIND_BUBBLEWRAP


async def test_cannot_see_the_services_environment(
    toolrunner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "secret-" + uuid.uuid4().hex
    monkeypatch.setenv("FOREDECK_TOOLRUNNER_TEST_SECRET", secret)
    assert secret in os.environ.values()
    code = """
import os
print(dict(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            print(pid, open(f"/proc/{pid}/environ", "rb").read())
        except OSError as error:
            print(pid, "BLOCKED", type(error).__name__)
try:
    print(open(f"/proc/{arguments['service_pid']}/environ", "rb").read())
except OSError as error:
    print("service BLOCKED", type(error).__name__)
"""
    output = stdout_of(await run_python(toolrunner, code, service_pid=os.getpid()))
    assert secret not in output
    assert "FOREDECK_" not in output
    assert "service BLOCKED" in output


async def test_cannot_write_outside_the_work_dir(toolrunner: Runner, tmp_path: Path) -> None:
    target = tmp_path / "written-by-tool"
    code = (
        ATTEMPT
        + """
import os
def write(path):
    with open(path, "w") as f:
        f.write("x")
    return path
attempt("host_tmp", lambda: write(arguments["target"]))
attempt("tmp", lambda: write("/tmp/x"))
attempt("usr", lambda: write("/usr/x"))
attempt("root", lambda: write("/x"))
attempt("etc", lambda: write("/etc/x"))
attempt("python", lambda: write(os.path.dirname(os.__file__) + "/x.py"))
attempt("work", lambda: write("inside-work-dir"))
"""
    )
    output = stdout_of(await run_python(toolrunner, code, target=str(target)))
    assert_all_blocked(output, ["host_tmp", "tmp", "usr", "root", "etc", "python"])
    assert "work ESCAPED" in output  # the positive control: the work dir is writable
    assert not target.exists()


async def test_symlinks_do_not_lead_out(toolrunner: Runner, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret")
    code = (
        ATTEMPT
        + """
import os
os.symlink("/etc/shadow", "shadow_link")
os.symlink(arguments["secret"], "host_link")
os.symlink("/proc/1/root", "root_link")
attempt("shadow", lambda: open("shadow_link").read())
attempt("host", lambda: open("host_link").read())
attempt("host_write", lambda: open("host_link", "w").write("x"))
attempt("proc_root", lambda: os.listdir("root_link/etc"))
"""
    )
    output = stdout_of(await run_python(toolrunner, code, secret=str(secret)))
    assert_all_blocked(output, ["shadow", "host", "host_write", "proc_root"])
    assert "host-secret" not in output
    assert secret.read_text() == "host-secret"


@contextlib.asynccontextmanager
async def counting_server(host: str) -> AsyncIterator[tuple[int, list[int]]]:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, connections
    finally:
        server.close()
        await server.wait_closed()


async def reach(host: str, port: int) -> int:
    """Connect from the test itself (proving the server is reachable); return the local port."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    local_port = int(writer.get_extra_info("sockname")[1])
    writer.close()
    await writer.wait_closed()
    return local_port


CONNECT = (
    ATTEMPT
    + """
import socket
def connect():
    s = socket.create_connection((arguments["host"], arguments["port"]), timeout=2)
    s.close()
attempt("connect", connect)
"""
)


async def test_cannot_connect_to_a_loopback_server(toolrunner: Runner) -> None:
    async with counting_server("127.0.0.1") as (port, connections):
        await reach("127.0.0.1", port)
        assert len(connections) == 1
        output = stdout_of(await run_python(toolrunner, CONNECT, host="127.0.0.1", port=port))
        assert_all_blocked(output, ["connect"])
        await reach("127.0.0.1", port)
        assert len(connections) == 2


NAMESPACE_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 0))
server.listen(16)
print("PORT", server.getsockname()[1], flush=True)
while True:
    connection, peer = server.accept()
    print("CONNECTION", peer[1], flush=True)
    connection.close()
"""


@pytest_asyncio.fixture
async def namespace_server() -> AsyncIterator[tuple[str, int, asyncio.Queue[int]]]:
    """A TCP server inside a network namespace the test creates, reachable over a veth pair.

    Yields the server's address, its port and a queue of the peer ports it accepted, in order.
    """
    ip = shutil.which("ip")
    if os.geteuid() != 0 or ip is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    tag = uuid.uuid4().hex[:6]
    namespace, host_end, peer_end = f"trt{tag}", f"trh{tag}", f"trp{tag}"
    octet = int(tag[:2], 16) % 200 + 20
    address = f"10.231.{octet}.2"

    def sh(*args: str) -> None:
        subprocess.run([ip, *args], check=True, capture_output=True, timeout=10)

    def cleanup() -> None:
        subprocess.run([ip, "link", "del", host_end], capture_output=True, timeout=10)
        subprocess.run([ip, "netns", "del", namespace], capture_output=True, timeout=10)

    try:
        sh("netns", "add", namespace)
        sh("link", "add", host_end, "type", "veth", "peer", "name", peer_end)
        sh("link", "set", peer_end, "netns", namespace)
        sh("addr", "add", f"10.231.{octet}.1/30", "dev", host_end)
        sh("link", "set", host_end, "up")
        sh("-n", namespace, "addr", "add", f"{address}/30", "dev", peer_end)
        sh("-n", namespace, "link", "set", peer_end, "up")
        sh("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError:
        cleanup()
        pytest.skip("network namespaces cannot be created here")
    process = await asyncio.create_subprocess_exec(
        ip,
        "netns",
        "exec",
        namespace,
        sys.executable,
        "-c",
        NAMESPACE_SERVER,
        address,
        stdout=asyncio.subprocess.PIPE,
    )
    accepted: asyncio.Queue[int] = asyncio.Queue()
    try:
        assert process.stdout is not None
        async with asyncio.timeout(15):
            first = (await process.stdout.readline()).decode().split()
        assert first[0] == "PORT", first
        stdout = process.stdout

        async def collect() -> None:
            while line := await stdout.readline():
                accepted.put_nowait(int(line.split()[1]))

        collector = asyncio.create_task(collect())
        yield address, int(first[1]), accepted
    finally:
        process.kill()
        await process.wait()
        cleanup()
    await collector


async def test_cannot_connect_to_a_server_in_a_test_network_namespace(
    toolrunner: Runner, namespace_server: tuple[str, int, asyncio.Queue[int]]
) -> None:
    address, port, accepted = namespace_server
    first = await reach(address, port)
    assert await asyncio.wait_for(accepted.get(), 5) == first
    output = stdout_of(await run_python(toolrunner, CONNECT, host=address, port=port))
    assert_all_blocked(output, ["connect"])
    # Connections are accepted in order, so one by the tool would come before this one.
    second = await reach(address, port)
    assert await asyncio.wait_for(accepted.get(), 5) == second


async def test_cannot_resolve_names(toolrunner: Runner) -> None:
    received: list[bytes] = []

    arrived = asyncio.Event()

    class Dns(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            received.append(data)
            arrived.set()

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Dns, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        probe_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe_socket.sendto(b"probe", ("127.0.0.1", port))
        probe_socket.close()
        async with asyncio.timeout(5):
            await arrived.wait()
        code = (
            ATTEMPT
            + """
import socket, os
query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
def udp_dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(query, ("127.0.0.1", arguments["port"]))
    return s.recv(512)
attempt("udp_dns", udp_dns)
attempt("resolv_conf", lambda: open("/etc/resolv.conf").read())
attempt("hosts", lambda: open("/etc/hosts").read())
"""
        )
        output = stdout_of(await run_python(toolrunner, code, port=port))
        assert_all_blocked(output, ["udp_dns", "resolv_conf", "hosts"])
        assert received == [b"probe"]
    finally:
        transport.close()


async def test_fork_bomb_is_capped_and_cleaned_up(toolrunner: Runner) -> None:
    marker = "bomb-" + uuid.uuid4().hex
    code = f"""
import os, sys
forks = 0
try:
    for _ in range(10000):
        if os.fork() == 0:
            args = [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"]
            os.execv(sys.executable, args)
        forks += 1
except OSError as error:
    print("STOPPED", forks, type(error).__name__)
"""
    reply = await run_python(toolrunner, code)
    output = stdout_of(reply)
    assert output.startswith("STOPPED")
    assert int(output.split()[1]) < 16  # the default process limit
    assert reply.sandbox.killed_processes == int(output.split()[1])
    assert await eventually_empty(lambda: processes_with(marker)) == []


async def test_memory_bomb_hits_the_memory_limit(toolrunner: Runner) -> None:
    reply = await run_python(toolrunner, "blob = bytearray(8 * 1024 ** 3)\nprint(len(blob))")
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_RESOURCE_LIMIT_EXCEEDED


async def test_cpu_spin_past_the_timeout_is_stopped(toolrunner: Runner) -> None:
    marker = "spin-" + uuid.uuid4().hex
    policy = tool_pb2.ToolPolicy(safe_to_log=False)
    policy.timeout.FromMilliseconds(700)
    policy.filesystem.work_dir = True
    await register_python(toolrunner, "spin_python", policy)
    code = f"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "while True: pass", "{marker}"])
while True:
    pass
"""
    reply = await run_python(toolrunner, code, tool="spin_python")
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_TIMEOUT
    assert await eventually_empty(lambda: processes_with(marker)) == []


async def register_python(runner: Runner, name: str, policy: tool_pb2.ToolPolicy) -> None:
    tool = tool_pb2.Tool(builtin=tool_pb2.BuiltinRuntime(builtin_name="python"), policy=policy)
    tool.definition.name = name
    tool.definition.description = "python under a test policy"
    tool.definition.parameters_json_schema = json.dumps(
        {"type": "object", "properties": {"code": {"type": "string"}, "input": {"type": "object"}}}
    )
    await runner.registry.RegisterTool(
        svc.RegisterToolRequest(request_id=uuid.uuid4().hex, tool=tool), metadata=runner.md()
    )


async def test_stdout_flood_is_cut_off(toolrunner: Runner) -> None:
    policy = tool_pb2.ToolPolicy(
        max_output_bytes=64 * 1024, output_overflow=tool_pb2.OUTPUT_OVERFLOW_FAIL
    )
    await register_python(toolrunner, "flood_python", policy)
    reply = await run_python(
        toolrunner,
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        tool="flood_python",
    )
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_OUTPUT_TOO_LARGE
    assert reply.sandbox.termination_signal == 9


async def test_background_process_does_not_outlive_the_call(toolrunner: Runner) -> None:
    marker = "daemon-" + uuid.uuid4().hex
    code = f"""
import os, sys, time
read_end, write_end = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(read_end)
        os.write(write_end, str(os.getpid()).encode())
        os.close(write_end)
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
    os._exit(0)
os.close(write_end)
print("STARTED", os.read(read_end, 32).decode())
"""
    reply = await run_python(toolrunner, code)
    assert stdout_of(reply).startswith("STARTED ")
    assert reply.sandbox.killed_processes >= 1
    assert await eventually_empty(lambda: processes_with(marker)) == []


async def test_forbidden_system_call_is_a_sandbox_violation(toolrunner: Runner) -> None:
    code = "import ctypes\nctypes.CDLL(None).ptrace(16, 1, 0, 0)\nprint('traced')"
    reply = await run_python(toolrunner, code)
    assert reply.outcome.error.kind == execution_pb2.TOOL_ERROR_KIND_SANDBOX_VIOLATION
    assert reply.sandbox.termination_signal == 31


async def test_caller_deadline_kills_everything(toolrunner: Runner) -> None:
    marker = "deadline-" + uuid.uuid4().hex
    code = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
time.sleep(120)
"""
    request = svc.ExecuteToolRequest(
        tool_name="python",
        arguments_json=json.dumps({"code": code}),
        idempotency_key=uuid.uuid4().hex,
    )
    call = toolrunner.runner.ExecuteTool(request, metadata=toolrunner.md(), timeout=1.5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await eventually_empty(lambda: processes_with(marker)) == []
