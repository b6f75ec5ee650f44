"""`foredeck up`: the whole platform on one machine, from pip-installed packages only.

Starts redis-server and the ArcadeDB Bolt server, then every service published in the
``foredeck.stack`` entry-point group in dependency order, each gated on its standard gRPC
health check. It streams every component's log, writes the addresses to ``stack.json`` in the
data directory, and on SIGINT or SIGTERM stops everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, TextIO

from foredeck_kit.principal import MIN_KEY_BYTES, generate_key
from foredeck_stack.services import (
    StackConfigError,
    StackContext,
    StackService,
    discover_services,
    select_services,
)
from foredeck_stack.stores import (
    LOCALHOST,
    ArcadeDbProcess,
    LogFollower,
    ManagedProcess,
    RedisProcess,
    StoreError,
    free_port,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "GRAPH_DATABASE",
    "STACK_FILE",
    "StackNotRunningError",
    "UpOptions",
    "load_or_create_principal_keys",
    "read_stack_file",
    "run_up",
]

DEFAULT_DATA_DIR = Path(".foredeck")
STACK_FILE = "stack.json"
PRINCIPAL_KEYS_FILE = "principal-keys.json"
DELEGATION_KEYS_FILE = "delegation-keys.json"
ARCADEDB_PASSWORD_FILE = "arcadedb.password"
GRAPH_DATABASE = "foredeck"
"""Database created at start and served to Bolt clients that name none."""

_SERVICE_START_ATTEMPTS = 3
_BIND_FAILURES = ("address already in use", "failed to bind")
_LOG_POLL_SECONDS = 0.1
_HEALTH_POLL_SECONDS = 0.1
_HEALTH_CHECK_TIMEOUT = 2.0


@dataclass(frozen=True)
class UpOptions:
    """What `foredeck up` was asked to do."""

    data_dir: Path = DEFAULT_DATA_DIR
    only: tuple[str, ...] | None = None
    """Services to start (plus what they need); None starts every installed service."""
    ready_within: float = 60.0
    """Seconds each component gets to become ready."""
    stop_grace: float = 10.0
    """Seconds each service gets to exit after SIGTERM before it is killed."""
    follow_logs: bool = False
    """Stream every component's log to the terminal; by default each log stays in its file and
    the terminal shows only progress, health changes and failures."""
    health_interval: float = 2.0
    """Seconds between health checks of the running services (a change is printed)."""


class StackNotRunningError(RuntimeError):
    """No `foredeck up` is running on the data directory."""


class _ComponentFailedError(Exception):
    """A component did not start; the message says why and carries its log tail."""


class _Child(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def running(self) -> bool: ...

    async def wait(self) -> int: ...

    async def stop(self, grace: float = ...) -> object: ...

    def log_tail(self, max_lines: int = ...) -> str: ...


@dataclass
class _Component:
    name: str
    kind: str
    child: _Child
    log_path: Path
    follower: LogFollower
    grace: float
    address: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# --- files in the data directory ------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, readable by the owner alone."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_or_create_principal_keys(
    path: Path, *, kid_prefix: str = "local"
) -> tuple[dict[str, str], str]:
    """Read a set of the stack's signing keys, creating them (mode 0600) on first start.

    Returns ``(keys by kid, active kid)``. Keeping them across restarts keeps every token
    minted before a restart valid after it. The gateway's principal keys and the orchestrator's
    delegation keys are two such sets, told apart by ``kid_prefix`` so their ids never collide.
    """
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            keys = {str(kid): str(secret) for kid, secret in data["keys"].items()}
            active = str(data["active_kid"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise StackConfigError(f"{path} is not a principal key file: {error}") from error
        if active not in keys or any(len(secret) < MIN_KEY_BYTES for secret in keys.values()):
            raise StackConfigError(
                f"{path}: the active key must be listed and every key must be >= "
                f"{MIN_KEY_BYTES} characters"
            )
        return keys, active
    active = f"{kid_prefix}-{datetime.now(UTC):%Y%m%d}"
    keys = {active: generate_key().decode()}
    _write_private(path, json.dumps({"active_kid": active, "keys": keys}, indent=2) + "\n")
    return keys, active


def _load_or_create_password(path: Path) -> str:
    """The ArcadeDB root password: ArcadeDB fixes it when the database directory is created."""
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    password = secrets.token_urlsafe(24)
    _write_private(path, password + "\n")
    return password


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_stack_file(data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, Any]:
    """Return the addresses the running `foredeck up` wrote (see the client README for keys)."""
    path = data_dir / STACK_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StackNotRunningError(f"no local stack is running on {data_dir}") from None
    if not _pid_alive(int(info.get("pid", 0))):
        raise StackNotRunningError(f"{path} was left by a `foredeck up` that is gone")
    return info


class _DataDirLock:
    """Keeps two `foredeck up` runs from sharing one data directory (and one Redis AOF)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        handle = self._path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StackConfigError(
                f"{self._path.parent} is in use by another `foredeck up` (pid {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# --- the runner -----------------------------------------------------------------------------


class _Stack:
    def __init__(self, options: UpOptions, out: TextIO, err: TextIO) -> None:
        self.options = options
        self.data_dir = options.data_dir.resolve()
        self.logs_dir = self.data_dir / "logs"
        self.out = out
        self.err = err
        self.components: list[_Component] = []
        self.stop_requested = asyncio.Event()
        self.signal_name = ""
        self.redis: RedisProcess | None = None
        self.graph: ArcadeDbProcess | None = None
        self.principal_keys: dict[str, str] = {}
        self.active_kid = ""
        self.delegation_keys: dict[str, str] = {}
        self.delegation_kid = ""
        self._name_width = 8

    # output

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def complain(self, message: str) -> None:
        print(message, file=self.err, flush=True)

    def _relative(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd()))
        return str(path)

    def _pump_logs(self) -> None:
        if not self.options.follow_logs:
            return
        for component in self.components:
            for line in component.follower.read_lines():
                self.say(f"{component.name:<{self._name_width}} | {line}")

    def _drain_logs(self) -> None:
        if not self.options.follow_logs:
            return
        for component in self.components:
            for line in component.follower.flush():
                self.say(f"{component.name:<{self._name_width}} | {line}")

    def _status(self, name: str, message: str) -> None:
        """One progress line: the component's name in a column, then what happened."""
        self.say(f"{name:<{self._name_width}}  {message}")

    def _ready(self, component: _Component, since: float) -> None:
        seconds = time.monotonic() - since
        self._status(component.name, f"ready on {component.address} ({seconds:.1f} s)")

    async def _stream_logs(self) -> None:
        while True:
            self._pump_logs()
            await asyncio.sleep(_LOG_POLL_SECONDS)

    # lifecycle

    def _on_signal(self, signum: signal.Signals) -> None:
        if not self.stop_requested.is_set():
            self.signal_name = signum.name
            self.stop_requested.set()

    def _plan(self) -> list[StackService]:
        services = discover_services()
        if self.options.only is not None:
            services = select_services(services, self.options.only)
        names = ["redis", "arcadedb", *(s.name for s in services)]
        self._name_width = max(len(n) for n in names)
        return services

    def _follower(self, path: Path) -> LogFollower:
        try:
            offset = path.stat().st_size
        except FileNotFoundError:
            offset = 0
        return LogFollower(path, offset)

    async def _start_stores(self) -> None:
        password = _load_or_create_password(self.data_dir / ARCADEDB_PASSWORD_FILE)
        redis_log = self.logs_dir / "redis.log"
        redis = RedisProcess(self.data_dir / "redis", log_path=redis_log)
        follower = self._follower(redis_log)
        self._status("redis", "starting")
        since = time.monotonic()
        await redis.start(ready_within=self.options.ready_within)
        self.redis = redis
        self.components.append(
            _Component(
                name="redis",
                kind="store",
                child=redis,
                log_path=redis_log,
                follower=follower,
                grace=self.options.stop_grace,
                address=redis.url,
                details={"url": redis.url, "host": LOCALHOST, "port": redis.port},
            )
        )
        self._ready(self.components[-1], since)
        graph_log = self.logs_dir / "arcadedb.log"
        graph = ArcadeDbProcess(
            self.data_dir / "arcadedb",
            password=password,
            log_path=graph_log,
            default_database=GRAPH_DATABASE,
        )
        follower = self._follower(graph_log)
        self._status("arcadedb", "starting")
        since = time.monotonic()
        await graph.start(ready_within=self.options.ready_within)
        self.graph = graph
        self.components.append(
            _Component(
                name="arcadedb",
                kind="store",
                child=graph,
                log_path=graph_log,
                follower=follower,
                grace=max(self.options.stop_grace, 20.0),
                address=graph.bolt_uri,
                details={
                    "bolt_uri": graph.bolt_uri,
                    "http_url": graph.http_url,
                    "user": graph.user,
                    "password_file": str(self.data_dir / ARCADEDB_PASSWORD_FILE),
                    "database": GRAPH_DATABASE,
                },
            )
        )
        self._ready(self.components[-1], since)

    def _context(self, service: StackService, port: int) -> StackContext:
        if self.redis is None or self.graph is None:
            raise RuntimeError("services start only after the stores")
        return StackContext(
            name=service.name,
            host=LOCALHOST,
            port=port,
            data_dir=self.data_dir / "services" / service.name,
            redis_url=self.redis.url,
            bolt_uri=self.graph.bolt_uri,
            bolt_user=self.graph.user,
            bolt_password=self.graph.password,
            graph_database=GRAPH_DATABASE,
            graph_http_url=self.graph.http_url,
            services={c.name: c.address for c in self.components if c.kind == "service"},
            principal_keys=dict(self.principal_keys),
            principal_active_kid=self.active_kid,
            delegation_keys=dict(self.delegation_keys),
            delegation_active_kid=self.delegation_kid,
        )

    def _service_env(self, service: StackService, context: StackContext) -> dict[str, str]:
        try:
            extra = dict(service.env(context))
        except StackConfigError:
            raise
        except Exception as error:
            raise _ComponentFailedError(f"{service.name}: its env() failed: {error!r}") from error
        bad = [key for key, value in extra.items() if not isinstance(value, str)]
        if bad:
            raise _ComponentFailedError(f"{service.name}: env() values must be str: {bad}")
        return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}

    async def _start_service(self, service: StackService) -> None:
        log_path = self.logs_dir / f"{service.name}.log"
        for attempt in range(1, _SERVICE_START_ATTEMPTS + 1):
            port = free_port()
            context = self._context(service, port)
            context.data_dir.mkdir(parents=True, exist_ok=True)
            process = ManagedProcess(
                service.name,
                [sys.executable, "-m", service.module],
                log_path=log_path,
                env=self._service_env(service, context),
            )
            component = _Component(
                name=service.name,
                kind="service",
                child=process,
                log_path=log_path,
                follower=self._follower(log_path),
                grace=self.options.stop_grace,
                address=context.address,
                details={
                    "host": LOCALHOST,
                    "port": port,
                    "module": service.module,
                    "health_service": service.health_service,
                },
            )
            self.components.append(component)
            self._status(service.name, "starting")
            since = time.monotonic()
            await process.spawn()
            try:
                await self._wait_healthy(service, process, context.address)
            except _ComponentFailedError as error:
                port_taken = not process.running and any(
                    marker in process.log_tail().lower() for marker in _BIND_FAILURES
                )
                if not port_taken or attempt == _SERVICE_START_ATTEMPTS:
                    raise
                self.complain(f"{service.name}: port {port} was taken, retrying ({error})")
                await process.stop(self.options.stop_grace)
                self._pump_logs()
                self.components.remove(component)
            else:
                self._ready(component, since)
                return

    async def _wait_healthy(
        self, service: StackService, process: ManagedProcess, address: str
    ) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_within
        request = health_pb2.HealthCheckRequest(service=service.health_service)
        options = [
            ("grpc.enable_http_proxy", 0),
            # The server is not listening yet at first; retry connecting quickly, not after 1 s+.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
        ]
        last = "no answer"
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not process.running:
                    code = await process.wait()
                    raise _ComponentFailedError(
                        process.describe_failure(f"exited with code {code} before it was healthy")
                    )
                remaining = deadline - loop.time()
                try:
                    response = await stub.Check(request, timeout=max(0.1, min(1.0, remaining)))
                except grpc.aio.AioRpcError as error:
                    last = error.code().name
                else:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                if loop.time() >= deadline:
                    raise _ComponentFailedError(
                        process.describe_failure(
                            f"was not SERVING on {address} within {self.options.ready_within:g} s "
                            f"(health {service.health_service or '(server)'!r}: {last})"
                        )
                    )
                await asyncio.sleep(_HEALTH_POLL_SECONDS)

    async def _start_all(self, services: list[StackService]) -> None:
        try:
            await self._start_stores()
        except StoreError as error:
            raise _ComponentFailedError(str(error)) from error
        for service in services:
            await self._start_service(service)

    def _write_stack_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "principal_keys_file": str(self.data_dir / PRINCIPAL_KEYS_FILE),
            "delegation_keys_file": str(self.data_dir / DELEGATION_KEYS_FILE),
            "components": {
                c.name: {
                    "kind": c.kind,
                    "address": c.address,
                    "pid": c.child.pid,
                    "log": str(c.log_path),
                    **c.details,
                }
                for c in self.components
            },
        }
        _write_private(self.data_dir / STACK_FILE, json.dumps(info, indent=2) + "\n")

    def _print_table(self, seconds: float) -> None:
        rows = [("NAME", "ADDRESS", "PID", "LOG")]
        rows += [
            (c.name, c.address, str(c.child.pid), self._relative(c.log_path))
            for c in self.components
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        self.say(f"foredeck up: ready in {seconds:.1f} s, data in {self._relative(self.data_dir)}")
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
            self.say("  ".join([*cells, row[3]]))
        if self.graph is not None:
            self.say(
                f"ArcadeDB HTTP {self.graph.http_url}, user {self.graph.user}, password in "
                f"{self._relative(self.data_dir / ARCADEDB_PASSWORD_FILE)}; "
                f"addresses in {self._relative(self.data_dir / STACK_FILE)}; Ctrl-C stops"
            )
        if not self.options.follow_logs:
            self.say(
                f"Logs are in {self._relative(self.logs_dir)}: `foredeck logs NAME` follows one, "
                "`foredeck up --logs` streams them all. Health changes and crashes show here."
            )

    async def _watch_health(self) -> None:
        """Check every running service's health now and then; print each change of status."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        services = [c for c in self.components if c.kind == "service"]
        channels = {
            c.name: grpc.aio.insecure_channel(c.address, options=[("grpc.enable_http_proxy", 0)])
            for c in services
        }
        last = dict.fromkeys(channels, "SERVING")
        try:
            while True:
                await asyncio.sleep(self.options.health_interval)
                for component in services:
                    if not component.child.running:
                        continue  # an exit is reported by the supervisor, with its log
                    stub = health_pb2_grpc.HealthStub(channels[component.name])
                    request = health_pb2.HealthCheckRequest(
                        service=str(component.details.get("health_service", ""))
                    )
                    try:
                        response = await stub.Check(request, timeout=_HEALTH_CHECK_TIMEOUT)
                    except grpc.aio.AioRpcError as error:
                        status = f"unreachable ({error.code().name})"
                    else:
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    if status != last[component.name]:
                        again = " again" if status == "SERVING" else ""
                        self._status(component.name, f"health {status}{again}")
                        last[component.name] = status
        finally:
            for channel in channels.values():
                await channel.close(None)

    async def _supervise(self) -> int:
        """Wait for a stop request or for any component to exit on its own."""
        stop = asyncio.create_task(self.stop_requested.wait())
        exits = {asyncio.create_task(c.child.wait()): c for c in self.components}
        try:
            done, _ = await asyncio.wait({stop, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, *exits):
                task.cancel()
        if stop in done:
            return 0
        crashed = next(exits[task] for task in done if task in exits)
        self._pump_logs()
        self.complain(
            f"foredeck up: {crashed.name} exited unexpectedly; stopping the stack. Last lines of "
            f"{self._relative(crashed.log_path)}:\n{crashed.child.log_tail()}"
        )
        return 1

    async def _stop_all(self) -> None:
        for component in reversed(self.components):
            if not component.child.running:
                continue
            self.say(f"foredeck up: stopping {component.name} (pid {component.child.pid})")
            try:
                await component.child.stop(component.grace)
            except Exception as error:
                self.complain(f"foredeck up: stopping {component.name} failed: {error!r}")
            self._pump_logs()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        lock = _DataDirLock(self.data_dir / ".lock")
        streaming: asyncio.Task[None] | None = None
        try:
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                # A data directory outside a repository's ignore rules must not be committed.
                gitignore = self.data_dir / ".gitignore"
                if not gitignore.exists():
                    gitignore.write_text("*\n", encoding="utf-8")
                lock.acquire()
                # Left by a runner that was killed: its addresses are dead, and a reader must
                # not mistake the file for this run being ready.
                (self.data_dir / STACK_FILE).unlink(missing_ok=True)
                services = self._plan()
                self.principal_keys, self.active_kid = load_or_create_principal_keys(
                    self.data_dir / PRINCIPAL_KEYS_FILE
                )
                self.delegation_keys, self.delegation_kid = load_or_create_principal_keys(
                    self.data_dir / DELEGATION_KEYS_FILE, kid_prefix="local-delegation"
                )
                if set(self.delegation_keys) & set(self.principal_keys):
                    raise StackConfigError(
                        f"{DELEGATION_KEYS_FILE} and {PRINCIPAL_KEYS_FILE} share a key id"
                    )
            except StackConfigError as error:
                self.complain(f"foredeck up: {error}")
                return 2
            started_at = time.monotonic()
            if self.options.follow_logs:
                streaming = asyncio.create_task(self._stream_logs())
            starting = asyncio.create_task(self._start_all(services))
            stop = asyncio.create_task(self.stop_requested.wait())
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, _ComponentFailedError):
                    await starting
                self.say(f"foredeck up: {self.signal_name} during start; stopping")
                return 0
            failure = starting.exception()
            if isinstance(failure, _ComponentFailedError | StackConfigError):
                self._pump_logs()
                self.complain(f"foredeck up: {failure}")
                return 1
            if failure is not None:
                raise failure
            self._write_stack_file()
            self._pump_logs()
            self._print_table(time.monotonic() - started_at)
            watching = asyncio.create_task(self._watch_health())
            try:
                code = await self._supervise()
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            if code == 0:
                self.say(f"foredeck up: {self.signal_name}; stopping")
            return code
        finally:
            if streaming is not None:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
            await self._stop_all()
            if lock.held:
                (self.data_dir / STACK_FILE).unlink(missing_ok=True)
            self._drain_logs()
            lock.release()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            if self.components:
                self.say("foredeck up: stopped")


async def run_up(
    options: UpOptions, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the local stack until SIGINT/SIGTERM; return the process exit code.

    0 after a requested stop, 1 when a component failed to start or died, 2 on a
    configuration error (unknown service, dependency cycle, data directory in use).
    """
    stack = _Stack(options, out or sys.stdout, err or sys.stderr)
    return await stack.run()
