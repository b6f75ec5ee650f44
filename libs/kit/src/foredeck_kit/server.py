"""Server lifecycle: build, start, report health, drain and stop a grpc.aio service.

A service's ``__main__`` is three lines::

    def main() -> None:
        settings = load_settings(MemorySettings)
        telemetry = setup_telemetry("memory", settings)
        try:
            raise SystemExit(asyncio.run(serve(build_server(settings, telemetry))))
        finally:
            telemetry.shutdown()

where ``build_server`` is the service's own factory around :func:`build_grpc_server`.
SIGTERM then shows NOT_SERVING, waits ``drain_seconds``, lets in-flight RPCs finish within
``grace_period_seconds`` and exits 0.

Health follows the dependencies for the whole life of the process: the ``readiness`` check
runs every ``readiness_interval`` seconds (each run bounded by ``readiness_timeout``), and
:meth:`ServiceHost.report_dependency` lets the service mark a dependency down or up as soon as
it notices. Health shows SERVING only while the last check passed and no reported dependency
is down; each change is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from foredeck_kit.handlers import Context, HandlerWrapper, Middleware, RegisteringServer
from foredeck_kit.logs import get_logger
from foredeck_kit.metrics import Metrics
from foredeck_kit.principal import PrincipalVerifier
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import Telemetry

__all__ = [
    "DEFAULT_READINESS_INTERVAL",
    "DEFAULT_READINESS_TIMEOUT",
    "REFLECTION_V1_SERVICE_NAME",
    "Readiness",
    "Register",
    "ServiceHost",
    "build_grpc_server",
    "serve",
]

Register = Callable[[grpc.aio.Server], None]
"""Adds the service's handlers to the server, e.g. ``add_MemoryServiceServicer_to_server``.

It receives a :class:`~foredeck_kit.handlers.RegisteringServer`, which wraps each handler with
the kit's per-RPC work as it is added."""

Readiness = Callable[[], Awaitable[bool]]
"""Answers whether the service's dependencies respond; SERVING is shown only while it is true."""

DEFAULT_READINESS_INTERVAL = 5.0
"""Seconds between readiness checks once the service is serving."""

DEFAULT_READINESS_TIMEOUT = 5.0
"""Seconds a readiness check may take before it counts as failed."""

REFLECTION_V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
"""Reflection's stable name, which current tools (grpcurl, grpcui, Postman) ask for first."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_READINESS_FIRST_DELAY = 0.05
_READINESS_MAX_DELAY = 2.0


def _format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _WatchContext:
    """Passes a Watch stream's writes through and notices the final NOT_SERVING."""

    def __init__(self, context: Context, servicer: _HealthServicer, done: asyncio.Event) -> None:
        self._context = context
        self._servicer = servicer
        self._done = done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, response: Any) -> None:
        await self._context.write(response)
        if self._servicer.shutting_down and response.status == _NOT_SERVING:
            self._done.set()


# The stubs lag behind grpcio: the aio health servicer lives in health.aio.
class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc, name-defined]
    """The standard aio health servicer, except that Watch streams end once shutting down.

    A stream that stays open holds ``server.stop(grace)`` for the whole grace period; ending
    it right after the NOT_SERVING update lets the watcher see the update and the server
    stop as soon as real calls are done.
    """

    @property
    def shutting_down(self) -> bool:
        return bool(self._gracefully_shutting_down)

    async def Watch(self, request: Any, context: Context) -> None:
        done = asyncio.Event()
        watch = asyncio.ensure_future(super().Watch(request, _WatchContext(context, self, done)))
        ended = asyncio.ensure_future(done.wait())
        try:
            await asyncio.wait({watch, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, ended):
                task.cancel()
            for task in (watch, ended):
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _add_reflection(server: grpc.aio.Server, names: Sequence[str]) -> None:
    """Serve reflection as ``v1alpha`` and as ``v1``.

    grpcio-reflection ships only the ``v1alpha`` servicer; the ``v1`` protocol has the same
    messages field for field, so the same servicer answers both.
    """
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1_SERVICE_NAME,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )


class ServiceHost:
    """One gRPC server with Foredeck's per-RPC handling, health, reflection and graceful stop.

    The grpc.aio server itself is created in :meth:`start`, inside the running event loop.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        domain: str,
        register: Register,
        service_names: Sequence[str],
        verifier: PrincipalVerifier | None,
        public_methods: Collection[str] = (),
        readiness: Readiness | None = None,
        telemetry: Telemetry | None = None,
        metrics: Metrics | None = None,
        middleware: Sequence[Middleware] = (),
        readiness_interval: float = DEFAULT_READINESS_INTERVAL,
        readiness_timeout: float = DEFAULT_READINESS_TIMEOUT,
    ) -> None:
        if readiness_interval <= 0 or readiness_timeout <= 0:
            raise ValueError("readiness_interval and readiness_timeout must be positive")
        self.settings = settings
        self.domain = domain
        self.service_names = tuple(service_names)
        self.telemetry = telemetry
        self.metrics = metrics or (telemetry.metrics if telemetry is not None else Metrics())
        self._register = register
        self._verifier = verifier
        self._public_methods = tuple(public_methods)
        self._readiness = readiness
        self._readiness_interval = readiness_interval
        self._readiness_timeout = readiness_timeout
        self._middleware = tuple(middleware)
        self._server: grpc.aio.Server | None = None
        self._health: _HealthServicer | None = None
        self._port: int | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._checked_ok = False
        self._check_problem: str | None = "readiness not checked yet"
        self._dependencies: dict[str, bool] = {}
        self._serving = False
        self._apply_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._readiness_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when the settings asked for port 0)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return _format_address(self.settings.host, self.port)

    @property
    def server(self) -> grpc.aio.Server:
        """The underlying grpc.aio server, once started."""
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server

    @property
    def health(self) -> Any:
        """The standard ``grpc_health.v1`` aio servicer, once started."""
        if self._health is None:
            raise RuntimeError("server not started")
        return self._health

    @property
    def stopping(self) -> asyncio.Event:
        """Set when stop begins; long-lived streams can end early with SHUTTING_DOWN."""
        return self._stopping

    @property
    def ready(self) -> bool:
        """Whether health shows SERVING right now."""
        return self._serving and not self._stopping.is_set()

    async def wait_ready(self) -> None:
        """Return once health has shown SERVING for the first time."""
        await self._ready.wait()

    def report_dependency(self, name: str, *, healthy: bool) -> None:
        """Record that dependency ``name`` is down or back up; health follows at once.

        Call it from the event loop when a store or downstream fails or recovers, e.g.
        ``host.report_dependency("redis", healthy=False)`` on a connection error. A dependency
        reported down keeps health NOT_SERVING until it is reported up again, whatever the
        readiness check says.
        """
        if self._dependencies.get(name) is healthy:
            return
        self._dependencies[name] = healthy
        get_logger("foredeck.server").log(
            logging.INFO if healthy else logging.WARNING,
            "dependency reported",
            dependency=name,
            healthy=healthy,
        )
        if self._health is not None and not self._stopping.is_set():
            task = asyncio.get_running_loop().create_task(self._apply(), name="health-update")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _options(self) -> list[tuple[str, Any]]:
        s = self.settings
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.keepalive_time_ms", s.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", s.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            # The server-side minimum interval between client pings it accepts.
            ("grpc.http2.min_ping_interval_without_data_ms", s.keepalive_min_ping_interval_ms),
            ("grpc.http2.max_pings_without_data", 0),
            # Without it a second process could bind the same port and steal half the calls.
            ("grpc.so_reuseport", 0),
        ]
        if s.max_connection_idle_ms:
            options.append(("grpc.max_connection_idle_ms", s.max_connection_idle_ms))
        if s.max_connection_age_ms:
            options.append(("grpc.max_connection_age_ms", s.max_connection_age_ms))
            options.append(("grpc.max_connection_age_grace_ms", int(s.grace_period_seconds * 1000)))
        return options

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING until ready) and return the bound port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        wrapper = HandlerWrapper(
            domain=self.domain,
            verifier=self._verifier,
            public_methods=self._public_methods,
            metrics=self.metrics,
            tracer_provider=self.telemetry.tracer_provider if self.telemetry else None,
            middleware=self._middleware,
        )
        server = grpc.aio.server(options=self._options())
        registering = RegisteringServer(server, wrapper)
        self._register(registering)

        servicer = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, registering)
        for name in ("", *self.service_names):
            await servicer.set(name, _NOT_SERVING)
        _add_reflection(
            registering,
            (
                *self.service_names,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
                REFLECTION_V1_SERVICE_NAME,
            ),
        )

        port = server.add_insecure_port(_format_address(self.settings.host, self.settings.port))
        if port == 0:
            raise RuntimeError(f"could not bind {self.settings.host}:{self.settings.port}")
        await server.start()
        self._server, self._health, self._port = server, servicer, port
        self._readiness_task = asyncio.create_task(self._follow_readiness(), name="readiness")
        return port

    async def _apply(self) -> None:
        """Show the health the latest check and reports add up to; log when it changes."""
        async with self._apply_lock:
            health_servicer = self._health
            if health_servicer is None or self._stopping.is_set():
                return
            down = sorted(name for name, healthy in self._dependencies.items() if not healthy)
            serving = self._checked_ok and not down
            if serving == self._serving:
                return
            self._serving = serving
            for name in ("", *self.service_names):
                await health_servicer.set(name, _SERVING if serving else _NOT_SERVING)
            logger = get_logger("foredeck.server")
            if serving:
                logger.info("health changed", status="SERVING")
                self._ready.set()
            else:
                logger.warning(
                    "health changed",
                    status="NOT_SERVING",
                    readiness=self._check_problem,
                    dependencies_down=down,
                )

    async def _check(self) -> str | None:
        """Run the readiness check once; return what is wrong, None when it passed."""
        if self._readiness is None:
            return None
        try:
            async with asyncio.timeout(self._readiness_timeout):
                ready = await self._readiness()
        except TimeoutError:
            return f"readiness check timed out after {self._readiness_timeout:g}s"
        except Exception as exc:
            return f"readiness check failed: {exc!r}"
        return None if ready else "readiness check returned false"

    async def _follow_readiness(self) -> None:
        delay = _READINESS_FIRST_DELAY
        while not self._stopping.is_set():
            problem = await self._check()
            if problem != self._check_problem and problem is not None:
                get_logger("foredeck.server").warning("not ready", reason=problem)
            self._checked_ok, self._check_problem = problem is None, problem
            await self._apply()
            if self._checked_ok:
                delay = _READINESS_FIRST_DELAY
                wait = self._readiness_interval
            else:
                # Backoff while failing: dependencies that are still starting need a moment.
                wait = min(delay, self._readiness_interval)
                delay = min(delay * 2, _READINESS_MAX_DELAY)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=wait)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING -> wait ``drain_seconds`` -> stop with grace; concurrent calls share it."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace), name="stop")
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float | None) -> None:
        self._stopping.set()
        if self._server is None or self._health is None:
            return
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness_task
        async with self._apply_lock:
            # Every Watch stream gets NOT_SERVING and then ends.
            self._serving = False
            await self._health.enter_graceful_shutdown()
        if self.settings.drain_seconds > 0:
            # Deliberate wait: load balancers and probes need time to see NOT_SERVING.
            await asyncio.sleep(self.settings.drain_seconds)
        await self._server.stop(self.settings.grace_period_seconds if grace is None else grace)

    async def wait_for_termination(self) -> None:
        """Return once the server has stopped."""
        await self.server.wait_for_termination()
        if self._stop_task is not None:
            await asyncio.shield(self._stop_task)


def build_grpc_server(
    settings: ServiceSettings,
    *,
    domain: str,
    register: Register,
    service_names: Sequence[str],
    verifier: PrincipalVerifier | None,
    public_methods: Collection[str] = (),
    readiness: Readiness | None = None,
    telemetry: Telemetry | None = None,
    middleware: Sequence[Middleware] = (),
    readiness_interval: float = DEFAULT_READINESS_INTERVAL,
    readiness_timeout: float = DEFAULT_READINESS_TIMEOUT,
) -> ServiceHost:
    """Describe a service's server; nothing binds or runs until :meth:`ServiceHost.start`.

    ``service_names`` are the full proto service names (health reports each, reflection lists
    them); ``public_methods`` are full method names callable without a principal;
    ``verifier=None`` disables principal checks (the gateway only); ``middleware`` adds the
    service's own per-RPC behaviour (see :data:`~foredeck_kit.handlers.Middleware`).
    """
    return ServiceHost(
        settings,
        domain=domain,
        register=register,
        service_names=service_names,
        verifier=verifier,
        public_methods=public_methods,
        readiness=readiness,
        telemetry=telemetry,
        middleware=middleware,
        readiness_interval=readiness_interval,
        readiness_timeout=readiness_timeout,
    )


async def serve(host: ServiceHost) -> int:
    """Run ``host`` until SIGTERM or SIGINT, then stop it gracefully; return the exit code 0."""
    await host.start()
    loop = asyncio.get_running_loop()
    stop_task: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stop_task
        if stop_task is None:
            get_logger("foredeck.server").info("stopping", signal=signal.Signals(signum).name)
            stop_task = loop.create_task(host.stop())

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        get_logger("foredeck.server").info(
            "listening",
            address=host.address,
            port=host.port,
            metrics_port=host.telemetry.metrics_port if host.telemetry else None,
            services=list(host.service_names),
        )
        await host.wait_for_termination()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        if stop_task is None:
            await host.stop()
    get_logger("foredeck.server").info("stopped")
    return 0
