"""Redis helpers of the memory service: the two-store outbox, cross-replica locks, and
idempotency records for writes that carry a client ``request_id``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from foredeck_memory.domain import errors
from foredeck_memory.domain.errors import StoreDown
from foredeck_memory.domain.models import Scope

OUTBOX_KEY = "fdmem:outbox"
LOCK_TTL_MS = 30_000
IDEMPOTENCY_TTL_S = 24 * 3600

_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1, 0}
end
local n = tonumber(ARGV[1])
local held = {tonumber(redis.call('GET', KEYS[1])), tonumber(redis.call('GET', KEYS[2]))}
for i = 1, 2 do
  local limit = tonumber(ARGV[i + 1])
  if limit > 0 and held[i] + n > limit then return {i, held[i]} end
end
redis.call('INCRBY', KEYS[1], n)
redis.call('INCRBY', KEYS[2], n)
return {0, 0}
"""

_GIVE_BACK = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 and redis.call('DECRBY', key, ARGV[1]) < 0 then
    redis.call('SET', key, 0)
  end
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@contextlib.contextmanager
def redis_errors() -> Any:
    """Turn connection failures into :class:`StoreDown` for the error mapping."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreDown("redis", exc) from exc


def tag(*parts: str) -> str:
    """A short, brace-free digest of ids, used as a Redis Cluster hash tag."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]
    return "{" + digest + "}"


class RedisOutbox:
    """Intent records of two-store writes, in one Redis hash."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def begin(self, entry: dict[str, Any]) -> str:
        token = str(uuid.uuid4())
        record = json.dumps({"at": time.time(), "entry": entry})
        with redis_errors():
            await self._redis.hset(OUTBOX_KEY, token, record)
        return token

    async def done(self, token: str) -> None:
        with redis_errors():
            await self._redis.hdel(OUTBOX_KEY, token)

    async def stale(self, older_than_seconds: float) -> list[tuple[str, dict[str, Any]]]:
        with redis_errors():
            raw = await self._redis.hgetall(OUTBOX_KEY)
        cutoff = time.time() - older_than_seconds
        out = []
        for token, value in raw.items():
            record = json.loads(value)
            if record["at"] <= cutoff:
                key = token.decode() if isinstance(token, bytes) else str(token)
                out.append((key, record["entry"]))
        return out


class RedisQuotas:
    """Per-tenant and per-user counts of stored memory versions, capped, in Redis.

    One Lua script checks both caps and takes room for a whole batch, so replicas sharing
    the Redis admit exactly up to a cap and a batch is admitted whole or not at all. A count
    that does not exist yet (a new user, or data written before counting began) is started
    from the vector store's own count; deleting a counter key makes the next write recount.
    Both keys of a tenant share one hash tag, so the script also runs on Redis Cluster.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        max_per_tenant: int,
        max_per_user: int,
        count_tenant: Callable[[str], Awaitable[int]],
        count_user: Callable[[Scope], Awaitable[int]],
    ) -> None:
        self._redis = redis
        self._limits = (max_per_tenant, max_per_user)
        self._count_tenant = count_tenant
        self._count_user = count_user

    @staticmethod
    def keys(scope: Scope) -> tuple[str, str]:
        """The tenant's and the user's counter keys."""
        slot = tag(scope.tenant_id)
        user = hashlib.sha256(scope.user_id.encode()).hexdigest()[:24]
        return f"fdmem:quota:{slot}:tenant", f"fdmem:quota:{slot}:user:{user}"

    async def reserve(self, scope: Scope, count: int) -> None:
        if count <= 0:
            return
        keys = self.keys(scope)
        for _ in range(2):
            with redis_errors():
                verdict, held = await self._redis.eval(_RESERVE, 2, *keys, count, *self._limits)
            if int(verdict) == 0:
                return
            if int(verdict) > 0:
                index = int(verdict) - 1
                subject = ("tenant", "user")[index]
                subject_id = (scope.tenant_id, scope.user_id)[index]
                raise errors.memory_quota_exceeded(
                    subject, subject_id, self._limits[index], int(held), count
                )
            await self._start_counts(scope, keys)
        raise StoreDown("redis")

    async def _start_counts(self, scope: Scope, keys: tuple[str, str]) -> None:
        """Start missing counters from the store; NX keeps a count another replica started."""
        with redis_errors():
            exists = [bool(await self._redis.exists(key)) for key in keys]
        if not exists[0]:
            held = await self._count_tenant(scope.tenant_id)
            with redis_errors():
                await self._redis.set(keys[0], held, nx=True)
        if not exists[1]:
            held = await self._count_user(scope)
            with redis_errors():
                await self._redis.set(keys[1], held, nx=True)

    async def release(self, scope: Scope, count: int) -> None:
        if count <= 0:
            return
        with redis_errors():
            await self._redis.eval(_GIVE_BACK, 2, *self.keys(scope), count)


class RedisLocks:
    """Mutual exclusion across replicas with SET NX PX and a token-checked release."""

    def __init__(self, redis: Redis, *, ttl_ms: int = LOCK_TTL_MS, wait_seconds: float = 10.0):
        self._redis = redis
        self._ttl_ms = ttl_ms
        self._wait = wait_seconds

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        name = "fdmem:lock:" + hashlib.sha256(key.encode()).hexdigest()
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self._wait
        delay = 0.002
        with redis_errors():
            while not await self._redis.set(name, token, nx=True, px=self._ttl_ms):
                if time.monotonic() > deadline:
                    raise StoreDown("redis")
                # Backoff while another replica holds the lock; its holder releases quickly.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self._redis.eval(_RELEASE, 1, name, token)


class IdempotencyRecords:
    """Responses recorded per RPC, tenant, user and request id for 24 hours.

    A retry with the same id and the same request gets the recorded response; a retry that
    arrives while the first call runs waits for it; the same id with another request fails
    with REQUEST_ID_REUSED.
    """

    def __init__(self, redis: Redis, *, ttl_seconds: int = IDEMPOTENCY_TTL_S) -> None:
        self._redis = redis
        self._ttl = ttl_seconds

    @staticmethod
    def key(rpc: str, tenant_id: str, user_id: str, request_id: str) -> str:
        return f"fdmem:idem:{tag(tenant_id, user_id)}:{rpc}:{request_id}"

    @staticmethod
    def user_pattern(tenant_id: str, user_id: str) -> str:
        return f"fdmem:idem:{tag(tenant_id, user_id)}:*"

    async def run(
        self,
        rpc: str,
        tenant_id: str,
        user_id: str,
        request_id: str,
        fingerprint: bytes,
        work: Callable[[], Awaitable[bytes]],
    ) -> tuple[bytes, bool]:
        """Run ``work`` once per request id; return (response bytes, replayed)."""
        key = self.key(rpc, tenant_id, user_id, request_id)
        digest = hashlib.sha256(fingerprint).hexdigest()
        pending = json.dumps({"state": "running", "digest": digest})
        deadline = time.monotonic() + 60.0
        delay = 0.005
        while True:
            with redis_errors():
                claimed = await self._redis.set(key, pending, nx=True, ex=120)
                if claimed:
                    break
                raw = await self._redis.get(key)
            if raw is None:
                continue
            record = json.loads(raw)
            if record["digest"] != digest:
                raise errors.request_id_reused(request_id)
            if record["state"] == "done":
                return bytes.fromhex(record["response"]), True
            if time.monotonic() > deadline:
                raise StoreDown("redis")
            # The first call is still running: wait for its response instead of writing twice.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        try:
            response = await work()
        except BaseException:
            with contextlib.suppress(Exception):
                await self._redis.delete(key)
            raise
        done = json.dumps({"state": "done", "digest": digest, "response": response.hex()})
        with redis_errors():
            await self._redis.set(key, done, ex=self._ttl)
        return response, False

    async def forget_user(self, tenant_id: str, user_id: str) -> int:
        """Delete every record holding the user's requests."""
        deleted = 0
        with redis_errors():
            async for key in self._redis.scan_iter(match=self.user_pattern(tenant_id, user_id)):
                deleted += int(await self._redis.delete(key))
        return deleted
