"""Runs in Redis: records, queues, leases with fencing, journals, events and concurrency slots.

A run's record is a hash: ``spec`` (the Run message's fixed fields: ids, input, agent version,
budget, labels…), the submitter's ``claims``, the ``trace`` context, and the fields that change
(``status``, ``token``, ``owner``, ``lease``, ``deliveries``, usage, times, ``output``,
``error``). :func:`run_from_record` puts the Run message back together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import timestamp_pb2
from redis.asyncio import BlockingConnectionPool, Redis

from foredeck.common.v1 import error_pb2, journal_pb2, run_event_pb2, run_pb2, usage_pb2
from foredeck_orchestrator.adapters import scripts
from foredeck_orchestrator.adapters.keys import Keys

__all__ = [
    "Claim",
    "RedisRuns",
    "RunRecord",
    "decode_event",
    "priority_name",
    "run_from_record",
]

_TERMINAL = frozenset(
    {
        run_pb2.RUN_STATUS_SUCCEEDED,
        run_pb2.RUN_STATUS_FAILED,
        run_pb2.RUN_STATUS_CANCELLED,
        run_pb2.RUN_STATUS_DEAD_LETTERED,
    }
)


def redis_client(settings: Any, max_connections: int | None = None) -> Redis:
    """A client whose calls wait for a free connection (up to a bound) instead of failing."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_seconds,
    )
    return Redis(connection_pool=pool)


def is_terminal(status: int) -> bool:
    """Whether a run in ``status`` has finished."""
    return status in _TERMINAL


def priority_name(priority: int) -> str:
    """The queue a priority goes to."""
    if priority == run_pb2.PRIORITY_HIGH:
        return "high"
    if priority == run_pb2.PRIORITY_LOW:
        return "low"
    return "normal"


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _int(value: Any) -> int:
    text = _text(value)
    return int(text) if text else 0


def _stamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


@dataclass(slots=True)
class RunRecord:
    """A run as stored, with the fields only the runtime reads."""

    run: run_pb2.Run
    claims: str
    trace: dict[str, str]
    token: int
    owner: str
    deliveries: int
    digest: str
    enqueued: bool
    created_ms: int
    fork_source: str = ""
    fork_length: int = 0


def run_from_record(raw: Mapping[Any, Any]) -> RunRecord:
    """Rebuild the Run message from its hash."""
    run = run_pb2.Run.FromString(raw[b"spec"])
    run.status = cast(run_pb2.RunStatus.ValueType, _int(raw.get(b"status")))
    run.output = _text(raw.get(b"output"))
    error = raw.get(b"error")
    if error:
        run.error.ParseFromString(error)
    run.usage.CopyFrom(
        usage_pb2.Usage(
            input_tokens=_int(raw.get(b"in")),
            output_tokens=_int(raw.get(b"out")),
            cost_usd_micros=_int(raw.get(b"cost")),
        )
    )
    run.step_count = _int(raw.get(b"steps"))
    if _int(raw.get(b"start")):
        run.start_time.CopyFrom(_stamp(_int(raw.get(b"start"))))
    if _int(raw.get(b"end")):
        run.end_time.CopyFrom(_stamp(_int(raw.get(b"end"))))
    run.last_event_id = _text(raw.get(b"last_event"))
    trace_text = _text(raw.get(b"trace"))
    return RunRecord(
        run=run,
        claims=_text(raw.get(b"claims")),
        trace=json.loads(trace_text) if trace_text else {},
        token=_int(raw.get(b"token")),
        owner=_text(raw.get(b"owner")),
        deliveries=_int(raw.get(b"deliveries")),
        digest=_text(raw.get(b"digest")),
        enqueued=_int(raw.get(b"enq")) == 1,
        created_ms=_int(raw.get(b"created")),
        fork_source=_text(raw.get(b"fork_src")),
        fork_length=_int(raw.get(b"fork_len")),
    )


def decode_event(run_id: str, entry_id: Any, fields: Any) -> Any:
    """A RunEvent from one entry of the run's stream."""
    event = run_event_pb2.RunEvent.FromString(fields[b"e"])
    event.event_id = _text(entry_id)
    event.run_id = run_id
    event.sequence = _int(fields.get(b"s"))
    event.event_time.CopyFrom(_stamp(_int(fields.get(b"t"))))
    return event


@dataclass(frozen=True, slots=True)
class Claim:
    """What a worker's attempt to take up a run found.

    ``state`` is ``ok`` (this worker now holds the run with ``token``), ``done`` (finished:
    drop the queue entry), ``held`` (another worker's lease is live), ``dead`` (delivery cap
    reached: dead-lettered just now) or ``missing``.
    """

    state: str
    token: int = 0
    deliveries: int = 0
    start_ms: int = 0


class LeaseLostError(Exception):
    """The run's fencing token moved: nothing was written."""


def _event_bytes(**payload: Any) -> bytes:
    return run_event_pb2.RunEvent(**payload).SerializeToString()


def status_event(previous: int, status: int) -> bytes:
    """A RunStatusChanged event's bytes."""
    return _event_bytes(
        status_changed=run_event_pb2.RunStatusChanged(
            previous_status=cast(run_pb2.RunStatus.ValueType, previous),
            status=cast(run_pb2.RunStatus.ValueType, status),
        )
    )


def finished_event(
    status: int,
    output: str = "",
    error: error_pb2.Error | None = None,
    usage: usage_pb2.Usage | None = None,
) -> bytes:
    """A RunFinished event's bytes."""
    finished = run_event_pb2.RunFinished(
        status=cast(run_pb2.RunStatus.ValueType, status), output=output
    )
    if error is not None:
        finished.error.CopyFrom(error)
    if usage is not None:
        finished.usage.CopyFrom(usage)
    return _event_bytes(run_finished=finished)


class RedisRuns:
    """Every Redis operation on runs; one instance per process, over one client."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        event_retention: int = 10_000,
        run_ttl_seconds: int = 7 * 24 * 3600,
        watch_redis: Redis | None = None,
    ) -> None:
        self.redis = redis
        # Blocking reads of watchers hold a connection each while they wait: a pool of their
        # own keeps them from starving every other call.
        self.watch_redis = watch_redis or redis
        self.keys = keys
        self.event_retention = event_retention
        self.run_ttl_seconds = run_ttl_seconds
        self._submit = redis.register_script(scripts.SUBMIT)
        self._claim = redis.register_script(scripts.CLAIM)
        self._heartbeat = redis.register_script(scripts.HEARTBEAT)
        self._release = redis.register_script(scripts.RELEASE)
        self._append = redis.register_script(scripts.APPEND_JOURNAL)
        self._publish = redis.register_script(scripts.PUBLISH_EVENT)
        self._finish = redis.register_script(scripts.FINISH)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._acquire_slot = redis.register_script(scripts.ACQUIRE_SLOT)
        self._renew_slot = redis.register_script(scripts.RENEW_SLOT)
        self._release_slot = redis.register_script(scripts.RELEASE_SLOT)

    # --- submit and read --------------------------------------------------------------------

    async def create(
        self,
        run: run_pb2.Run,
        *,
        digest: str,
        claims: str,
        trace: Mapping[str, str],
        user_key: str,
        extra: Mapping[str, str | int] | None = None,
    ) -> tuple[bool, str]:
        """Record a new run (QUEUED) unless its id exists; return (created, stored digest).

        ``extra`` fields are written into the record in the same step.
        """
        run_id = run.run_id
        pairs: list[str | int] = []
        for name, value in (extra or {}).items():
            pairs.extend((name, value))
        result = await self._submit(
            keys=[self.keys.run(run_id), self.keys.events(run_id)],
            args=[
                digest,
                run.SerializeToString(),
                claims,
                json.dumps(dict(trace)),
                status_event(run_pb2.RUN_STATUS_UNSPECIFIED, run_pb2.RUN_STATUS_QUEUED),
                self.event_retention,
                priority_name(run.priority),
                user_key,
                *pairs,
            ],
        )
        return bool(int(result[0])), _text(result[1])

    async def enqueue(
        self,
        run_id: str,
        priority: str,
        *,
        user_key: str,
        trace: Mapping[str, str],
    ) -> str:
        """Add the run to its priority stream and mark the record enqueued."""
        entry_id = await self.redis.xadd(
            self.keys.queue(priority),
            {"run": run_id, "user": user_key, "trace": json.dumps(dict(trace))},
        )
        await self.redis.hset(self.keys.run(run_id), "enq", 1)
        return _text(entry_id)

    async def begin_submit(self, run_id: str, now_ms: int) -> None:
        """Note a submission before its first write, so a sweeper can finish it if we die."""
        await self.redis.zadd(self.keys.submitting, {run_id: now_ms})

    async def end_submit(self, run_id: str) -> None:
        """The submission reached its queue."""
        await self.redis.zrem(self.keys.submitting, run_id)

    async def sweep_submissions(self, older_than_ms: int, now_ms: int, limit: int = 100) -> int:
        """Queue runs whose submitter died between recording and queueing them.

        A run recorded but not queued is queued now; a note without a record (the submitter
        died before writing) is dropped. A run queued twice is harmless: a worker drops an
        entry of a run it cannot take.
        """
        stale: Any = await self.redis.zrangebyscore(
            self.keys.submitting, "-inf", now_ms - older_than_ms, start=0, num=limit
        )
        swept = 0
        for raw in stale:
            run_id = _text(raw)
            record = await self.get(run_id)
            if record is not None and not record.enqueued:
                run = record.run
                await self.enqueue(
                    run_id,
                    priority_name(run.priority),
                    user_key=_text((await self.redis.hget(self.keys.run(run_id), "user")) or ""),
                    trace=record.trace,
                )
                await self.index(run.tenant_id, run_id, record.created_ms)
                swept += 1
            await self.end_submit(run_id)
        return swept

    async def index(self, tenant_id: str, run_id: str, created_ms: int) -> None:
        """List the run under its tenant (for ListRuns)."""
        await self.redis.zadd(self.keys.tenant_runs(tenant_id), {run_id: created_ms})

    async def queue_length(self, priority: str) -> int:
        """Entries in one priority stream."""
        return int(await self.redis.xlen(self.keys.queue(priority)))

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None."""
        raw: Any = await self.redis.hgetall(self.keys.run(run_id))
        if not raw or b"spec" not in raw:
            return None
        return run_from_record(raw)

    async def get_many(self, run_ids: Sequence[str]) -> list[RunRecord | None]:
        """Several records in one round trip."""
        if not run_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(self.keys.run(run_id))
        raws = await pipe.execute()
        return [run_from_record(raw) if raw and b"spec" in raw else None for raw in raws]

    async def tenant_page(self, tenant_id: str, start: int, count: int) -> list[str]:
        """Run ids of a tenant, newest first, from position ``start``."""
        ids = await self.redis.zrevrange(self.keys.tenant_runs(tenant_id), start, start + count - 1)
        return [_text(i) for i in ids]

    async def journal(self, run_id: str, start: int = 0, stop: int = -1) -> list[bytes]:
        """Journal entries' bytes, by list position."""
        raws: Any = await self.redis.lrange(self.keys.journal(run_id), start, stop)
        return list(raws)

    async def events_after(self, run_id: str, after: str, count: int = 500) -> list[Any]:
        """Events strictly after ``after`` (``0-0`` for all), oldest first."""
        start = "-" if after == "0-0" else "(" + after
        entries: Any = await self.redis.xrange(self.keys.events(run_id), start, "+", count=count)
        return [decode_event(run_id, eid, fields) for eid, fields in entries]

    async def wait_events(self, run_id: str, after: str, block_ms: int) -> list[Any]:
        """Events after ``after``, waiting up to ``block_ms`` for the first."""
        reply: Any = await self.redis.xread(
            {self.keys.events(run_id): after}, count=500, block=block_ms
        )
        out: list[Any] = []
        for _, entries in reply or ():
            out.extend(decode_event(run_id, eid, fields) for eid, fields in entries)
        return out

    async def trimmed_through(self, run_id: str) -> str:
        """The newest event id trimmed from the run's stream; empty when none was."""
        value: Any = await self.redis.hget(self.keys.run(run_id), "trimmed_through")
        return _text(value) if value else ""

    async def first_event(self, run_id: str) -> Any | None:
        """The oldest event still kept, or None."""
        entries: Any = await self.redis.xrange(self.keys.events(run_id), "-", "+", count=1)
        return decode_event(run_id, entries[0][0], entries[0][1]) if entries else None

    # --- cancel -----------------------------------------------------------------------------

    async def cancel(self, run_id: str, expected: int, error: error_pb2.Error) -> tuple[str, int]:
        """Cancel the run if its status is still ``expected``; (outcome, status found)."""
        result = await self._cancel(
            keys=[self.keys.run(run_id), self.keys.events(run_id), self.keys.journal(run_id)],
            args=[
                expected,
                error.SerializeToString(),
                status_event(expected, run_pb2.RUN_STATUS_CANCELLED),
                finished_event(run_pb2.RUN_STATUS_CANCELLED, error=error),
                self.event_retention,
                self.run_ttl_seconds,
            ],
        )
        state = _text(result[0])
        return state, _int(result[1]) if len(result) > 1 else 0

    async def announce_cancel(self, run_id: str) -> None:
        """Tell every worker that the run was cancelled."""
        await self.redis.publish(self.keys.cancel_channel, run_id)

    # --- worker: leases and fenced writes ---------------------------------------------------

    async def claim(self, run_id: str, worker: str, lease_ms: int, max_deliveries: int) -> Claim:
        """Take up the run for ``worker``: bump its fencing token and start its lease."""
        dead_error = error_pb2.Error(
            code=10,  # ABORTED
            reason="DELIVERY_LIMIT",
            domain="orchestrator.foredeck.dev",
            message="the run was taken up too many times without finishing",
            metadata={"maxDeliveries": str(max_deliveries)},
        )
        result = await self._claim(
            keys=[self.keys.run(run_id), self.keys.events(run_id), self.keys.journal(run_id)],
            args=[
                worker,
                lease_ms,
                max_deliveries,
                status_event(run_pb2.RUN_STATUS_QUEUED, run_pb2.RUN_STATUS_RUNNING),
                status_event(run_pb2.RUN_STATUS_RUNNING, run_pb2.RUN_STATUS_DEAD_LETTERED),
                finished_event(run_pb2.RUN_STATUS_DEAD_LETTERED, error=dead_error),
                dead_error.SerializeToString(),
                self.event_retention,
                self.run_ttl_seconds,
            ],
        )
        state = _text(result[0])
        if state == "ok":
            return Claim(
                "ok", token=_int(result[1]), deliveries=_int(result[2]), start_ms=_int(result[3])
            )
        if state == "dead":
            return Claim("dead", deliveries=_int(result[1]))
        return Claim(state)

    async def heartbeat(self, run_id: str, token: int, lease_ms: int) -> None:
        """Extend the lease; raises :class:`LeaseLostError` when the token moved."""
        if int(await self._heartbeat(keys=[self.keys.run(run_id)], args=[token, lease_ms])) < 0:
            raise LeaseLostError(run_id)

    async def release(self, run_id: str, token: int, *, refund: bool) -> bool:
        """Give the run up so another worker may take it at once; False if already lost."""
        result = await self._release(keys=[self.keys.run(run_id)], args=[token, int(refund)])
        return int(result) > 0

    async def append(
        self,
        run_id: str,
        token: int,
        entry: journal_pb2.JournalEntry,
        *,
        position: int | None = None,
    ) -> None:
        """Commit a journal entry (fenced); raises :class:`LeaseLostError`.

        ``position`` is the entry's place in this run's own list (1 first), when it differs
        from ``entry_index`` (a fork's entries come after its source's prefix).
        """
        result = int(
            await self._append(
                keys=[self.keys.run(run_id), self.keys.journal(run_id)],
                args=[
                    token,
                    entry.entry_index if position is None else position,
                    entry.SerializeToString(),
                    entry.usage.input_tokens,
                    entry.usage.output_tokens,
                    entry.usage.cost_usd_micros,
                    entry.step_index,
                ],
            )
        )
        if result == -1:
            raise LeaseLostError(run_id)
        if result == -2:
            # Someone else's entry landed first: only possible if the lease moved.
            raise LeaseLostError(run_id)

    async def publish(self, run_id: str, token: int, event: bytes) -> str:
        """Append an event (fenced) and return its id; raises :class:`LeaseLostError`."""
        result = await self._publish(
            keys=[self.keys.run(run_id), self.keys.events(run_id)],
            args=[token, event, self.event_retention],
        )
        if isinstance(result, int) and result < 0:
            raise LeaseLostError(run_id)
        return _text(result)

    async def finish(
        self,
        run_id: str,
        token: int,
        *,
        status: int,
        output: str,
        error: error_pb2.Error | None,
        usage: usage_pb2.Usage,
    ) -> None:
        """Record the run's end and publish its last events (fenced)."""
        result = await self._finish(
            keys=[self.keys.run(run_id), self.keys.events(run_id), self.keys.journal(run_id)],
            args=[
                token,
                status,
                output,
                error.SerializeToString() if error is not None else b"",
                status_event(run_pb2.RUN_STATUS_RUNNING, status),
                finished_event(status, output, error, usage),
                self.event_retention,
                self.run_ttl_seconds,
            ],
        )
        if int(result) < 0:
            raise LeaseLostError(run_id)

    # --- queue entries ----------------------------------------------------------------------

    async def ack(self, queue: str, entry_id: str) -> None:
        """Acknowledge and delete one queue entry."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(queue, self.keys.group, entry_id)
        pipe.xdel(queue, entry_id)
        await pipe.execute()

    async def dead_letter(self, run_id: str, queue: str, entry_id: str, deliveries: int) -> None:
        """Record a dead-lettered run in the dead-letter stream."""
        await self.redis.xadd(
            self.keys.dead_letters,
            {"run": run_id, "queue": queue, "entry": entry_id, "deliveries": deliveries},
        )

    # --- concurrency slots ------------------------------------------------------------------

    async def acquire_slot(
        self, member: str, user_key: str, lease_ms: int, global_limit: int, user_limit: int
    ) -> bool:
        """Take one global and one per-user execution slot, or none."""
        result = await self._acquire_slot(
            keys=[self.keys.global_slots, self.keys.user_slots(user_key)],
            args=[member, lease_ms, global_limit, user_limit],
        )
        return int(result) == 1

    async def renew_slot(self, member: str, user_key: str, lease_ms: int) -> None:
        """Extend the slots' expiry with the lease."""
        await self._renew_slot(
            keys=[self.keys.global_slots, self.keys.user_slots(user_key)],
            args=[member, lease_ms],
        )

    async def release_slot(self, member: str, user_key: str) -> None:
        """Give the slots back."""
        await self._release_slot(
            keys=[self.keys.global_slots, self.keys.user_slots(user_key)], args=[member]
        )
