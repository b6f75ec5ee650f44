"""Circuit breakers kept in Redis, so every router replica sees and moves the same state.

Each transition is one Lua script, so two replicas cannot both take the half-open probe, and
time is Redis's own clock (``TIME``), so replicas with skewed clocks agree on when a circuit
may be probed. The keys of one circuit share a hash tag and live in one cluster slot.

When Redis cannot be reached the breaker fails open: calls go through uncounted and a warning
is logged, because refusing every LLM call while a cache is down would be the larger outage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from foredeck_kit.logs import get_logger
from foredeck_llmrouter.domain.ports import Admission, CircuitSnapshot, CircuitState

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then
  return {'1', '0', '0'}
end
if state == 'open' then
  local next_probe = tonumber(redis.call('HGET', KEYS[1], 'next_probe_at') or '0')
  if now < next_probe then
    return {'0', '0', tostring(next_probe - now)}
  end
  local probe_until = tostring(now + tonumber(ARGV[1]))
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_until', probe_until)
  return {'1', '1', '0'}
end
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if now < probe_until then
  return {'0', '0', tostring(probe_until - now)}
end
redis.call('HSET', KEYS[1], 'probe_until', tostring(now + tonumber(ARGV[1])))
return {'1', '1', '0'}
"""

_FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local reason, probe = ARGV[1], ARGV[2]
local threshold, window, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'last_failure_reason', reason, 'last_failure_at', tostring(now))
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', tostring(now),
    'next_probe_at', tostring(now + cooldown), 'probe_until', '0')
  redis.call('DEL', KEYS[2])
end
if state == 'half_open' then
  if probe == '1' then open() end
  return state
end
if state == 'open' then
  return state
end
redis.call('ZADD', KEYS[2], now, tostring(now) .. ':' .. tostring(redis.call('INCR', KEYS[3])))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tostring(now - window))
redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000) + 1000)
redis.call('PEXPIRE', KEYS[3], math.ceil(window * 1000) + 1000)
if redis.call('ZCARD', KEYS[2]) >= threshold then
  open()
  return 'open'
end
return 'closed'
"""

_SUCCESS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'last_success_at', tostring(now))
if ARGV[1] == '1' and redis.call('HGET', KEYS[1], 'state') == 'half_open' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'probe_until', '0')
  redis.call('DEL', KEYS[2])
end
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') == 'half_open' then
  redis.call('HSET', KEYS[1], 'probe_until', '0')
end
return 1
"""

_SNAPSHOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HGETALL', KEYS[1])
local count = redis.call('ZCOUNT', KEYS[2], tostring(now - tonumber(ARGV[1])), '+inf')
return {h, count, tostring(now)}
"""


_SUCCESS_WRITE_INTERVAL = 1.0


@dataclass(frozen=True)
class CircuitConfig:
    """When a circuit opens and for how long."""

    failure_threshold: int = 5
    failure_window: float = 30.0
    cooldown: float = 15.0
    probe_timeout: float = 60.0
    """A granted probe that reports nothing for this long lets another probe through."""


class RedisCircuitStore:
    """`CircuitStore` on Redis, shared by every replica using the same key prefix."""

    def __init__(
        self, client: aioredis.Redis, config: CircuitConfig, prefix: str = "llmrouter:circuit"
    ) -> None:
        self._redis = client
        self.config = config
        self._prefix = prefix
        self._admit = client.register_script(_ADMIT)
        self._failure = client.register_script(_FAILURE)
        self._success = client.register_script(_SUCCESS)
        self._release = client.register_script(_RELEASE)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._log = get_logger("foredeck.llmrouter.circuits")
        self._success_written: dict[tuple[str, str], float] = {}

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except RedisConnectionError:
            # A connection dropped while another call was cancelled mid-command surfaces here
            # once; the pool then hands out a fresh connection.
            return await script(keys=keys, args=args)

    def _keys(self, provider: str, model: str) -> list[str]:
        base = f"{self._prefix}:{{{provider}/{model}}}"
        return [base, base + ":failures", base + ":seq"]

    async def admit(self, provider: str, model: str) -> Admission:
        """Ask to call; may turn an open circuit half-open and grant its probe."""
        try:
            allowed, probe, wait = await self._run(
                self._admit, self._keys(provider, model)[:1], [self.config.probe_timeout]
            )
        except RedisError as error:
            self._log.warning("circuit store unavailable", error=repr(error))
            return Admission(allowed=True)
        return Admission(
            allowed=_text(allowed) == "1", probe=_text(probe) == "1", retry_after=float(_text(wait))
        )

    async def record_failure(self, provider: str, model: str, reason: str, probe: bool) -> None:
        """Count a failure; may open the circuit (or reopen it after a failed probe)."""
        c = self.config
        try:
            await self._run(
                self._failure,
                self._keys(provider, model),
                [
                    reason,
                    "1" if probe else "0",
                    c.failure_threshold,
                    c.failure_window,
                    c.cooldown,
                ],
            )
        except RedisError as error:
            self._log.warning("circuit store unavailable", error=repr(error))

    async def record_success(self, provider: str, model: str, probe: bool) -> None:
        """Note a success; a successful probe closes the circuit.

        Outside a probe a success changes nothing but the last-success time, so it is written at
        most once a second per circuit and replica: a busy router saves a Redis round trip on
        almost every call.
        """
        now = time.monotonic()
        key = (provider, model)
        if not probe and now - self._success_written.get(key, -1e9) < _SUCCESS_WRITE_INTERVAL:
            return
        self._success_written[key] = now
        try:
            await self._run(self._success, self._keys(provider, model)[:2], ["1" if probe else "0"])
        except RedisError as error:
            self._log.warning("circuit store unavailable", error=repr(error))

    async def release_probe(self, provider: str, model: str) -> None:
        """Give the probe back without a verdict, so the next call may probe."""
        try:
            await self._run(self._release, self._keys(provider, model)[:1], [])
        except RedisError as error:
            self._log.warning("circuit store unavailable", error=repr(error))

    async def snapshot(self, provider: str, model: str) -> CircuitSnapshot:
        """The circuit as stored (CLOSED with no history when Redis cannot be reached)."""
        try:
            flat, count, _now = await self._run(
                self._snapshot, self._keys(provider, model)[:2], [self.config.failure_window]
            )
        except RedisError:
            return CircuitSnapshot(
                provider, model, CircuitState.CLOSED, 0, None, None, "", None, None
            )
        fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        state = CircuitState(fields.get("state", "closed"))

        def at(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value else None

        return CircuitSnapshot(
            provider=provider,
            model=model,
            state=state,
            recent_failures=int(count) if state is CircuitState.CLOSED else 0,
            opened_at=at("opened_at"),
            next_probe_at=at("next_probe_at") if state is CircuitState.OPEN else None,
            last_failure_reason=fields.get("last_failure_reason", ""),
            last_failure_at=at("last_failure_at"),
            last_success_at=at("last_success_at"),
        )

    async def ping(self) -> bool:
        """Whether Redis answers."""
        return bool(await self._redis.ping())


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
