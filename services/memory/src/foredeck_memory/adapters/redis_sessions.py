"""Working-memory sessions in Redis.

One session's keys share a hash tag (tenant, user, session) so its Lua scripts run on one
Cluster slot: ``:meta`` (counters and times), ``:msgs`` (sequence → SessionMessage bytes,
stored without the sequence, which is the field name) and ``:sums`` (summary id → Summary
bytes). Appends run as one script: the sequence check, the message-count limit, the numbering
and the expiry move together, so concurrent writers never share or skip a number.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from redis.asyncio import Redis

from foredeck.memory.v1 import session_pb2
from foredeck_memory.adapters.redis_support import RedisLocks, redis_errors, tag
from foredeck_memory.domain.errors import Fault, FaultKind
from foredeck_memory.domain.models import Scope
from foredeck_memory.domain.working import AppendOutcome, SessionMeta

_APPEND = """
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= last then return {-1, last} end
local n = #ARGV - 5
if redis.call('HLEN', KEYS[2]) + n > tonumber(ARGV[2]) then return {-2, last} end
for i = 1, n do redis.call('HSET', KEYS[2], last + i, ARGV[5 + i]) end
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[1], 'create_us') == 0 then
  redis.call('HSET', KEYS[1], 'create_us', ARGV[4], 'session_id', ARGV[5])
end
redis.call('HSET', KEYS[1], 'last_seq', last + n, 'update_us', ARGV[4],
  'expire_us', string.format('%.0f', now + ttl * 1000))
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {last + 1, last + n}
"""

_PUT_SUMMARY = """
local cur = redis.call('HGET', KEYS[1], 'current_summary') or ''
if cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[4], ARGV[5]) end
redis.call('HSET', KEYS[1], 'current_summary', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'summary_count', 1)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
return 1
"""

_CLEAR = """
local m = redis.call('HLEN', KEYS[2])
local s = redis.call('HLEN', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {m, s}
"""


class RedisSessionStore:
    """A :class:`~foredeck_memory.domain.working.SessionStore` in Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._locks = RedisLocks(redis, ttl_ms=120_000, wait_seconds=90.0)

    @staticmethod
    def _keys(scope: Scope, session_id: str) -> list[str]:
        base = f"fdmem:s:{tag(scope.tenant_id, scope.user_id, session_id)}"
        return [f"{base}:meta", f"{base}:msgs", f"{base}:sums"]

    @staticmethod
    def _index(scope: Scope) -> str:
        return f"fdmem:u:{tag(scope.tenant_id, scope.user_id)}:sessions"

    async def append(
        self,
        scope: Scope,
        session_id: str,
        messages: Sequence[bytes],
        expected_last_sequence: int | None,
        ttl_ms: int,
        max_messages: int,
        at: int,
    ) -> AppendOutcome:
        keys = self._keys(scope, session_id)
        expected = "" if expected_last_sequence is None else str(expected_last_sequence)
        with redis_errors():
            # The index is written first (another slot): ForgetUser must find every session.
            await self._redis.sadd(self._index(scope), session_id)
            first, last = await self._redis.eval(
                _APPEND, 3, *keys, expected, max_messages, ttl_ms, at, session_id, *messages
            )
        first, last = int(first), int(last)
        if first == -1:
            raise Fault(
                FaultKind.ABORTED,
                "SEQUENCE_CONFLICT",
                "the session's last sequence number has moved",
                metadata={
                    "sessionId": session_id,
                    "expectedLastSequence": expected,
                    "lastSequence": str(last),
                },
            )
        if first == -2:
            raise Fault(
                FaultKind.EXHAUSTED,
                "SESSION_FULL",
                "the session is full",
                metadata={"sessionId": session_id, "limit": str(max_messages)},
                quota_violations=[(f"session:{session_id}", "messages per session")],
            )
        meta = await self.meta(scope, session_id)
        assert meta is not None
        return AppendOutcome(first, last, meta)

    async def meta(self, scope: Scope, session_id: str) -> SessionMeta | None:
        keys = self._keys(scope, session_id)
        with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys[0])
                pipe.hlen(keys[1])
                raw, count = await pipe.execute()
        if not raw or int(count) == 0:
            return None
        values = {k.decode(): v.decode() for k, v in raw.items()}
        return SessionMeta(
            session_id=session_id,
            last_sequence=int(values.get("last_seq", 0)),
            message_count=int(count),
            summary_count=int(values.get("summary_count", 0)),
            current_summary_id=values.get("current_summary", ""),
            create_time=int(values.get("create_us", 0)),
            update_time=int(values.get("update_us", 0)),
            expire_time=int(values.get("expire_us", 0)),
        )

    async def messages(
        self, scope: Scope, session_id: str, after_sequence: int, count: int
    ) -> list[session_pb2.SessionMessage]:
        keys = self._keys(scope, session_id)
        with redis_errors():
            last = int(await self._redis.hget(keys[0], "last_seq") or 0)
            wanted = list(range(after_sequence + 1, min(last, after_sequence + count) + 1))
            if not wanted:
                return []
            raw = await self._redis.hmget(keys[1], wanted)
        out = []
        for sequence, value in zip(wanted, raw, strict=True):
            if value is None:
                continue
            message = session_pb2.SessionMessage.FromString(_bytes(value))
            message.sequence = sequence
            out.append(message)
        return out

    async def summaries(self, scope: Scope, session_id: str) -> list[session_pb2.Summary]:
        keys = self._keys(scope, session_id)
        with redis_errors():
            raw = await self._redis.hvals(keys[2])
        return [session_pb2.Summary.FromString(_bytes(v)) for v in raw]

    async def put_summary(
        self,
        scope: Scope,
        session_id: str,
        summary: session_pb2.Summary,
        replaced: session_pb2.Summary | None,
    ) -> bool:
        keys = self._keys(scope, session_id)
        expected = replaced.summary_id if replaced is not None else ""
        with redis_errors():
            stored = await self._redis.eval(
                _PUT_SUMMARY,
                3,
                *keys,
                expected,
                summary.summary_id,
                summary.SerializeToString(deterministic=True),
                expected,
                replaced.SerializeToString(deterministic=True) if replaced is not None else b"",
            )
        return bool(int(stored))

    async def clear(self, scope: Scope, session_id: str) -> tuple[int, int]:
        keys = self._keys(scope, session_id)
        with redis_errors():
            messages, summaries = await self._redis.eval(_CLEAR, 3, *keys)
            await self._redis.srem(self._index(scope), session_id)
        return int(messages), int(summaries)

    async def forget_user(self, scope: Scope) -> int:
        deleted = 0
        with redis_errors():
            members = await self._redis.smembers(self._index(scope))
        for member in members:
            session_id = member.decode() if isinstance(member, bytes) else str(member)
            messages, _ = await self.clear(scope, session_id)
            if messages:
                deleted += 1
        with redis_errors():
            await self._redis.delete(self._index(scope))
        return deleted

    @contextlib.asynccontextmanager
    async def lock(self, scope: Scope, session_id: str) -> AsyncIterator[None]:
        async with self._locks.hold(f"summary\x00{self._keys(scope, session_id)[0]}"):
            yield


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
