"""Per-RPC state shared between the server interceptors, servicers and outbound channels.

The server's request-context interceptor records the inbound method, request id, deadline and
principal token here; :mod:`foredeck_kit.channels` reads them back so every downstream call
carries the same principal and request id and never outlives the inbound deadline.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from foredeck_kit.principal import Principal

__all__ = [
    "REQUEST_ID_METADATA_KEY",
    "RpcState",
    "current_rpc",
    "outbound_principal",
    "outbound_principal_token",
    "rpc_scope",
]

REQUEST_ID_METADATA_KEY = "x-request-id"
"""gRPC metadata key that carries the caller's request id."""

_rpc: contextvars.ContextVar[RpcState | None] = contextvars.ContextVar("foredeck_rpc", default=None)
_outbound_token: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "foredeck_outbound_principal", default=None
)


@dataclass(slots=True)
class RpcState:
    """What the server knows about the RPC being served; filled in as interceptors run."""

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
