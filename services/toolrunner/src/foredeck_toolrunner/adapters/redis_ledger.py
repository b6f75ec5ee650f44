"""The effect ledger and the per-tenant rate limits, atomic in Redis across replicas.

Ledger entries are hashes under ``<p>:{ledger:<tenant>}:<idempotency key>`` (``state`` is
``running`` while a call holds the key under a lease, ``done`` with the recorded response
after); waiters are woken through a pub/sub channel of the same name. Rate limits are sliding
logs (sorted sets of admission times, taken from Redis's own clock) under
``<p>:{rate:<tenant>}:<tool>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from datetime import timedelta

from redis.asyncio import Redis
from redis.exceptions import RedisError

from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.ports import Claim

__all__ = ["RedisEffectLedger", "RedisRateLimiter"]

_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'tool', 'resp')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'state', 'running', 'fp', ARGV[1], 'tool', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed'}
end
return {rec[1], rec[2], rec[3], rec[4] or ''}
"""

_COMPLETE = """
redis.call('HSET', KEYS[1], 'state', 'done', 'resp', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], 'done')
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') == 'running' then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', KEYS[1], 'released')
return 1
"""

# Sliding log: admission times in microseconds of Redis's clock, so replicas agree on time.
_ACQUIRE = """
local max, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < max then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.floor(window / 1000) + 1000)
  return -1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tonumber(oldest[2]) + window - now
"""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class RedisEffectLedger:
    """Records each call's outcome once per tenant and idempotency key."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self._release = redis.register_script(_RELEASE)

    def _key(self, tenant: str, key: str) -> str:
        return f"{self._prefix}:{{ledger:{tenant}}}:{key}"

    @staticmethod
    def _state(result: list[bytes | str]) -> Claim:
        state = _text(result[0])
        if state == "claimed":
            return Claim("claimed")
        return Claim(
            state,
            response=bytes(result[3]) if isinstance(result[3], bytes) else result[3].encode(),
            tool_name=_text(result[2]),
            fingerprint=_text(result[1]),
        )

    async def claim(
        self, tenant: str, key: str, fingerprint: str, tool_name: str, lease: timedelta
    ) -> Claim:
        """Claim the key for a new run, or report the recorded or running call."""
        try:
            result = await self._claim(
                keys=[self._key(tenant, key)],
                args=[fingerprint, tool_name, max(1, int(lease.total_seconds() * 1000))],
            )
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        return self._state(result)

    async def complete(self, tenant: str, key: str, response: bytes, ttl: timedelta) -> None:
        """Record a claimed call's outcome and wake its waiters."""
        try:
            await self._complete(
                keys=[self._key(tenant, key)], args=[response, int(ttl.total_seconds() * 1000)]
            )
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None

    async def release(self, tenant: str, key: str) -> None:
        """Forget a claim whose call ended in an RPC error, and wake its waiters."""
        with contextlib.suppress(RedisError):
            await self._release(keys=[self._key(tenant, key)], args=[])

    async def _read(self, name: str) -> Claim | None:
        state, fp, tool, resp = await self._redis.hmget(name, ["state", "fp", "tool", "resp"])
        if state is None:
            return None
        raw = resp if isinstance(resp, bytes) else (resp or "").encode()
        return Claim(_text(state), response=raw, tool_name=_text(tool), fingerprint=_text(fp))

    async def wait_change(self, tenant: str, key: str, seconds: float) -> Claim | None:
        """Wait until the running call completes or is released, at most ``seconds``.

        Returns the entry's state afterwards (None when it is gone); a ``running`` state after
        the timeout means nothing changed.
        """
        name = self._key(tenant, key)
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(name)
            # Read after subscribing, so a completion between the caller's read and now is seen.
            current = await self._read(name)
            if current is None or current.state != "running":
                return current
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while (left := end - loop.time()) > 0:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if message is not None:
                    break
            return await self._read(name)
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        finally:
            with contextlib.suppress(RedisError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisRateLimiter:
    """Sliding-window rate limits per tenant and tool, atomic across replicas."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._prefix = prefix
        self._acquire = redis.register_script(_ACQUIRE)

    async def acquire(
        self, tenant: str, tool_name: str, max_calls: int, window: timedelta
    ) -> timedelta | None:
        """None when admitted, else how long until the next call would be."""
        window_us = int(window.total_seconds() * 1_000_000)
        key = f"{self._prefix}:{{rate:{tenant}}}:{tool_name}"
        try:
            wait = await self._acquire(keys=[key], args=[max_calls, window_us, uuid.uuid4().hex])
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        if int(wait) < 0:
            return None
        return timedelta(microseconds=max(1000, math.ceil(int(wait))))
