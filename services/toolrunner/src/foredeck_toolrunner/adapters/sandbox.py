"""Sandboxed processes for code-running tools: namespaces, rlimits, seccomp, scrubbed env.

Each call gets a fresh process tree:

- **bubblewrap** (when it works here, probed at start): new mount, PID, IPC, UTS, cgroup and
  (unless granted) network namespaces; the root file system is an empty tmpfs with read-only
  binds of the system libraries and the interpreter only, a private size-capped tmpfs work
  directory, its own ``/proc`` and a minimal ``/dev``; no ``/etc/shadow``, ``/root``, ``/home``
  or service data. When the runner is root, the tool runs as an unprivileged uid of its own
  (one per concurrent sandbox) with every capability dropped; otherwise inside a user namespace.
- **process** (fallback): ``unshare`` gives PID and network namespaces and its own ``/proc``
  where possible, the uid drop applies as above, but the file system is the host's, protected
  only by file permissions.

Always: rlimits (address space, CPU time, open files, file size, processes), a seccomp filter,
an environment holding only what the call provides, and a kill of every process of the call
when it ends (the PID namespace's teardown, a sweep by the launcher and a kill of the process
group).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foredeck_kit.logs import get_logger

__all__ = [
    "PROTECTED_PATHS",
    "Sandbox",
    "SandboxCapabilities",
    "SandboxLimits",
    "SandboxRun",
    "SandboxSpec",
    "SandboxUnavailable",
    "probe",
]

_LAUNCHER = (Path(__file__).with_name("sandbox_launcher.py")).read_text
"""Read lazily (at probe time), never at import."""

WORK_DIR = "/work"
PROTECTED_PATHS = (
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/proc",
    "/sys",
    "/dev",
    "/root",
    "/run/secrets",
    "/var/run/secrets",
    "/boot",
)
"""Paths a read-only grant may never name (or contain): they hold the host's secrets."""

_STDERR_TAIL = 8192
_MINIMAL_ETC = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives")


@dataclass(slots=True)
class _Started:
    """A sandbox whose launcher is running and waits for its payload."""

    process: asyncio.subprocess.Process
    report_r: int
    host_work: str | None
    slot: int


class SandboxUnavailable(Exception):
    """No sandbox could be started (limit of concurrent sandboxes, or spawning failed)."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Resource limits of one sandboxed tool process and its children."""

    memory_bytes: int
    cpu_seconds: float
    processes: int
    open_files: int
    file_size_bytes: int


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What one sandboxed call may use and what it runs."""

    limits: SandboxLimits
    work_dir: bool = True
    work_dir_bytes: int = 64 * 1024 * 1024
    read_only_paths: tuple[str, ...] = ()
    network: bool = False
    mode: str = "snippet"
    """``snippet`` (Python code on stdin) or ``exec`` (run ``argv``)."""
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SandboxRun:
    """What a finished sandboxed call produced and what the sandbox measured."""

    kind: str
    stdout: bytes
    stdout_bytes: int
    stderr_tail: bytes
    exit_code: int | None
    signal: int
    cpu_seconds: float
    max_rss_bytes: int
    killed_processes: int
    kill_cause: str | None
    """``timeout`` or ``output`` when the runner stopped the tool, else None."""
    seconds: float


@dataclass(slots=True)
class SandboxCapabilities:
    """What isolation works on this host, found by :func:`probe` at start."""

    kind: str
    """``bubblewrap`` or ``process``."""
    bwrap: str | None
    unshare: str | None
    python: str
    python_prefix: str
    seccomp: bytes | None
    root: bool
    user_namespaces: bool
    network_namespaces: bool
    pid_namespaces: bool
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """A summary for logs and health."""
        return {
            "kind": self.kind,
            "seccomp": self.seccomp is not None,
            "root": self.root,
            "user_namespaces": self.user_namespaces,
            "network_namespaces": self.network_namespaces,
            "pid_namespaces": self.pid_namespaces,
            "notes": list(self.notes),
        }


def _interpreter(configured: str) -> tuple[str, str]:
    if configured:
        path = shutil.which(configured) or configured
        real = os.path.realpath(path)
        prefix = str(Path(real).parent.parent)
        return real, prefix
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)


async def _runs(argv: Sequence[str], *, pass_fds: Sequence[int] = ()) -> bool:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin"},
            pass_fds=pass_fds,
            start_new_session=True,
        )
    except OSError:
        return False
    try:
        async with asyncio.timeout(10):
            await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return False
    return process.returncode == 0


async def probe(mode: str = "auto", python: str = "") -> SandboxCapabilities:
    """Find out which isolation works here; the result is logged and shown in health."""
    interpreter, prefix = _interpreter(python)
    root = os.geteuid() == 0
    notes: list[str] = []
    try:
        from foredeck_toolrunner.adapters.seccomp import compile_filter

        seccomp: bytes | None = compile_filter()
    except Exception as error:
        seccomp = None
        notes.append(f"seccomp unavailable: {type(error).__name__}")
    bwrap = shutil.which("bwrap")
    unshare = shutil.which("unshare")
    userns = await _runs([unshare, "--user", "true"]) if unshare else False
    netns = (
        await _runs([unshare, "--net", *([] if root else ["--user", "--map-root-user"]), "true"])
        if unshare
        else False
    )
    pidns = (
        await _runs(
            [
                unshare,
                "--pid",
                "--fork",
                "--mount-proc",
                *([] if root else ["--user", "--map-root-user"]),
                "true",
            ]
        )
        if unshare
        else False
    )
    caps = SandboxCapabilities(
        kind="process",
        bwrap=None,
        unshare=unshare if (netns or pidns) else None,
        python=interpreter,
        python_prefix=prefix,
        seccomp=seccomp,
        root=root,
        user_namespaces=userns,
        network_namespaces=netns,
        pid_namespaces=pidns,
        notes=notes,
    )
    if mode in ("auto", "bubblewrap") and bwrap is not None:
        caps.bwrap = bwrap
        trial = Sandbox(caps, uid_base=0, max_concurrent=1)
        argv = trial.bwrap_argv(
            SandboxSpec(limits=SandboxLimits(256 << 20, 5, 8, 64, 1 << 20)),
            seccomp_fd=None,
            command=[interpreter, "-I", "-S", "-B", "-c", "pass"],
        )
        if await _runs(argv):
            caps.kind = "bubblewrap"
        else:
            caps.bwrap = None
            notes.append("bubblewrap is installed but cannot create a sandbox here")
    elif bwrap is None:
        notes.append("bubblewrap not found")
    if caps.kind == "process" and root and not python and not _world_readable(interpreter):
        # The call runs as its own uid with the host's file system: it needs an interpreter
        # that uid can read, which a root-owned install (pyenv under /root) is not.
        system = _system_python()
        if system is not None:
            caps.python, caps.python_prefix = _interpreter(system)
            notes.append(f"process sandbox runs snippets with {caps.python}")
        else:
            notes.append("no interpreter readable by the sandbox uid: python snippets will fail")
    if mode == "bubblewrap" and caps.kind != "bubblewrap":
        notes.append("bubblewrap was required and does not work: sandboxed tools are refused")
        caps.kind = "none"
    return caps


def _system_python() -> str | None:
    """A ``python3`` on the system path that every uid can read, if there is one."""
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system is not None and _world_readable(os.path.realpath(system)):
        return system
    return None


def _world_readable(path: str) -> bool:
    """Whether any uid can traverse to ``path`` and read it."""
    current = os.path.realpath(path)
    while True:
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return False
        if current == os.path.realpath(path):
            if not mode & 0o004:
                return False
        elif not mode & 0o001:
            return False
        if current == "/":
            return True
        current = os.path.dirname(current)


def _allowed_read_path(path: str) -> bool:
    normal = os.path.normpath(path)
    return not any(
        normal == p
        or normal.startswith(p + "/")
        or p.startswith(normal.rstrip("/") + "/")
        or normal == "/"
        for p in PROTECTED_PATHS
    )


class Sandbox:
    """Starts sandboxed processes according to the probed capabilities."""

    def __init__(
        self,
        capabilities: SandboxCapabilities,
        *,
        uid_base: int,
        max_concurrent: int,
        pool_size: int = 0,
    ) -> None:
        self.capabilities = capabilities
        self._uid_base = uid_base
        self._free_slots = list(range(max_concurrent))
        self._launcher = _LAUNCHER()
        self._log = get_logger("foredeck.toolrunner.sandbox")
        self._pool_size = pool_size
        self._pool: dict[tuple[object, ...], list[_Started]] = {}
        self._refills: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def kind(self) -> str:
        """``bubblewrap``, ``process`` or ``none``."""
        return self.capabilities.kind

    def bwrap_argv(
        self, spec: SandboxSpec, *, seccomp_fd: int | None, command: Sequence[str]
    ) -> list[str]:
        """The bubblewrap command line that runs ``command`` under ``spec``."""
        caps = self.capabilities
        assert caps.bwrap is not None
        argv = [
            caps.bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
        ]
        if not spec.network:
            argv.append("--unshare-net")
        if caps.root:
            argv += ["--cap-drop", "ALL"]
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"):
                argv += ["--cap-add", cap]
        else:
            argv.append("--unshare-user")
        for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        for directory in self._parents(spec):
            argv += ["--perms", "0755", "--dir", directory]
        if not caps.python_prefix.startswith("/usr/"):
            argv += ["--ro-bind", caps.python_prefix, caps.python_prefix]
        for path in _MINIMAL_ETC:
            argv += ["--ro-bind-try", path, path]
        if spec.network:
            for path in ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl"):
                argv += ["--ro-bind-try", path, path]
        for path in spec.read_only_paths:
            argv += ["--ro-bind-try", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        if spec.work_dir:
            argv += ["--size", str(spec.work_dir_bytes), "--tmpfs", WORK_DIR, "--chdir", WORK_DIR]
        else:
            argv += ["--chdir", "/"]
        argv += ["--remount-ro", "/"]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        argv += ["--", *command]
        return argv

    def _parents(self, spec: SandboxSpec) -> list[str]:
        """Directories bubblewrap must create world-traversable above each bind target."""
        targets = ["/etc/x", *spec.read_only_paths]
        if not self.capabilities.python_prefix.startswith("/usr/"):
            targets.append(self.capabilities.python_prefix)
        parents: list[str] = []
        for target in targets:
            parent = os.path.dirname(os.path.normpath(target))
            chain: list[str] = []
            while parent not in ("/", ""):
                chain.append(parent)
                parent = os.path.dirname(parent)
            for directory in reversed(chain):
                top = "/" + directory.strip("/").split("/")[0]
                if top in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
                    break
                if directory not in parents:
                    parents.append(directory)
        return parents

    def _process_argv(self, spec: SandboxSpec, command: Sequence[str]) -> tuple[list[str], bool]:
        caps = self.capabilities
        if caps.unshare is None:
            return list(command), False
        argv = [caps.unshare, "--kill-child"]
        own_pid = caps.pid_namespaces
        if own_pid:
            argv += ["--pid", "--fork", "--mount-proc"]
        if not spec.network and caps.network_namespaces:
            argv.append("--net")
        if not caps.root:
            argv += ["--user", "--map-root-user"]
        return [*argv, *command], own_pid

    def _take_slot(self) -> int:
        if not self._free_slots:
            raise SandboxUnavailable("too many sandboxes running")
        return self._free_slots.pop()

    def _give_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    @contextlib.asynccontextmanager
    async def _slot(self) -> Any:
        slot = self._take_slot()
        try:
            yield slot
        finally:
            self._give_slot(slot)

    def _env(self, spec: SandboxSpec, work: str | None) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": work or "/",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if work:
            env["TMPDIR"] = work
        env.update(spec.env)
        return env

    def check(self, spec: SandboxSpec) -> None:
        """Refuse a spec whose read-only paths would expose the host's secrets."""
        for path in spec.read_only_paths:
            if not _allowed_read_path(path):
                raise ValueError(f"read-only path {path!r} is not allowed")

    @contextlib.asynccontextmanager
    async def exec_argv(self, spec: SandboxSpec) -> Any:
        """A command line running ``spec.argv`` in a sandbox, for a library that spawns it.

        The MCP client starts stdio servers itself, so the sandbox is expressed as the command
        it runs; the seccomp filter is then installed by the launcher. Holds a sandbox slot
        (and with it a uid) while the block runs.
        """
        if self.kind == "none":
            raise SandboxUnavailable("no sandbox works on this host")
        self.check(spec)
        async with self._slot() as slot:
            caps = self.capabilities
            if caps.kind == "bubblewrap":
                command = self._command(
                    spec, slot, None, WORK_DIR if spec.work_dir else None, True, seccomp=True
                )
                yield self.bwrap_argv(spec, seccomp_fd=None, command=command)
                return
            host_work = tempfile.mkdtemp(prefix="foredeck-tool-") if spec.work_dir else None
            try:
                _, own_pid = self._process_argv(spec, [])
                command = self._command(spec, slot, None, host_work, own_pid)
                argv, _ = self._process_argv(spec, command)
                yield argv
            finally:
                if host_work is not None:
                    shutil.rmtree(host_work, ignore_errors=True)

    async def run(
        self, spec: SandboxSpec, payload: bytes, *, time_limit: float, max_output: int
    ) -> SandboxRun:
        """Run one sandboxed call to the end, the timeout or the output cap; kill everything."""
        if self.kind == "none":
            raise SandboxUnavailable("no sandbox works on this host")
        self.check(spec)
        started = self._from_pool(spec) if spec.mode == "snippet" else None
        if started is None:
            started = await self._start(spec)
        if self._pool_size and spec.mode == "snippet":
            self._refill(spec)
        try:
            return await self._supervise(
                started.process, payload, started.report_r, time_limit, max_output, time.monotonic()
            )
        finally:
            self._dispose(started)

    def _command(
        self,
        spec: SandboxSpec,
        slot: int,
        report_fd: int | None,
        work: str | None,
        own_pid: bool,
        *,
        seccomp: bool = False,
    ) -> list[str]:
        caps = self.capabilities
        config: dict[str, Any] = {
            "mode": spec.mode,
            "uid": self._uid_base + slot if caps.root else None,
            "work_dir": work,
            "report_fd": report_fd,
            "own_pid_namespace": own_pid,
            "limits": {
                "memory_bytes": spec.limits.memory_bytes,
                "cpu_seconds": spec.limits.cpu_seconds,
                "processes": spec.limits.processes,
                "open_files": spec.limits.open_files,
                "file_size_bytes": spec.limits.file_size_bytes,
                "core": 0,
            },
            "argv": list(spec.argv),
            "env": self._env(spec, work),
        }
        if (seccomp or caps.kind != "bubblewrap") and caps.seccomp is not None:
            config["seccomp"] = caps.seccomp.hex()
        return [
            caps.python,
            "-I",
            "-S",
            "-B",
            "-c",
            self._launcher,
            json.dumps(config, separators=(",", ":")),
        ]

    async def _start(self, spec: SandboxSpec) -> _Started:
        """Start a sandbox whose launcher waits for its payload on standard input."""
        caps = self.capabilities
        slot = self._take_slot()
        report_r, report_w = os.pipe()
        seccomp_fd: int | None = None
        host_work: str | None = None
        fds = [report_w]
        try:
            if caps.kind == "bubblewrap":
                if caps.seccomp is not None:
                    seccomp_fd = os.memfd_create("seccomp", 0)
                    os.write(seccomp_fd, caps.seccomp)
                    os.lseek(seccomp_fd, 0, os.SEEK_SET)
                    fds.append(seccomp_fd)
                work = WORK_DIR if spec.work_dir else None
                command = self._command(spec, slot, report_w, work, True)
                argv = self.bwrap_argv(spec, seccomp_fd=seccomp_fd, command=command)
            else:
                if spec.work_dir:
                    host_work = tempfile.mkdtemp(prefix="foredeck-tool-")
                    os.chmod(host_work, 0o700)
                work = host_work
                _, own_pid = self._process_argv(spec, [])
                command = self._command(spec, slot, report_w, host_work, own_pid)
                argv, _ = self._process_argv(spec, command)
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(spec, work),
                pass_fds=fds,
                start_new_session=True,
                cwd="/",
            )
        except BaseException as error:
            os.close(report_r)
            if host_work is not None:
                shutil.rmtree(host_work, ignore_errors=True)
            self._give_slot(slot)
            if isinstance(error, OSError):
                raise SandboxUnavailable(f"cannot start the sandbox: {error.strerror}") from None
            raise
        finally:
            os.close(report_w)
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        return _Started(process, report_r, host_work, slot)

    def _dispose(self, started: _Started) -> None:
        os.close(started.report_r)
        if started.host_work is not None:
            shutil.rmtree(started.host_work, ignore_errors=True)
        self._give_slot(started.slot)

    @staticmethod
    def _pool_key(spec: SandboxSpec) -> tuple[object, ...]:
        return (spec.limits, spec.work_dir, spec.work_dir_bytes, spec.read_only_paths, spec.network)

    def _from_pool(self, spec: SandboxSpec) -> _Started | None:
        """A sandbox started ahead of need for this spec, still waiting for its payload."""
        waiting = self._pool.get(self._pool_key(spec), [])
        while waiting:
            started = waiting.pop()
            if started.process.returncode is None:
                return started
            # Died while waiting (killed from outside): never used, cleaned up in the background.
            task = asyncio.create_task(self._discard(started))
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)
        return None

    def _refill(self, spec: SandboxSpec) -> None:
        """Start sandboxes in the background until the spec's pool is full again."""
        if self._closed:
            return
        key = self._pool_key(spec)
        missing = (
            self._pool_size
            - len(self._pool.get(key, []))
            - sum(1 for task in self._refills if task.get_name() == repr(key))
        )
        for _ in range(max(missing, 0)):
            if len(self._free_slots) <= 1:
                return  # never let the pool take the last slots from calls
            task = asyncio.create_task(self._prestart(key, spec), name=repr(key))
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)

    async def _prestart(self, key: tuple[object, ...], spec: SandboxSpec) -> None:
        try:
            started = await self._start(spec)
        except SandboxUnavailable:
            return
        if self._closed:
            await self._discard(started)
            return
        self._pool.setdefault(key, []).append(started)

    async def warm(self, spec: SandboxSpec) -> None:
        """Fill the pool for ``spec`` (the default `python` policy, at start)."""
        if self._pool_size and self.kind != "none":
            self._refill(spec)
            await asyncio.gather(*self._refills, return_exceptions=True)

    async def close(self) -> None:
        """Kill every sandbox started ahead of need."""
        self._closed = True
        # Let starts in flight finish (each kills its sandbox once it sees the pool closed):
        # cancelling one mid-spawn could orphan the process it was creating.
        await asyncio.gather(*self._refills, return_exceptions=True)
        for waiting in self._pool.values():
            for started in waiting:
                await self._discard(started)
        self._pool.clear()

    async def _discard(self, started: _Started) -> None:
        """Kill an unused sandbox and release its pipes, uid slot and work directory."""
        self._kill(started.process)
        if started.process.stdin is not None:
            started.process.stdin.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await started.process.communicate()
        self._dispose(started)

    @staticmethod
    def _kill(process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    async def _supervise(
        self,
        process: asyncio.subprocess.Process,
        payload: bytes,
        report_r: int,
        time_limit: float,
        max_output: int,
        started: float,
    ) -> SandboxRun:
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        stdout = bytearray()
        stdout_total = 0
        stderr_tail = bytearray()
        kill_cause: str | None = None
        overflow = asyncio.Event()

        async def feed() -> None:
            assert process.stdin
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    process.stdin.write(payload)
                    await process.stdin.drain()
            finally:
                process.stdin.close()

        async def read_out() -> None:
            nonlocal stdout_total
            assert process.stdout
            while chunk := await process.stdout.read(65536):
                stdout_total += len(chunk)
                room = max_output + 1 - len(stdout)
                if room > 0:
                    stdout.extend(chunk[:room])
                if stdout_total > max_output:
                    # Keep draining after the kill: the pipe closes only once its EOF is read.
                    overflow.set()

        async def read_err() -> None:
            assert process.stderr
            while chunk := await process.stderr.read(65536):
                stderr_tail.extend(chunk)
                del stderr_tail[:-_STDERR_TAIL]

        tasks = [asyncio.create_task(t) for t in (feed(), read_out(), read_err())]
        try:
            overflow_wait = asyncio.ensure_future(overflow.wait())
            done_wait = asyncio.ensure_future(self._finish(process, tasks))
            try:
                finished, _ = await asyncio.wait(
                    {overflow_wait, done_wait},
                    timeout=time_limit,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                overflow_wait.cancel()
            if overflow_wait in finished and overflow.is_set():
                kill_cause = "output"
            elif done_wait not in finished:
                kill_cause = "timeout"
            if kill_cause is not None:
                self._kill(process)
            done_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await done_wait
        finally:
            # Runs on cancellation too (the caller's deadline): nothing of the call survives.
            self._kill(process)
            await asyncio.shield(self._reap(process, tasks))
        report = self._report(report_r)
        return SandboxRun(
            kind=self.kind,
            stdout=bytes(stdout[:max_output]),
            stdout_bytes=stdout_total,
            stderr_tail=bytes(stderr_tail),
            exit_code=report.get("exit_code") if report else None,
            signal=int(report.get("signal", 0)) if report else signal.SIGKILL,
            cpu_seconds=float(report.get("cpu_seconds", 0.0)) if report else 0.0,
            max_rss_bytes=int(report.get("max_rss_bytes", 0)) if report else 0,
            killed_processes=int(report.get("killed", 0)) if report else 1,
            kill_cause=kill_cause,
            seconds=time.monotonic() - started,
        )

    @staticmethod
    async def _finish(process: asyncio.subprocess.Process, tasks: list[asyncio.Task[None]]) -> None:
        # asyncio.wait, not gather: cancelling this wait must leave the readers draining.
        await asyncio.wait(tasks[1:])
        await process.wait()

    @staticmethod
    async def _reap(process: asyncio.subprocess.Process, tasks: list[asyncio.Task[None]]) -> None:
        # The readers drain to EOF, which comes once every process holding a pipe is dead;
        # a reader cancelled early would leave its pipe open and the process never reaped.
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(*tasks, return_exceptions=True)
        except TimeoutError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.feed_eof()
        await process.wait()

    @staticmethod
    def _report(fd: int) -> dict[str, Any] | None:
        os.set_blocking(fd, False)
        try:
            data = os.read(fd, 65536)
        except OSError:
            return None
        try:
            value = json.loads(data) if data else None
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def describe(self) -> dict[str, Any]:
        """The capabilities, for logs and health."""
        return self.capabilities.describe()
