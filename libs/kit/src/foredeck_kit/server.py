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
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from foredeck_kit.interceptors import server_interceptors
from foredeck_kit.logs import get_logger
from foredeck_kit.metrics import Metrics
from foredeck_kit.principal import PrincipalVerifier
from foredeck_kit.settings import ServiceSettings
from foredeck_kit.telemetry import Telemetry

__all__ = ["Readiness", "Register", "ServiceHost", "build_grpc_server", "serve"]

Register = Callable[[grpc.aio.Server], None]
"""Adds the service's handlers to the server, e.g. ``add_MemoryServiceServicer_to_server``."""

Readiness = Callable[[], Awaitable[bool]]
"""Answers whether the service's dependencies respond; SERVING is shown only once it is true."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_READINESS_FIRST_DELAY = 0.05
_READINESS_MAX_DELAY = 2.0


def _format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class ServiceHost:
    """One gRPC server with Foredeck's interceptors, health, reflection and graceful stop.

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
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    ) -> None:
        self.settings = settings
        self.domain = domain
        self.service_names = tuple(service_names)
        self.telemetry = telemetry
        self.metrics = metrics or (telemetry.metrics if telemetry is not None else Metrics())
        self._register = register
        self._verifier = verifier
        self._public_methods = tuple(public_methods)
        self._readiness = readiness
        self._extra_interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._port: int | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
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
        """Whether health shows SERVING."""
        return self._ready.is_set() and not self._stopping.is_set()

    async def wait_ready(self) -> None:
        """Return once the readiness check has passed and health shows SERVING."""
        await self._ready.wait()

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
        interceptors = server_interceptors(
            domain=self.domain,
            verifier=self._verifier,
            public_methods=self._public_methods,
            metrics=self.metrics,
            tracer_provider=self.telemetry.tracer_provider if self.telemetry else None,
            extra=self._extra_interceptors,
        )
        server = grpc.aio.server(interceptors=interceptors, options=self._options())
        self._register(server)

        # The stubs lag behind grpcio: the aio health servicer lives in health.aio.
        servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        for name in ("", *self.service_names):
            await servicer.set(name, _NOT_SERVING)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

        port = server.add_insecure_port(_format_address(self.settings.host, self.settings.port))
        if port == 0:
            raise RuntimeError(f"could not bind {self.settings.host}:{self.settings.port}")
        await server.start()
        self._server, self._health, self._port = server, servicer, port
        self._readiness_task = asyncio.create_task(self._become_ready(), name="readiness")
        return port

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self._health.set(name, status)

    async def _become_ready(self) -> None:
        delay = _READINESS_FIRST_DELAY
        while not self._stopping.is_set():
            try:
                ready = True if self._readiness is None else await self._readiness()
            except Exception as exc:
                ready = False
                get_logger("foredeck.server").warning("readiness check failed", error=repr(exc))
            if ready:
                await self._set_all(_SERVING)
                self._ready.set()
                return
            # Backoff between checks: dependencies that are still starting need a moment.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            delay = min(delay * 2, _READINESS_MAX_DELAY)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING -> wait ``drain_seconds`` -> stop with grace; concurrent calls share it."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace), name="stop")
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float | None) -> None:
        self._stopping.set()
        if self._server is None:
            return
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness_task
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
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> ServiceHost:
    """Describe a service's server; nothing binds or runs until :meth:`ServiceHost.start`.

    ``service_names`` are the full proto service names (health reports each, reflection lists
    them); ``public_methods`` are full method names callable without a principal;
    ``verifier=None`` disables principal checks (the gateway only).
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
        interceptors=interceptors,
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
