"""The Lua scripts that make the orchestrator's Redis writes atomic.

Each script touches the keys of one Redis Cluster slot only (one run's keys, or the
concurrency slots). Every write a worker makes for a run it holds passes the run's fencing
token, and the script writes only while that token is still the run's current one: a worker
whose lease was taken over (paused, partitioned, slow) writes nothing, whatever it believes.

Run statuses are the numbers of ``foredeck.common.v1.RunStatus``: 1 queued, 2 running,
4 succeeded, 5 failed, 6 cancelled, 7 dead-lettered. Times come from the Redis server's
clock (``TIME``), so workers' clocks never decide a lease.
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE_SLOT",
    "APPEND_JOURNAL",
    "CANCEL",
    "CLAIM",
    "CREATE_AGENT",
    "CREATE_AGENT_VERSION",
    "DELETE_AGENT",
    "FINISH",
    "HEARTBEAT",
    "PUBLISH_EVENT",
    "RELEASE",
    "RELEASE_SLOT",
    "RENEW_SLOT",
    "SUBMIT",
]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_FENCE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
"""

# Append one event to the run's stream: sequence from the record, time from the server. The
# stream keeps the newest `maxlen` events, trimmed a batch at a time (a hundredth of `maxlen`);
# the newest id cut is kept on the record as `trimmed_through`, so a reader resuming after it
# knows that nothing it has not seen was lost (Redis itself does not record trimmed ids).
_EVENT = """
local function add_event(events_key, run_key, payload, maxlen, now)
  local seq = redis.call('HINCRBY', run_key, 'seq', 1)
  local id = redis.call('XADD', events_key, '*', 'e', payload, 's', seq, 't', now)
  redis.call('HSET', run_key, 'last_event', id)
  local keep = tonumber(maxlen)
  local excess = redis.call('XLEN', events_key) - keep
  if excess >= math.max(1, math.floor(keep / 100)) then
    local cut = redis.call('XRANGE', events_key, '-', '+', 'COUNT', excess + 1)
    redis.call('XTRIM', events_key, 'MINID', cut[#cut][1])
    redis.call('HSET', run_key, 'trimmed_through', cut[#cut - 1][1])
  end
  return id
end
"""

SUBMIT = (
    _NOW
    + _EVENT
    + """
-- KEYS: run, events. ARGV: request digest, spec, claims, trace, queued event, maxlen,
-- priority, user key, then any extra field/value pairs (a fork's source and prefix length).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'digest')}
end
redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'spec', ARGV[2], 'claims', ARGV[3],
  'trace', ARGV[4], 'status', 1, 'token', 0, 'owner', '', 'lease', 0, 'deliveries', 0,
  'in', 0, 'out', 0, 'cost', 0, 'steps', 0, 'seq', 0, 'enq', 0, 'created', now,
  'priority', ARGV[7], 'user', ARGV[8])
for i = 9, #ARGV - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
add_event(KEYS[2], KEYS[1], ARGV[5], ARGV[6], now)
return {1, ARGV[1]}
"""
)

CLAIM = (
    _NOW
    + _EVENT
    + """
-- KEYS: run, events, journal. ARGV: worker, lease ms, max deliveries, running event,
-- dead-letter status event, dead-letter finished event, dead-letter error, maxlen, ttl s.
local st = tonumber(redis.call('HGET', KEYS[1], 'status'))
if not st then return {'missing'} end
if st >= 4 then return {'done', st} end
local owner = redis.call('HGET', KEYS[1], 'owner')
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease') or '0')
if owner ~= '' and owner ~= ARGV[1] and lease > now then return {'held', owner} end
local d = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
if d > tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[1], 'token', 1)
  redis.call('HSET', KEYS[1], 'status', 7, 'owner', '', 'lease', 0, 'end', now,
    'error', ARGV[7])
  add_event(KEYS[2], KEYS[1], ARGV[5], ARGV[8], now)
  add_event(KEYS[2], KEYS[1], ARGV[6], ARGV[8], now)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[9]) end
  return {'dead', d}
end
local tok = redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease', now + tonumber(ARGV[2]))
if st == 1 then
  redis.call('HSET', KEYS[1], 'status', 2)
  -- A run resumed after an approval keeps the time it first started.
  if tonumber(redis.call('HGET', KEYS[1], 'start') or '0') == 0 then
    redis.call('HSET', KEYS[1], 'start', now)
  end
  add_event(KEYS[2], KEYS[1], ARGV[4], ARGV[8], now)
end
return {'ok', tok, d, redis.call('HGET', KEYS[1], 'start')}
"""
)

HEARTBEAT = (
    _NOW
    + """
-- KEYS: run. ARGV: token, lease ms.
"""
    + _FENCE
    + """
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
return 1
"""
)

RELEASE = (
    """
-- KEYS: run. ARGV: token, refund (1: this delivery does not count towards the cap).
"""
    + _FENCE
    + """
redis.call('HSET', KEYS[1], 'owner', '', 'lease', 0)
if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], 'deliveries', -1) end
return 1
"""
)

APPEND_JOURNAL = (
    """
-- KEYS: run, journal. ARGV: token, entry index, entry, input tokens, output tokens,
-- cost, step index.
"""
    + _FENCE
    + """
if redis.call('LLEN', KEYS[2]) + 1 ~= tonumber(ARGV[2]) then return -2 end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'in', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'out', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'cost', ARGV[6])
if tonumber(ARGV[7]) > tonumber(redis.call('HGET', KEYS[1], 'steps') or '0') then
  redis.call('HSET', KEYS[1], 'steps', ARGV[7])
end
return 1
"""
)

PUBLISH_EVENT = (
    _NOW
    + _EVENT
    + """
-- KEYS: run, events. ARGV: token, event, maxlen.
"""
    + _FENCE
    + """
return add_event(KEYS[2], KEYS[1], ARGV[2], ARGV[3], now)
"""
)

FINISH = (
    _NOW
    + _EVENT
    + """
-- KEYS: run, events, journal. ARGV: token, status, output, error, status event,
-- finished event, maxlen, ttl s.
"""
    + _FENCE
    + """
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'output', ARGV[3], 'error', ARGV[4],
  'owner', '', 'lease', 0, 'end', now)
add_event(KEYS[2], KEYS[1], ARGV[5], ARGV[7], now)
add_event(KEYS[2], KEYS[1], ARGV[6], ARGV[7], now)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
return 1
"""
)

CANCEL = (
    _NOW
    + _EVENT
    + """
-- KEYS: run, events, journal. ARGV: expected status, error, status event, finished event,
-- maxlen, ttl s.
local st = tonumber(redis.call('HGET', KEYS[1], 'status'))
if not st then return {'missing'} end
if st == 6 then return {'cancelled'} end
if st >= 4 then return {'finished', st} end
if st ~= tonumber(ARGV[1]) then return {'changed', st} end
-- Moving the token fences out the worker holding the run: it can write nothing more.
redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'status', 6, 'error', ARGV[2], 'owner', '', 'lease', 0,
  'end', now)
add_event(KEYS[2], KEYS[1], ARGV[3], ARGV[5], now)
add_event(KEYS[2], KEYS[1], ARGV[4], ARGV[5], now)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
return {'ok'}
"""
)

ACQUIRE_SLOT = (
    _NOW
    + """
-- KEYS: global slots, user slots. ARGV: member, lease ms, global limit, user limit.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local expiry = now + tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[1], expiry, ARGV[1])
  redis.call('ZADD', KEYS[2], expiry, ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
)

RENEW_SLOT = (
    _NOW
    + """
-- KEYS: global slots, user slots. ARGV: member, lease ms.
local expiry = now + tonumber(ARGV[2])
local a = redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[1])
local b = redis.call('ZADD', KEYS[2], 'XX', 'CH', expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return a + b
"""
)

RELEASE_SLOT = """
-- KEYS: global slots, user slots. ARGV: member.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

CREATE_AGENT = (
    _NOW
    + """
-- KEYS: agent, requests. ARGV: request id, digest, version 1 bytes, ttl s.
local seen = redis.call('HGET', KEYS[2], ARGV[1])
if seen then
  if seen ~= ARGV[2] then return {'reused'} end
  return {'again', redis.call('HGET', KEYS[1], 'v1')}
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], 'latest', 1, 'state', 1, 'v1', ARGV[3], 'created', now)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {'created', ARGV[3]}
"""
)

CREATE_AGENT_VERSION = """
-- KEYS: agent, requests. ARGV: request id, digest, expected latest, new bytes, ttl s.
local seen = redis.call('HGET', KEYS[2], ARGV[1])
if seen then
  local sep = string.find(seen, '|', 1, true)
  if string.sub(seen, 1, sep - 1) ~= ARGV[2] then return {'reused'} end
  return {'again', redis.call('HGET', KEYS[1], 'v' .. string.sub(seen, sep + 1))}
end
local latest = redis.call('HGET', KEYS[1], 'latest')
if not latest then return {'missing'} end
if redis.call('HGET', KEYS[1], 'state') == '2' then return {'archived'} end
if latest ~= ARGV[3] then return {'moved', latest} end
local v = tonumber(latest) + 1
redis.call('HSET', KEYS[1], 'latest', v, 'v' .. v, ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. v)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {'created', ARGV[4]}
"""

DELETE_AGENT = (
    _NOW
    + """
-- KEYS: agent.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= '2' then
  redis.call('HSET', KEYS[1], 'state', 2, 'archived', now)
end
return 1
"""
)
