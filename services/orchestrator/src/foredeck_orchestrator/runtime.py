"""The worker's run runtime: queue consumption, leases, fencing, slots, cancellation.

A worker reads run ids from the three priority streams (weighted, so low priority always gets
a share), takes a global and a per-user concurrency slot, claims the run (a new fencing
token and a lease), hands the agent loop a :class:`~foredeck_orchestrator.domain.ports.
RunContext` whose journal and events write through fenced Lua scripts, heartbeats the lease,
records the outcome, and only then acknowledges the queue entry.

What can go wrong, and what happens:

- the worker dies: its entries stay pending; once idle for a lease, any worker's reclaimer
  (XAUTOCLAIM, walking the whole pending list) takes them, claims the run with a newer token
  and resumes it from the journal; the dead worker's slots expire with its lease.
- the worker pauses past its lease and wakes up: its token is stale, so every write it tries
  fails and it stops without acknowledging anything.
- the run cannot be driven (a record that does not decode, a fault in the loop): the lease is
  given up and the entry stays pending; after ``max_deliveries`` takes the run is
  dead-lettered.
- SIGTERM: in-flight runs are cancelled, their leases released (not counted as a delivery)
  and their entries put back at the end of their queue, so another worker starts at once.
- CancelRun: the API moves the token (fencing the worker out) and announces the run on a
  pub/sub channel; the worker cancels the run's task, which cancels its downstream calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import TracerProvider
from redis.exceptions import RedisError, ResponseError

from foredeck.common.v1 import agent_pb2, journal_pb2, run_event_pb2, run_pb2
from foredeck_kit.approval import ApprovalTokenSigner, arguments_json_digest
from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.logs import get_logger
from foredeck_kit.metrics import Metrics
from foredeck_orchestrator.adapters.redis_agents import RedisAgents
from foredeck_orchestrator.adapters.redis_runs import LeaseLostError, RedisRuns, is_terminal
from foredeck_orchestrator.approvals import RedisApprovals
from foredeck_orchestrator.children import RedisChildren, park_for_child, wake_parent
from foredeck_orchestrator.config import OrchestratorSettings
from foredeck_orchestrator.domain.children import ChildPending
from foredeck_orchestrator.domain.loop.errors import Code, make_error
from foredeck_orchestrator.domain.ports import (
    AgentLoop,
    LeaseLost,
    RunContext,
    RunJournal,
    RunOutcome,
)
from foredeck_orchestrator.domain.waiting import ApprovalPending
from foredeck_orchestrator.journals import ForkJournal, JournalPrefixGone

__all__ = ["RedisJournal", "RedisRunEvents", "Worker", "default_worker_id"]

_CREDENTIAL_REUSE_SECONDS = 60.0
_AGENT_CACHE_SIZE = 1024
SUBMIT_GRACE_MS = 10_000
"""How old a submission note must be before a sweeper finishes the submission itself."""


def default_worker_id() -> str:
    """Host name and pid: unique among live workers."""
    return f"{socket.gethostname()}/{os.getpid()}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisJournal:
    """The run's journal in Redis, written only under this worker's fencing token."""

    def __init__(
        self, runs: RedisRuns, run_id: str, token: int, worker_id: str, trace_id: str
    ) -> None:
        self.runs = runs
        self.run_id = run_id
        self.token = token
        self.worker_id = worker_id
        self.trace_id = trace_id
        self.count = 0

    async def entries(self) -> Sequence[journal_pb2.JournalEntry]:
        raws = await self.runs.journal(self.run_id)
        self.count = len(raws)
        return [journal_pb2.JournalEntry.FromString(raw) for raw in raws]

    async def append(self, entry: journal_pb2.JournalEntry) -> journal_pb2.JournalEntry:
        stored = journal_pb2.JournalEntry()
        stored.CopyFrom(entry)
        stored.run_id = self.run_id
        stored.entry_index = self.count + 1
        stored.worker_id = self.worker_id
        stored.fencing_token = self.token
        stored.trace_id = self.trace_id
        try:
            await self.runs.append(self.run_id, self.token, stored)
        except LeaseLostError:
            raise LeaseLost(self.run_id) from None
        self.count += 1
        return stored


class RedisRunEvents:
    """The run's event stream in Redis, written only under this worker's fencing token."""

    def __init__(self, runs: RedisRuns, run_id: str, token: int) -> None:
        self.runs = runs
        self.run_id = run_id
        self.token = token

    async def publish(self, event: run_event_pb2.RunEvent) -> str:
        payload = run_event_pb2.RunEvent()
        payload.CopyFrom(event)
        payload.ClearField("event_id")
        payload.ClearField("run_id")
        payload.ClearField("sequence")
        payload.ClearField("event_time")
        try:
            return await self.runs.publish(self.run_id, self.token, payload.SerializeToString())
        except LeaseLostError:
            raise LeaseLost(self.run_id) from None


@dataclass
class _Held:
    """One queue entry this worker is working on."""

    run_id: str
    queue: str
    entry_id: str
    fields: dict[str, str]
    task: asyncio.Task[None] | None = None
    stop_reason: str = ""
    token: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Worker:
    """Consumes the run queues and drives each run through the agent loop."""

    def __init__(
        self,
        runs: RedisRuns,
        agents: RedisAgents,
        loop: AgentLoop,
        settings: OrchestratorSettings,
        signer: DelegationSigner,
        *,
        worker_id: str = "",
        metrics: Metrics | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.runs = runs
        self.agents = agents
        self.loop = loop
        self.settings = settings
        self.signer = signer
        self.worker_id = worker_id or settings.worker_id or default_worker_id()
        self.metrics = metrics
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer = provider.get_tracer("foredeck_orchestrator.worker")
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.held: dict[str, _Held] = {}
        self.stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._schedule = self._weighted_schedule(settings.weights())
        self._position = 0
        self._agents: dict[tuple[str, str, int], agent_pb2.Agent] = {}
        self.approvals = RedisApprovals(runs)
        self._approval_signer: ApprovalTokenSigner | None = None
        self.log = get_logger("foredeck.orchestrator.worker", worker_id=self.worker_id)

    # --- lifecycle --------------------------------------------------------------------------

    @staticmethod
    def _weighted_schedule(weights: tuple[int, int, int]) -> list[str]:
        """Smooth weighted round robin over the three queues (e.g. 4,2,1 -> H N H L H N H)."""
        names = ("high", "normal", "low")
        current = [0, 0, 0]
        total = sum(weights)
        order: list[str] = []
        for _ in range(total):
            for i in range(3):
                current[i] += weights[i]
            best = max(range(3), key=lambda i: current[i])
            current[best] -= total
            order.append(names[best])
        return order

    async def start(self) -> None:
        """Create the consumer groups and start the fetcher, reclaimer and cancel listener."""
        for queue in self.runs.keys.queues():
            with contextlib.suppress(ResponseError):
                await self.runs.redis.xgroup_create(
                    queue, self.runs.keys.group, id="0", mkstream=True
                )
        self._room.set()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._fetch_forever(), name="worker-fetch"),
            loop.create_task(self._reclaim_forever(), name="worker-reclaim"),
            loop.create_task(self._listen_cancels(), name="worker-cancels"),
        ]
        self.log.info("worker started", concurrency=self.settings.worker_concurrency)

    async def stop(self) -> None:
        """Stop taking work and give in-flight runs back to the queue at once."""
        self.stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        running = [h for h in self.held.values() if h.task is not None]
        for held in running:
            held.stop_reason = held.stop_reason or "shutdown"
            assert held.task is not None
            held.task.cancel()
        for held in running:
            assert held.task is not None
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await held.task
        self.log.info("worker stopped", released=len(running))

    @property
    def free(self) -> int:
        """Runs this worker may still take on."""
        return self.settings.worker_concurrency - len(self.held)

    # --- taking entries ---------------------------------------------------------------------

    def _take(self, queue: str, entries: Any) -> None:
        for entry_id, fields in entries or ():
            if fields is None:
                continue
            eid = _text(entry_id)
            decoded = {_text(k): _text(v) for k, v in fields.items()}
            run_id = decoded.get("run", "")
            if run_id in self.held:
                # A second entry of a run this worker drives already: it is re-examined later.
                continue
            held = _Held(run_id=run_id, queue=queue, entry_id=eid, fields=decoded)
            self.held[run_id] = held
            held.task = asyncio.get_running_loop().create_task(
                self._drive(held), name=f"run-{run_id}"
            )
        if self.free <= 0:
            self._room.clear()

    async def _wait_for_room(self) -> None:
        while self.free <= 0 and not self.stopping.is_set():
            self._room.clear()
            await self._room.wait()

    async def _fetch_forever(self) -> None:
        redis = self.runs.redis
        keys = self.runs.keys
        group = keys.group
        while not self.stopping.is_set():
            await self._wait_for_room()
            try:
                preferred = self._schedule[self._position % len(self._schedule)]
                self._position += 1
                order = [preferred] + [p for p in ("high", "normal", "low") if p != preferred]
                got = False
                for name in order:
                    queue = keys.queue(name)
                    reply: Any = await redis.xreadgroup(
                        group, self.worker_id, {queue: ">"}, count=max(self.free, 1)
                    )
                    for _, entries in reply or ():
                        if entries:
                            got = True
                            self._take(queue, entries)
                    if got:
                        break
                if got:
                    continue
                reply = await redis.xreadgroup(
                    group, self.worker_id, {q: ">" for q in keys.queues()}, count=1, block=1000
                )
                for stream, entries in reply or ():
                    self._take(_text(stream), entries)
            except asyncio.CancelledError:
                raise
            except ResponseError as error:
                if "NOGROUP" in str(error):
                    for queue in keys.queues():
                        with contextlib.suppress(ResponseError):
                            await redis.xgroup_create(queue, group, id="0", mkstream=True)
                    continue
                self.log.warning("queue read failed", error=type(error).__name__)
                await self._pause(0.5)
            except (RedisError, OSError) as error:
                self.log.warning("queue read failed", error=type(error).__name__)
                await self._pause(0.5)

    async def _pause(self, seconds: float) -> None:
        # A back-off after a store error, cut short when stopping.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _reclaim_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                swept = await self.runs.sweep_submissions(SUBMIT_GRACE_MS, int(time.time() * 1000))
                if swept:
                    self.log.warning("queued runs whose submission stopped halfway", count=swept)
                await self.reclaim_once()
                expired = await self.approvals.expire_due(int(time.time() * 1000))
                if expired:
                    self.log.info("approvals expired", count=expired)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                self.log.warning("reclaim failed", error=type(error).__name__)
            await self._pause(self.settings.reclaim_interval())

    async def reclaim_once(self) -> int:
        """Walk every queue's whole pending list, taking entries idle for a lease or more."""
        redis = self.runs.redis
        taken = 0
        for queue in self.runs.keys.queues():
            cursor = "0-0"
            while self.free > 0:
                reply: Any = await redis.xautoclaim(
                    queue,
                    self.runs.keys.group,
                    self.worker_id,
                    min_idle_time=self.lease_ms,
                    start_id=cursor,
                    count=max(self.free, 1),
                )
                cursor = _text(reply[0])
                entries = reply[1]
                before = len(self.held)
                self._take(queue, entries)
                taken += len(self.held) - before
                if cursor == "0-0":
                    break
        return taken

    async def _listen_cancels(self) -> None:
        while not self.stopping.is_set():
            pubsub = self.runs.redis.pubsub()
            try:
                await pubsub.subscribe(self.runs.keys.cancel_channel)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    run_id = _text(message.get("data", b""))
                    held = self.held.get(run_id)
                    if held is not None and held.task is not None:
                        held.stop_reason = "cancelled"
                        held.task.cancel()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                self.log.warning("cancel channel failed", error=type(error).__name__)
                await self._pause(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # --- one run ----------------------------------------------------------------------------

    async def _drive(self, held: _Held) -> None:
        user = held.fields.get("user", "")
        member = f"{held.run_id}:{self.worker_id}"
        slot = False
        try:
            slot = await self.runs.acquire_slot(
                member,
                user,
                self.lease_ms,
                self.settings.global_concurrency_limit,
                self.settings.user_concurrency_limit,
            )
            if not slot:
                await self._requeue(held, pause=True)
                return
            claim = await self.runs.claim(
                held.run_id, self.worker_id, self.lease_ms, self.settings.max_deliveries
            )
            if claim.state in ("done", "missing"):
                await self.runs.ack(held.queue, held.entry_id)
                return
            if claim.state == "held":
                return
            if claim.state == "dead":
                await self.runs.dead_letter(
                    held.run_id, held.queue, held.entry_id, claim.deliveries
                )
                await self.runs.ack(held.queue, held.entry_id)
                dead = await self.runs.get(held.run_id)
                if dead is not None:
                    await wake_parent(self.runs, dead.run)
                self._error("DELIVERY_LIMIT")
                self.log.warning(
                    "run dead-lettered", run_id=held.run_id, deliveries=claim.deliveries
                )
                return
            held.token = claim.token
            await self._execute(held, user, member)
        except asyncio.CancelledError:
            # Cancelled before the run was claimed (shutdown): the entry simply stays pending
            # or is put back; nothing was written under a token.
            if held.token == 0 and held.stop_reason == "shutdown":
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._requeue(held, pause=False))
        except (RedisError, OSError) as error:
            self.log.warning("run not taken up", run_id=held.run_id, error=type(error).__name__)
        finally:
            if slot:
                with contextlib.suppress(Exception):
                    await self.runs.release_slot(member, user)
            self.held.pop(held.run_id, None)
            self._room.set()

    async def _requeue(self, held: _Held, *, pause: bool) -> None:
        """Put the entry back at the end of its queue (a fresh entry, then ack the old)."""
        if pause and self.settings.requeue_delay_seconds:
            # Back-off before a run refused a slot comes round again.
            await asyncio.sleep(self.settings.requeue_delay_seconds)
        fields: dict[Any, Any] = dict(held.fields)
        await self.runs.redis.xadd(held.queue, fields)
        await self.runs.ack(held.queue, held.entry_id)

    async def _agent(self, tenant_id: str, name: str, version: int) -> agent_pb2.Agent:
        """The pinned agent version; versions never change, so each is read once."""
        key = (tenant_id, name, version)
        agent = self._agents.get(key)
        if agent is None:
            agent = await self.agents.get(tenant_id, name, version)
            if agent is None:
                raise ValueError("pinned agent version not found")
            if len(self._agents) >= _AGENT_CACHE_SIZE:
                self._agents.pop(next(iter(self._agents)))
            self._agents[key] = agent
        return agent

    def _error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.agent_errors_total.labels(reason or "UNKNOWN").inc()

    def _credentials(self, claims: RunClaims, run_id: str) -> Any:
        cached: list[Any] = ["", 0.0]

        def mint() -> str:
            now = time.monotonic()
            if not cached[0] or now - cached[1] > _CREDENTIAL_REUSE_SECONDS:
                cached[0] = self.signer.mint_for_run(claims, run_id)
                cached[1] = now
            return str(cached[0])

        return mint

    def _approver(self, run: run_pb2.Run) -> Any:
        """Mints the approval token of a call whose approval the run's journal holds."""

        def approve(step_id: str, tool_name: str, arguments_json: str) -> str:
            if self._approval_signer is None:
                self._approval_signer = self.settings.approval_signer()
            return self._approval_signer.mint(
                tenant_id=run.tenant_id,
                run_id=run.run_id,
                step_id=step_id,
                tool_name=tool_name,
                arguments_digest=arguments_json_digest(arguments_json or "{}"),
            )

        return approve

    async def _execute(self, held: _Held, user: str, member: str) -> None:
        run_id, token = held.run_id, held.token
        started = time.monotonic()
        kind = "user"
        model = ""
        try:
            record = await self.runs.get(run_id)
            if record is None:
                raise ValueError("run record vanished")
            run = record.run
            held.extra["record"] = record
            claims = RunClaims.from_json(record.claims)
            kind = claims.kind.value
            agent = await self._agent(run.tenant_id, run.agent_name, run.agent_version)
            model = agent.model
        except asyncio.CancelledError:
            await self._after_cancel(held)
            raise
        except Exception as error:
            # A run that cannot even be set up: give it up; the delivery cap ends it.
            self.log.error("run setup failed", run_id=run_id, error=type(error).__name__)
            self._error("RUN_SETUP_FAILED")
            with contextlib.suppress(Exception):
                await self.runs.release(run_id, token, refund=False)
            return
        trace_carrier: dict[str, str] = {}
        with contextlib.suppress(ValueError):
            trace_carrier = json.loads(held.fields.get("trace", "{}") or "{}")
        parent = propagate.extract(trace_carrier or record.trace)
        gauge = (
            self.metrics.agent_concurrent_executions.labels(kind)
            if self.metrics is not None
            else None
        )
        if gauge is not None:
            gauge.inc()
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(held, user, member))
        try:
            with self.tracer.start_as_current_span(
                "orchestrator.run",
                context=parent,
                attributes={
                    "foredeck.run_id": run_id,
                    "foredeck.agent_name": run.agent_name,
                    "foredeck.agent_version": run.agent_version,
                    "foredeck.fencing_token": token,
                },
            ) as span:
                trace_id = format(span.get_span_context().trace_id, "032x")
                await self._run_loop(held, run, agent, claims, trace_id)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            if gauge is not None:
                gauge.dec()
            if self.metrics is not None:
                self.metrics.agent_execution_seconds.labels("run", model or "default").observe(
                    time.monotonic() - started
                )

    async def _run_loop(
        self,
        held: _Held,
        run: run_pb2.Run,
        agent: agent_pb2.Agent,
        claims: RunClaims,
        trace_id: str,
    ) -> None:
        run_id, token = held.run_id, held.token
        record = held.extra.get("record")
        journal: RunJournal = (
            ForkJournal(self.runs, record, token, self.worker_id, trace_id)
            if record is not None and record.fork_source
            else RedisJournal(self.runs, run_id, token, self.worker_id, trace_id)
        )
        ctx = RunContext(
            run=run,
            agent=agent,
            journal=journal,
            events=RedisRunEvents(self.runs, run_id, token),
            worker_id=self.worker_id,
            credentials=self._credentials(claims, run_id),
            trace_id=trace_id,
            approve=self._approver(run),
            children=(
                RedisChildren(self.runs, self.agents, record, held.fields.get("user", ""))
                if record is not None
                else None
            ),
        )
        try:
            try:
                outcome = await self.loop.execute(ctx)
            except JournalPrefixGone:
                # A fork whose source run expired before it could be rebuilt from it.
                outcome = RunOutcome(
                    status=run_pb2.RUN_STATUS_FAILED,
                    error=make_error(
                        Code.FAILED_PRECONDITION,
                        "JOURNAL_EXPIRED",
                        "the journal of the run's source is gone",
                        {"runId": run_id},
                    ),
                )
            await self.runs.finish(
                run_id,
                token,
                status=outcome.status,
                output=outcome.output,
                error=outcome.error,
                usage=outcome.usage,
            )
        except asyncio.CancelledError:
            await self._after_cancel(held)
            raise
        except (LeaseLost, LeaseLostError):
            await self._after_lease_lost(held)
            return
        except ChildPending as pending:
            # Parked while the child runs; the child's end queues this run again.
            held.stop_reason = "parked"
            child_id = pending.child_run_id
            if not await park_for_child(self.runs, run_id, token, child_id):
                await self._after_lease_lost(held)
                return

            async def settle() -> None:
                await self.runs.ack(held.queue, held.entry_id)
                child = await self.runs.get(child_id)
                if child is None or is_terminal(child.run.status):
                    # The child ended while this run was being parked: queue it now.
                    await wake_parent(self.runs, run_pb2.Run(run_id=child_id, parent_run_id=run_id))

            await asyncio.shield(settle())
            self.log.info("run waiting for its sub-agent", run_id=run_id, child_run_id=child_id)
            return
        except ApprovalPending as pending:
            # Parked: no worker holds the run and no lease ticks until a decision queues it.
            held.stop_reason = "parked"
            try:
                await self.approvals.park(run, agent, pending, token)
            except LeaseLostError:
                await self._after_lease_lost(held)
                return
            # Shielded: the heartbeat, seeing the token moved by the park, may cancel this task.
            await asyncio.shield(self.runs.ack(held.queue, held.entry_id))
            self.log.info(
                "run waiting for approval",
                run_id=run_id,
                step_id=pending.step_id,
                approval_id=pending.approval_id,
                tool=pending.tool_call.tool_name,
            )
            return
        except Exception as error:
            self.log.error("run failed in the runtime", run_id=run_id, error=type(error).__name__)
            self._error("RUNTIME_FAULT")
            with contextlib.suppress(Exception):
                await self.runs.release(run_id, token, refund=False)
            return
        # Acknowledged only now that the outcome is committed.
        await self.runs.ack(held.queue, held.entry_id)
        if run.parent_run_id:
            with contextlib.suppress(RedisError, OSError):
                await wake_parent(self.runs, run)
        if outcome.status != run_pb2.RUN_STATUS_SUCCEEDED:
            self._error(outcome.error.reason if outcome.error is not None else "FAILED")
        self.log.info(
            "run finished",
            run_id=run_id,
            status=run_pb2.RunStatus.Name(outcome.status),
            fencing_token=token,
        )

    async def _after_lease_lost(self, held: _Held) -> None:
        """Another worker holds the run, or it was cancelled: write nothing more."""
        self.log.warning("lease lost; run left to its holder", run_id=held.run_id)
        self._error("LEASE_LOST")
        with contextlib.suppress(Exception):
            record = await self.runs.get(held.run_id)
            if record is not None and is_terminal(record.run.status):
                await self.runs.ack(held.queue, held.entry_id)

    async def _after_cancel(self, held: _Held) -> None:
        reason = held.stop_reason
        try:
            if reason == "cancelled":
                await asyncio.shield(self._after_lease_lost(held))
                self.log.info("run cancelled", run_id=held.run_id)
            elif reason == "shutdown":

                async def give_back() -> None:
                    if await self.runs.release(held.run_id, held.token, refund=True):
                        await self._requeue(held, pause=False)

                await asyncio.shield(give_back())
                self.log.info("run released on shutdown", run_id=held.run_id)
            elif reason == "lease_lost":
                await asyncio.shield(self._after_lease_lost(held))
        except Exception as error:
            self.log.warning("release failed", run_id=held.run_id, error=type(error).__name__)

    async def _heartbeat(self, held: _Held, user: str, member: str) -> None:
        interval = self.settings.heartbeat_interval()
        while True:
            # Periodic lease renewal, not synchronisation.
            await asyncio.sleep(interval)
            try:
                await self.runs.heartbeat(held.run_id, held.token, self.lease_ms)
            except LeaseLostError:
                if held.stop_reason == "parked":
                    # The run was parked (its token moved on purpose): nothing to stop.
                    return
                held.stop_reason = held.stop_reason or "lease_lost"
                if held.task is not None:
                    held.task.cancel()
                return
            except (RedisError, OSError) as error:
                self.log.warning("heartbeat failed", run_id=held.run_id, error=type(error).__name__)
                continue
            with contextlib.suppress(RedisError, OSError):
                await self.runs.renew_slot(member, user, self.lease_ms)
                # Keep the entry ours and fresh, so no reclaimer takes a run that is alive.
                await self.runs.redis.xclaim(
                    held.queue,
                    self.runs.keys.group,
                    self.worker_id,
                    min_idle_time=0,
                    message_ids=[held.entry_id],
                    justid=True,
                )
