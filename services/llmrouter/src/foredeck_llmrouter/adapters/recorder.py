"""Generate answers recorded by request id, so a repeated call is answered, not re-billed.

One Redis hash per tenant, user and request id holds the request's digest, a state (``pending``
while the first call runs, ``done`` once it answered) and the serialized response. Claiming is one
Lua script, so of two concurrent callers exactly one generates and the other waits for its answer.
A pending claim expires on its own if its holder dies; a done record lives for the retention
window. Failed calls release their claim and record nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import redis.asyncio as aioredis

_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'digest', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed', ARGV[1], ''}
end
local digest = redis.call('HGET', KEYS[1], 'digest')
return {state, digest, redis.call('HGET', KEYS[1], 'payload') or ''}
"""

_FINISH = """
if redis.call('HGET', KEYS[1], 'digest') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', 'payload', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

_RELEASE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'pending' and redis.call('HGET', KEYS[1], 'digest') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"""


class ClaimState(enum.Enum):
    """What a claim on a request id found."""

    CLAIMED = "claimed"
    """Nobody had it: the caller generates and records."""
    PENDING = "pending"
    """Another call with this id is generating."""
    DONE = "done"
    """A response is recorded."""


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim."""

    state: ClaimState
    digest: str
    payload: bytes


class RedisResponseRecorder:
    """Request-id records in Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        retention_seconds: float = 24 * 3600,
        pending_seconds: float = 600,
        prefix: str = "llmrouter:generate",
    ) -> None:
        self._retention_ms = int(retention_seconds * 1000)
        self._pending_ms = int(pending_seconds * 1000)
        self._prefix = prefix
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    def _key(self, tenant_id: str, user_id: str, request_id: str) -> str:
        return f"{self._prefix}:{{{tenant_id}}}:{user_id}:{request_id}"

    async def claim(self, tenant_id: str, user_id: str, request_id: str, digest: str) -> Claim:
        """Claim the id for a request with ``digest``, or report who has it."""
        state, stored, payload = await self._claim(
            keys=[self._key(tenant_id, user_id, request_id)], args=[digest, self._pending_ms]
        )
        return Claim(ClaimState(_text(state)), _text(stored), bytes(payload or b""))

    async def finish(
        self, tenant_id: str, user_id: str, request_id: str, digest: str, payload: bytes
    ) -> None:
        """Record the response of a claimed id for the retention window."""
        await self._finish(
            keys=[self._key(tenant_id, user_id, request_id)],
            args=[digest, payload, self._retention_ms],
        )

    async def release(self, tenant_id: str, user_id: str, request_id: str, digest: str) -> None:
        """Give up a claim without recording anything (the call failed)."""
        await self._release(keys=[self._key(tenant_id, user_id, request_id)], args=[digest])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
