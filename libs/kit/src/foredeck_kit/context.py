"""Per-RPC state shared between the server's handler wrapper, servicers and outbound channels.

The handler wrapper records the inbound method, request id, deadline and
principal token here; :mod:`foredeck_kit.channels` reads them back so every downstream call
carries the same principal and request id and never outlives the inbound deadline.

Work that must outlive the RPC (a notification sent after replying, a run executed after it was
accepted) starts with :func:`spawn_detached`, which gives it a fresh state instead: a task
created with ``asyncio.create_task`` inside a handler copies the RPC's context, and its calls
would fail once the RPC's deadline has passed, or go out under the RPC's principal.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, TracerProvider

from foredeck_kit.logs import get_logger
from foredeck_kit.principal import Principal

__all__ = [
    "REQUEST_ID_METADATA_KEY",
    "RpcState",
    "current_rpc",
    "detached_tasks",
    "drain_detached",
    "outbound_principal",
    "outbound_principal_token",
    "rpc_scope",
    "spawn_detached",
]

T = TypeVar("T")

REQUEST_ID_METADATA_KEY = "x-request-id"
"""gRPC metadata key that carries the caller's request id."""

_rpc: contextvars.ContextVar[RpcState | None] = contextvars.ContextVar("foredeck_rpc", default=None)
_outbound_token: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "foredeck_outbound_principal", default=None
)


@dataclass(slots=True)
class RpcState:
    """What the server knows about the RPC being served; filled in as the handler wrapper runs."""

    method: str
    request_id: str | None = None
    deadline: float | None = None
    """Absolute inbound deadline on the ``time.monotonic()`` clock, or None without one."""
    principal: Principal | None = None
    principal_token: str | None = None
    reason: str | None = None
    """Error reason the RPC ended with, when it ended with a :class:`ServiceError`."""
    error: BaseException | None = None
    """Unexpected exception the RPC ended with; logged with its traceback, never sent."""
    code: grpc.StatusCode | None = None
    peer: str = "unknown"
    """The caller's address, read when the RPC begins: once a cancelled call is torn down,
    asking grpc for it can crash the process."""
    log_fields: dict[str, str] | None = None
    """Extra fields the service adds to the RPC's log line (ids it learns while serving)."""

    def time_remaining(self) -> float | None:
        """Seconds left before the inbound deadline (negative once passed), None without one."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()


def current_rpc() -> RpcState | None:
    """Return the state of the inbound RPC being served, or None outside of one."""
    return _rpc.get()


@contextmanager
def rpc_scope(state: RpcState) -> Iterator[RpcState]:
    """Make ``state`` the current RPC for the code inside the block."""
    token = _rpc.set(state)
    try:
        yield state
    finally:
        _rpc.reset(token)


def outbound_principal_token() -> str | None:
    """Return the principal token set by :func:`outbound_principal`, if any."""
    return _outbound_token.get()


@contextmanager
def outbound_principal(token: str) -> Iterator[None]:
    """Send ``token`` as the principal on every call made inside the block.

    The gateway uses this after minting a principal for an authenticated caller; inside a
    service the inbound principal is forwarded without it.
    """
    reset = _outbound_token.set(token)
    try:
        yield
    finally:
        _outbound_token.reset(reset)


# Strong references to running detached tasks: the event loop keeps only weak ones, and a task
# nobody references can be garbage-collected before it finishes.
_detached: set[asyncio.Task[object]] = set()


def spawn_detached(
    coro_factory: Callable[[], Awaitable[T]],
    *,
    name: str,
    timeout: float | None = None,
    principal_token: str | None = None,
    request_id: str | None = None,
    tracer_provider: TracerProvider | None = None,
) -> asyncio.Task[T]:
    """Start work that outlives the current RPC, in a context of its own.

    The work runs with a fresh :class:`RpcState` (method ``name``): no inbound deadline but
    ``timeout`` seconds of its own (the whole work is cancelled then, and outbound calls are
    capped by it), no inbound principal, and ``principal_token`` (e.g. a delegated principal
    minted for it) sent on its outbound calls. Nothing else of the RPC's context is inherited;
    pass ``request_id`` to keep correlating logs. It runs in a new trace whose root span
    ``name`` links to the current span. An exception it raises is logged, not lost; the task
    is referenced until it ends and :func:`drain_detached` waits for it at shutdown.
    """
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive")
    link_to = trace.get_current_span().get_span_context()
    tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)

    async def run() -> T:
        deadline = time.monotonic() + timeout if timeout is not None else None
        _rpc.set(RpcState(method=name, request_id=request_id, deadline=deadline))
        if principal_token is not None:
            _outbound_token.set(principal_token)
        links = [Link(link_to)] if link_to.is_valid else []
        with tracer.start_as_current_span(name, links=links):
            try:
                async with asyncio.timeout(timeout):
                    return await coro_factory()
            except asyncio.CancelledError:
                get_logger("foredeck.detached").info("detached work cancelled", task=name)
                raise
            except BaseException as exc:
                get_logger("foredeck.detached").error(
                    "detached work failed", task=name, exc_info=exc
                )
                raise

    # An empty context: the RPC's deadline, principal, trace and log bindings stay behind.
    task: asyncio.Task[T] = asyncio.get_running_loop().create_task(
        run(), name=name, context=contextvars.Context()
    )
    _detached.add(task)
    task.add_done_callback(_forget)
    return task


def _forget(task: asyncio.Task[object]) -> None:
    _detached.discard(task)
    # The failure was logged in the task; retrieving it here keeps asyncio from logging it
    # again as "never retrieved".
    if not task.cancelled():
        task.exception()


def detached_tasks() -> list[asyncio.Task[object]]:
    """The detached tasks still running in this process."""
    return [task for task in _detached if not task.done()]


async def drain_detached(grace: float) -> int:
    """Wait up to ``grace`` seconds for detached work to end, then cancel the rest.

    Returns how many tasks were cancelled. Call it while shutting down, after the server
    stopped accepting calls.
    """
    running = detached_tasks()
    if not running:
        return 0
    _, pending = await asyncio.wait(running, timeout=grace)
    for task in pending:
        task.cancel()
    if pending:
        # Bounded: work that swallows its cancellation must not hold up the shutdown.
        await asyncio.wait(pending, timeout=max(grace, 1.0))
    return len(pending)
