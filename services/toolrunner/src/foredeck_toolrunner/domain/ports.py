"""Ports of the domain: what the use cases need from storage and from tool runtimes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from foredeck.toolrunner.v1 import execution_pb2, tool_pb2

__all__ = [
    "CallContext",
    "Claim",
    "EffectLedger",
    "RateLimiter",
    "RegistryOp",
    "RegistryRace",
    "RegistryStore",
    "RunResult",
    "ToolRuntime",
]


class RegistryRace(Exception):
    """A concurrent registration moved a name's last version; the caller retries."""


@dataclass(frozen=True, slots=True)
class RegistryOp:
    """One write in an atomic registry batch.

    ``kind`` is ``create`` (the name must be free; ``expected_last`` is the last version ever
    used), ``update`` (the current version must be ``expected_current``) or ``delete``.
    ``tool`` is the new content, its version already set (None for a delete).
    """

    kind: str
    name: str
    expected_current: int = 0
    expected_last: int = 0
    tool: tool_pb2.Tool | None = None


class RegistryStore(Protocol):
    """The registry's storage, shared by every replica."""

    async def get(self, name: str, version: int = 0) -> tuple[tool_pb2.Tool | None, int]:
        """The tool at ``version`` (0: current) or None, and the current version (0: none)."""
        ...

    async def last_version(self, name: str) -> int:
        """The last version ever used for ``name`` (0 when never registered)."""
        ...

    async def list_current(self, prefix: str, after: str, limit: int) -> list[tool_pb2.Tool]:
        """Current versions of tools named ``prefix…``, by name, after ``after``."""
        ...

    async def apply(
        self,
        ops: Sequence[RegistryOp],
        *,
        request_key: str,
        fingerprint: str,
        response: bytes,
        ttl: timedelta,
    ) -> bytes:
        """Apply every op or none and remember ``response`` under ``request_key``.

        A request key already recorded with the same fingerprint returns the recorded response
        without applying anything; with another fingerprint it raises REQUEST_ID_REUSED.
        Raises TOOL_ALREADY_EXISTS, TOOL_NOT_FOUND or ETAG_MISMATCH for a failed
        precondition, and :class:`RegistryRace` when ``expected_last`` moved.
        """
        ...

    async def recorded(self, request_key: str, fingerprint: str) -> bytes | None:
        """The response recorded for ``request_key`` (REQUEST_ID_REUSED on a mismatch)."""
        ...


@dataclass(frozen=True, slots=True)
class Claim:
    """The ledger's answer to a call: run it, replay a recorded outcome, or wait."""

    state: str
    """``claimed``, ``done`` or ``running``."""
    response: bytes = b""
    """The recorded ``ExecuteToolResponse`` when ``done``."""
    tool_name: str = ""
    """The recorded call's tool, for IDEMPOTENCY_KEY_REUSED."""
    fingerprint: str = ""


class EffectLedger(Protocol):
    """Records each call's outcome once per tenant and idempotency key."""

    async def claim(
        self, tenant: str, key: str, fingerprint: str, tool_name: str, lease: timedelta
    ) -> Claim:
        """Claim the key for a new run, or report the recorded or running call."""
        ...

    async def complete(self, tenant: str, key: str, response: bytes, ttl: timedelta) -> None:
        """Record the outcome of a claimed call and wake its waiters."""
        ...

    async def release(self, tenant: str, key: str) -> None:
        """Forget a claim whose call ended in an RPC error, and wake its waiters."""
        ...

    async def wait_change(self, tenant: str, key: str, seconds: float) -> Claim | None:
        """Wait until the key is completed or released (None on timeout); return its state."""
        ...


class RateLimiter(Protocol):
    """Admits calls within a sliding window, atomically across replicas."""

    async def acquire(
        self, tenant: str, tool_name: str, max_calls: int, window: timedelta
    ) -> timedelta | None:
        """None when admitted, else how long until the next call would be."""
        ...


@dataclass(slots=True)
class CallContext:
    """What a runtime needs to run one call."""

    tool: tool_pb2.Tool
    arguments: dict[str, object]
    arguments_json: str
    timeout: float
    """Seconds the tool may run: its own timeout capped by the caller's deadline."""
    idempotency_key: str
    run_id: str = ""
    step_id: str = ""
    tool_call_id: str = ""
    principal_token: str | None = None


@dataclass(slots=True)
class RunResult:
    """What running a tool produced, before output caps and recording."""

    outcome: execution_pb2.ToolOutcome
    sandbox: execution_pb2.SandboxReport | None = None
    kill_cause: str | None = None
    """Why the sandbox killed the tool (``timeout``, ``output``, ``memory``…), for metrics."""


class ToolRuntime(Protocol):
    """Runs calls of tools of one runtime kind."""

    async def run(self, call: CallContext) -> RunResult:
        """Run one call within ``call.timeout``; a tool failure is an outcome, not a raise."""
        ...
