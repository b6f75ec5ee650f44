"""The tool registry in Redis, shared by every replica; writes are atomic Lua scripts.

Every key carries one hash tag, so the whole registry lives in one Redis Cluster slot and a
batch (an MCP import) stays atomic:

- ``<p>:{registry}:current`` hash: name -> the current version's serialized ``Tool``
- ``<p>:{registry}:last`` hash: name -> the last version ever used (kept after removal, so a
  version number never names two different tools)
- ``<p>:{registry}:names`` sorted set of current names (all score 0, for lexical paging)
- ``<p>:{registry}:v:<name>:<version>`` the serialized ``Tool`` of every live version
- ``<p>:{registry}:req:<rpc>:<tenant>:<user>:<request id>`` hash of fingerprint and response
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from redis.asyncio import Redis
from redis.exceptions import RedisError

from foredeck.toolrunner.v1 import tool_pb2
from foredeck_toolrunner.domain.errors import ToolRunnerError
from foredeck_toolrunner.domain.ports import RegistryOp, RegistryRace

__all__ = ["RedisRegistryStore"]

# ARGV: version key base, request-key flag, fingerprint, response, ttl ms, op count, then per op
# kind, name, expected_current, expected_last, new version, tool bytes.
_APPLY = """
local cur, last, names, req = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local vbase, has_req, fp, resp, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local n = tonumber(ARGV[6])
if has_req == '1' then
  local rec = redis.call('HMGET', req, 'f', 'r')
  if rec[1] then
    if rec[1] == fp then return {'RECORDED', rec[2]} end
    return {'REUSED'}
  end
end
local function current_version(name)
  local body = redis.call('HGET', cur, name)
  if not body then return 0 end
  return tonumber(redis.call('HGET', last, name) or '0')
end
for i = 0, n - 1 do
  local b = 7 + i * 6
  local kind, name = ARGV[b], ARGV[b + 1]
  local ec, el = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local cv = current_version(name)
  if kind == 'create' then
    if cv ~= 0 then return {'EXISTS', name, tostring(cv)} end
    if tonumber(redis.call('HGET', last, name) or '0') ~= el then return {'RACE'} end
  else
    if cv == 0 then return {'NOTFOUND', name} end
    if cv ~= ec then return {'CONFLICT', name, tostring(ec), tostring(cv)} end
  end
end
for i = 0, n - 1 do
  local b = 7 + i * 6
  local kind, name, nv, body = ARGV[b], ARGV[b + 1], ARGV[b + 4], ARGV[b + 5]
  if kind == 'delete' then
    local lv = tonumber(redis.call('HGET', last, name) or '0')
    for v = 1, lv do redis.call('DEL', vbase .. name .. ':' .. v) end
    redis.call('HDEL', cur, name)
    redis.call('ZREM', names, name)
  else
    redis.call('HSET', cur, name, body)
    redis.call('HSET', last, name, nv)
    redis.call('SET', vbase .. name .. ':' .. nv, body)
    redis.call('ZADD', names, 0, name)
  end
end
if has_req == '1' then
  redis.call('HSET', req, 'f', fp, 'r', resp)
  redis.call('PEXPIRE', req, ttl)
end
return {'OK', resp}
"""


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisRegistryStore:
    """The registry's storage in Redis (see the module docstring for the key layout)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        base = f"{prefix}:{{registry}}"
        self._current = f"{base}:current"
        self._last = f"{base}:last"
        self._names = f"{base}:names"
        self._versions = f"{base}:v:"
        self._requests = f"{base}:req:"
        self._apply = redis.register_script(_APPLY)

    async def get(self, name: str, version: int = 0) -> tuple[tool_pb2.Tool | None, int]:
        """The tool at ``version`` (0: current) or None, and the current version (0: none)."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._current, name)
                pipe.hget(self._last, name)
                if version:
                    pipe.get(f"{self._versions}{name}:{version}")
                results = await pipe.execute()
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        body, last = results[0], results[1]
        if body is None:
            return None, 0
        current = int(last or 0)
        if version and version != current:
            raw = results[2]
            return (tool_pb2.Tool.FromString(bytes(raw)) if raw is not None else None), current
        return tool_pb2.Tool.FromString(bytes(body)), current

    async def last_version(self, name: str) -> int:
        """The last version ever used for ``name``."""
        try:
            value = await self._redis.hget(self._last, name)
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        return int(value or 0)

    async def list_current(self, prefix: str, after: str, limit: int) -> list[tool_pb2.Tool]:
        """Current versions of tools named ``prefix…`` after ``after``, by name."""
        low = f"({after}" if after and after >= prefix else f"[{prefix}"
        high = f"[{prefix}\xff" if prefix else "+"
        try:
            names = await self._redis.zrangebylex(self._names, low, high, start=0, num=limit)
            if not names:
                return []
            bodies = await self._redis.hmget(self._current, names)
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        return [tool_pb2.Tool.FromString(_raw(body)) for body in bodies if body is not None]

    async def recorded(self, request_key: str, fingerprint: str) -> bytes | None:
        """The response recorded for a request key; REQUEST_ID_REUSED on another request."""
        try:
            fp, response = await self._redis.hmget(self._requests + request_key, ["f", "r"])
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        if fp is None:
            return None
        if _text(fp) != fingerprint:
            raise ToolRunnerError.request_id_reused(request_key.rsplit("|", 1)[-1])
        return _raw(response or b"")

    async def apply(
        self,
        ops: Sequence[RegistryOp],
        *,
        request_key: str,
        fingerprint: str,
        response: bytes,
        ttl: timedelta,
    ) -> bytes:
        """Apply every op or none, remembering the response under the request key."""
        args: list[str | bytes | int] = [
            self._versions,
            "1" if request_key else "0",
            fingerprint,
            response,
            int(ttl.total_seconds() * 1000),
            len(ops),
        ]
        for op in ops:
            args += [
                op.kind,
                op.name,
                op.expected_current,
                op.expected_last,
                op.tool.version if op.tool is not None else 0,
                op.tool.SerializeToString() if op.tool is not None else b"",
            ]
        keys = [self._current, self._last, self._names, self._requests + (request_key or "-")]
        try:
            result = await self._apply(keys=keys, args=args)
        except RedisError:
            raise ToolRunnerError.store_unavailable() from None
        status = _text(result[0])
        if status in ("OK", "RECORDED"):
            return _raw(result[1])
        if status == "REUSED":
            raise ToolRunnerError.request_id_reused(request_key.rsplit("|", 1)[-1])
        if status == "EXISTS":
            raise ToolRunnerError.tool_already_exists(_text(result[1]), int(result[2]))
        if status == "NOTFOUND":
            raise ToolRunnerError.tool_not_found(_text(result[1]))
        if status == "CONFLICT":
            raise ToolRunnerError.etag_mismatch(_text(result[1]), "", int(result[3]))
        raise RegistryRace()
