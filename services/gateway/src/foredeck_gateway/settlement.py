"""Settling reservations from what runs really used, and releasing those of crashed work.

Two paths end a reservation, and both may run for the same one (settling is idempotent):

- the watcher: after CreateRun, the replica that admitted the run follows its events and settles
  as soon as ``RunFinished`` arrives, resuming from the last event id if the stream drops;
- the sweeper: every replica regularly claims reservations whose lease is due (the watcher's
  replica may have died), asks the orchestrator for the run and settles a finished run, extends
  the lease of a live one, and releases the reservation of a run that does not exist or of a
  submission that never recorded a run within ``submit_grace_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc
import grpc.aio

from foredeck.common.v1 import run_event_pb2, run_pb2, usage_pb2
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as orch
from foredeck_gateway.clients import Orchestrator
from foredeck_gateway.store import DueReservation, RedisState, StoreDown
from foredeck_kit.context import outbound_principal
from foredeck_kit.logs import get_logger

__all__ = ["Settler", "usage_tokens"]

_TERMINAL = frozenset(
    {
        run_pb2.RUN_STATUS_SUCCEEDED,
        run_pb2.RUN_STATUS_FAILED,
        run_pb2.RUN_STATUS_CANCELLED,
        run_pb2.RUN_STATUS_DEAD_LETTERED,
    }
)
_CLAIM_BATCH = 50
_WATCH_RETRY = 0.2
_WATCH_TIMEOUT = 7 * 86_400.0
_WATCH_RETRY_MAX = 5.0


def usage_tokens(usage: usage_pb2.Usage) -> int:
    """Tokens a run consumed as budgets count them: every input and output token."""
    return (
        usage.input_tokens
        + usage.output_tokens
        + usage.cache_read_input_tokens
        + usage.cache_creation_input_tokens
    )


MintFor = Callable[[str, str, str], str]
"""Mints a principal for the gateway's own calls about a run: (tenant, user, kind) -> token."""


class Settler:
    """Watches admitted runs and sweeps due reservations."""

    def __init__(
        self,
        state: RedisState,
        orchestrator: Orchestrator,
        mint_for: MintFor,
        *,
        lease_seconds: int,
        submit_grace_seconds: int,
        interval: float,
        watch_runs: bool = True,
    ) -> None:
        self._state = state
        self._orchestrator = orchestrator
        self._mint_for = mint_for
        self._lease_ms = lease_seconds * 1000
        self._grace_ms = submit_grace_seconds * 1000
        self._interval = interval
        self._watch_runs = watch_runs
        self._watchers: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._log = get_logger("foredeck_gateway.settlement")
        self.settled = 0
        self.released = 0

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="sweeper")

    async def stop(self) -> None:
        self._stopping.set()
        tasks = [*self._watchers, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def watch(self, reservation_id: str, run_id: str, tenant: str, user: str, kind: str) -> None:
        """Follow a run's events in the background and settle when it finishes.

        Does nothing when watching is off: the sweeper then settles the run at its next check.
        """
        if not self._watch_runs:
            return
        task = asyncio.get_running_loop().create_task(
            self._watch(reservation_id, run_id, tenant, user, kind),
            name=f"watch-{run_id}",
            # Its own context: the RPC that admitted the run has a deadline the watch outlives.
            context=__import__("contextvars").Context(),
        )
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(
        self, reservation_id: str, run_id: str, tenant: str, user: str, kind: str
    ) -> None:
        after = ""
        delay = _WATCH_RETRY
        while not self._stopping.is_set():
            token = self._mint_for(tenant, user, kind)
            try:
                with outbound_principal(token):
                    # Only RunFinished matters here; a filter that names nothing else still
                    # gets it, and spares the stream every token the run generates.
                    stream = self._orchestrator.runs.WatchRun(
                        orch.WatchRunRequest(
                            run_id=run_id,
                            after_event_id=after,
                            event_types=[run_event_pb2.RUN_EVENT_TYPE_RUN_FINISHED],
                        ),
                        timeout=_WATCH_TIMEOUT,
                    )
                    async for message in stream:
                        event = message.event
                        after = event.event_id
                        delay = _WATCH_RETRY
                        if event.WhichOneof("payload") == "run_finished":
                            usage = event.run_finished.usage
                            await self._end(
                                reservation_id, usage_tokens(usage), usage.cost_usd_micros
                            )
                            return
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.NOT_FOUND:
                    await self._end(reservation_id, None, None)
                    return
            except StoreDown:
                # The sweeper settles it once Redis is back.
                return
            await asyncio.sleep(delay)  # backoff before resuming the stream
            delay = min(delay * 2, _WATCH_RETRY_MAX)

    async def _end(self, reservation_id: str, tokens: int | None, cost: int | None) -> None:
        if tokens is None or cost is None:
            if await self._state.release(reservation_id):
                self.released += 1
                self._log.info("reservation released", reservation_id=reservation_id)
        elif await self._state.settle(reservation_id, tokens, cost):
            self.settled += 1
            self._log.info(
                "reservation settled", reservation_id=reservation_id, tokens=tokens, cost=cost
            )

    async def sweep_once(self) -> int:
        """Check every reservation that is due; return how many were looked at."""
        due = await self._state.claim_due(_CLAIM_BATCH, self._lease_ms)
        for item in due:
            try:
                await self._check(item)
            except StoreDown:
                raise
            except Exception as exc:
                self._log.warning(
                    "reservation check failed", reservation_id=item.reservation_id, error=repr(exc)
                )
        return len(due)

    async def _check(self, item: DueReservation) -> None:
        if not item.tenant_id:
            await self._state.release(item.reservation_id)
            return
        if not item.run_id:
            if item.now_ms - item.created_ms >= self._grace_ms:
                await self._end(item.reservation_id, None, None)
            return
        token = self._mint_for(item.tenant_id, item.user_id, item.kind)
        try:
            with outbound_principal(token):
                response = await self._orchestrator.runs.GetRun(
                    orch.GetRunRequest(run_id=item.run_id), timeout=5.0
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                await self._end(item.reservation_id, None, None)
            return
        run = response.run
        if run.status in _TERMINAL:
            await self._end(item.reservation_id, usage_tokens(run.usage), run.usage.cost_usd_micros)

    async def _sweep(self) -> None:
        while not self._stopping.is_set():
            try:
                while await self.sweep_once() >= _CLAIM_BATCH:
                    pass
            except StoreDown:
                pass
            except Exception as exc:
                self._log.warning("sweep failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval)
