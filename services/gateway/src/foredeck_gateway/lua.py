"""The gateway's Redis scripts. Each runs atomically, so limits hold across every replica.

Key layout under the prefix ``P``: ``P:key:<id>`` (a key's record), ``P:kh:<sha256>`` (hash ->
id), ``P:keys`` and ``P:keys:t:<tenant>`` (ids by creation time), ``P:rl:{k,u,t}:…`` (request
windows), ``P:act:<tenant>:<user>`` (a user's unfinished reservations), ``P:b:<tenant>:<id>``
(a budget), ``P:budgets`` (every budget, by tenant and id), ``P:res:<id>`` (a reservation),
``P:leases`` (reservations by the time their run is next checked), ``P:req:<tenant>:<id>``
(CreateRun request ids).

The scripts derive keys from what they read (a key's tenant and user), so they need one Redis
primary rather than a cluster.
"""

from __future__ import annotations

__all__ = ["ADMIT", "CLAIM_DUE", "RECORD_RUN", "SETTLE", "SET_BUDGET"]

# One round trip admits a call: the API key's lookup (unless the caller came with a JWT), its
# state and expiry, the RPC's permission, the request windows of key, user and tenant, and for
# a run the request id, the user's concurrency cap and the reservation against every budget.
# Request windows are exact sliding windows: the last `limit` admission times of a subject, in
# a list capped at `limit`; a call is admitted when fewer than `limit` fall within 60 s.
ADMIT = r"""
-- The arguments and the reply travel as one string each, fields separated by \31: a client
-- spends far more encoding and parsing two dozen values than Redis spends splitting one.
local ARGV = (function(packed)
  local out = {}
  for value in string.gmatch(packed .. '\31', '([^\31]*)\31') do table.insert(out, value) end
  return out
end)(ARGV[1])
local function reply(list) return table.concat(list, '\31') end
-- Numbers go to Redis and back as integer strings: tostring() would write 1e+15.
local function n(x) return string.format('%.0f', tonumber(x) or 0) end
local P = ARGV[1]
local op = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local tenant, user, kind, perms, keyid = ARGV[5], ARGV[6], ARGV[24], ARGV[25], ''
local klim, ulim, tlim, conc = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]),
  tonumber(ARGV[10])
local rb = {'0', '0', '0', '0', '0', '0'}

local function has(list, wanted)
  for granted in string.gmatch(list, '%S+') do
    if granted == wanted or granted == '*' then return true end
    if string.sub(granted, -2) == ':*' and
       string.sub(wanted, 1, #granted - 1) == string.sub(granted, 1, #granted - 1) then
      return true
    end
  end
  return false
end

if ARGV[3] ~= '' then
  keyid = redis.call('GET', P .. ':kh:' .. ARGV[3])
  if not keyid then return reply({'invalid'}) end
  local kk = P .. ':key:' .. keyid
  local r = redis.call('HMGET', kk, 'tenant', 'user', 'kind', 'perms', 'klim', 'ulim', 'tlim',
    'conc', 'rb_steps', 'rb_tokens', 'rb_cost', 'rb_wall_ms', 'rb_depth', 'rb_subs', 'state',
    'expire_ms', 'last_use_ms')
  if not r[1] then return reply({'invalid'}) end
  if r[15] == 'revoked' then return reply({'revoked', keyid}) end
  local expires = tonumber(r[16] or '0') or 0
  if expires > 0 and expires <= now then return reply({'expired', keyid}) end
  tenant, user, kind, perms = r[1], r[2], r[3], r[4] or ''
  if tonumber(r[5]) > 0 then klim = tonumber(r[5]) end
  if tonumber(r[6]) > 0 then ulim = tonumber(r[6]) end
  if tonumber(r[7]) > 0 then tlim = tonumber(r[7]) end
  if tonumber(r[8]) > 0 then conc = tonumber(r[8]) end
  rb = {r[9], r[10], r[11], r[12], r[13], r[14]}
  local minute = now - now % 60000
  if tonumber(r[17] or '0') ~= minute then redis.call('HSET', kk, 'last_use_ms', n(minute)) end
  if ARGV[4] == '!admin' then
    if kind ~= 'admin' then return reply({'admin'}) end
  elseif ARGV[4] ~= '' and not has(perms, ARGV[4]) then
    return reply({'perm', ARGV[4]})
  end
end

local budget_ids = {}
local candidates = {'tenant', 'user:' .. user}
if keyid ~= '' then table.insert(candidates, 1, 'key:' .. keyid) end
-- A run reads every budget in full below; a call only needs to know which exist.
if op ~= 'run' then
  for _, id in ipairs(candidates) do
    if redis.call('EXISTS', P .. ':b:' .. tenant .. ':' .. id) == 1 then
      table.insert(budget_ids, id)
    end
  end
end

local function ok(tokens, cost, state, resid)
  return reply({'ok', tenant, user, kind, perms, keyid, n(klim), n(ulim), n(tlim), n(conc),
    rb[1], rb[2], rb[3], rb[4], rb[5], rb[6], table.concat(budget_ids, ' '), n(tokens), n(cost),
    state, resid})
end

if op == 'auth' then return ok(0, 0, '', '') end

local windows = {}
if keyid ~= '' then
  table.insert(windows, {P .. ':rl:k:' .. keyid, klim, 'key', 'key:' .. keyid})
end
table.insert(windows, {P .. ':rl:u:' .. tenant .. ':' .. user, ulim, 'user', 'user:' .. user})
table.insert(windows, {P .. ':rl:t:' .. tenant, tlim, 'tenant', 'tenant'})
-- The limit-th newest admission of a full window decides; a shorter list has no such entry.
for _, w in ipairs(windows) do
  local oldest = redis.call('LINDEX', w[1], w[2] - 1)
  if oldest and tonumber(oldest) > now - 60000 then
    return reply({'rate', w[3], w[4], n(w[2]), n(tonumber(oldest) + 60000 - now)})
  end
end
for _, w in ipairs(windows) do
  if redis.call('LPUSH', w[1], n(now)) > w[2] then redis.call('LTRIM', w[1], 0, w[2] - 1) end
  redis.call('PEXPIRE', w[1], 61000)
end

if op ~= 'run' then return ok(0, 0, '', '') end

local resid = ARGV[11]
local reqkey = P .. ':req:' .. tenant .. ':' .. ARGV[12]
local seen = redis.call('GET', reqkey)
if seen then
  local sep = string.find(seen, ' ', 1, true)
  local earlier, fingerprint = string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)
  if fingerprint ~= ARGV[13] then return reply({'reused'}) end
  local held = redis.call('HMGET', P .. ':res:' .. earlier, 'tokens', 'cost')
  for _, id in ipairs(candidates) do
    if redis.call('EXISTS', P .. ':b:' .. tenant .. ':' .. id) == 1 then
      table.insert(budget_ids, id)
    end
  end
  return ok(held[1] or '0', held[2] or '0', 'existing', earlier)
end

local active = P .. ':act:' .. tenant .. ':' .. user
if redis.call('SCARD', active) >= conc then
  return reply({'conc', 'user:' .. user, n(conc)})
end

local function cap(a, b)
  a, b = tonumber(a), tonumber(b)
  if a > 0 and b > 0 then return math.min(a, b) end
  return math.max(a, b)
end
local tokens = cap(ARGV[14], rb[2])
local cost = cap(ARGV[15], rb[3])

local budgets = {}
local limits_tokens, limits_cost = false, false
for _, id in ipairs(candidates) do
  local bk = P .. ':b:' .. tenant .. ':' .. id
  local b = redis.call('HMGET', bk, 'tlim', 'clim', 'period', 'pstart', 'spent_t', 'spent_c',
    'res_t', 'res_c', 'rcount')
  if b[1] then
    table.insert(budget_ids, id)
    local period = b[3] or 'lifetime'
    local current, ends = 0, -1
    if period == 'daily' then current, ends = tonumber(ARGV[19]), tonumber(ARGV[21])
    elseif period == 'monthly' then current, ends = tonumber(ARGV[20]), tonumber(ARGV[22]) end
    local spent_t, spent_c = tonumber(b[5] or '0'), tonumber(b[6] or '0')
    local rolled = tonumber(b[4] or '0') ~= current
    if rolled then spent_t, spent_c = 0, 0 end
    local entry = {id = id, key = bk, tlim = tonumber(b[1]), clim = tonumber(b[2] or '0'),
      spent_t = spent_t, spent_c = spent_c, res_t = tonumber(b[7] or '0'),
      res_c = tonumber(b[8] or '0'), rcount = tonumber(b[9] or '0'), rolled = rolled,
      current = current, ends = ends}
    if entry.tlim > 0 then limits_tokens = true end
    if entry.clim > 0 then limits_cost = true end
    table.insert(budgets, entry)
  end
end
if tokens == 0 and limits_tokens then tokens = tonumber(ARGV[16]) end
if cost == 0 and limits_cost then cost = tonumber(ARGV[17]) end

for _, b in ipairs(budgets) do
  local retry = '-1'
  if b.ends > 0 then retry = n(b.ends - now) end
  if b.tlim > 0 and b.spent_t + b.res_t + tokens > b.tlim then
    return reply({'budget', b.id, 'tokens', n(b.tlim - b.spent_t - b.res_t), retry})
  end
  if b.clim > 0 and b.spent_c + b.res_c + cost > b.clim then
    return reply({'budget', b.id, 'cost', n(b.clim - b.spent_c - b.res_c), retry})
  end
end

for _, b in ipairs(budgets) do
  -- Absolute values: every amount was read above, inside this same atomic script.
  if b.rolled then
    redis.call('HSET', b.key, 'spent_t', 0, 'spent_c', 0, 'pstart', n(b.current),
      'res_t', n(b.res_t + tokens), 'res_c', n(b.res_c + cost), 'rcount', n(b.rcount + 1))
  else
    redis.call('HSET', b.key, 'res_t', n(b.res_t + tokens), 'res_c', n(b.res_c + cost),
      'rcount', n(b.rcount + 1))
  end
end
redis.call('SADD', active, resid)
redis.call('HSET', P .. ':res:' .. resid, 'tenant', tenant, 'user', user,
  'budgets', table.concat(budget_ids, ' '), 'tokens', n(tokens), 'cost', n(cost),
  'created_ms', n(now),
  'request_id', ARGV[12], 'perms', perms, 'kind', kind)
redis.call('ZADD', P .. ':leases', n(now + tonumber(ARGV[18])), resid)
redis.call('SET', reqkey, resid .. ' ' .. ARGV[13], 'EX', tonumber(ARGV[23]))
return ok(tokens, cost, 'new', resid)
"""

# Ends a reservation: with ARGV[3] = 'settle' the run's real usage is charged to every budget
# the reservation was made against; with 'release' nothing is charged. Either way the reserved
# amounts, the concurrency slot and the lease go. Idempotent: a reservation already ended is
# not found and nothing changes.
SETTLE = r"""
local P, resid, mode = ARGV[1], ARGV[2], ARGV[3]
local used_t, used_c = ARGV[4], ARGV[5]
local rk = P .. ':res:' .. resid
local r = redis.call('HMGET', rk, 'tenant', 'user', 'budgets', 'tokens', 'cost')
if not r[1] then return 0 end
for id in string.gmatch(r[3] or '', '%S+') do
  local bk = P .. ':b:' .. r[1] .. ':' .. id
  if redis.call('EXISTS', bk) == 1 then
    redis.call('HINCRBY', bk, 'res_t', string.format('%.0f', 0 - tonumber(r[4])))
    redis.call('HINCRBY', bk, 'res_c', string.format('%.0f', 0 - tonumber(r[5])))
    redis.call('HINCRBY', bk, 'rcount', -1)
    if mode == 'settle' then
      redis.call('HINCRBY', bk, 'spent_t', used_t)
      redis.call('HINCRBY', bk, 'spent_c', used_c)
    end
  end
end
redis.call('SREM', P .. ':act:' .. r[1] .. ':' .. r[2], resid)
redis.call('ZREM', P .. ':leases', resid)
redis.call('DEL', rk)
return 1
"""

# Records the run a reservation is for, once the orchestrator accepted it, and pushes the next
# check of the run out by ARGV[4] ms.
RECORD_RUN = r"""
local rk = ARGV[1] .. ':res:' .. ARGV[2]
if redis.call('EXISTS', rk) == 0 then return 0 end
redis.call('HSET', rk, 'run_id', ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', ARGV[1] .. ':leases', now + tonumber(ARGV[4]), ARGV[2])
return 1
"""

# Takes up to ARGV[2] reservations whose check is due and pushes each one's next check out by
# ARGV[3] ms, so one replica looks at a run at a time; returns each with its record.
CLAIM_DUE = r"""
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, resid in ipairs(due) do
  redis.call('ZADD', P .. ':leases', now + tonumber(ARGV[3]), resid)
  local r = redis.call('HMGET', P .. ':res:' .. resid, 'tenant', 'user', 'run_id', 'created_ms',
    'perms', 'kind', 'budgets')
  table.insert(out, {resid, r[1] or '', r[2] or '', r[3] or '', r[4] or '0', r[5] or '',
    r[6] or '', r[7] or '', tostring(now)})
end
return out
"""

# Writes a budget's limits and period (fields named in ARGV[5]) after an optional etag check.
SET_BUDGET = r"""
local bk, etag, newtag, now = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local exists = redis.call('EXISTS', bk) == 1
if etag ~= '' then
  if not exists or redis.call('HGET', bk, 'etag') ~= etag then return {'etag'} end
end
if not exists then
  redis.call('HSET', bk, 'tlim', 0, 'clim', 0, 'period', 'lifetime', 'pstart', 0, 'spent_t', 0,
    'spent_c', 0, 'res_t', 0, 'res_c', 0, 'rcount', 0)
  redis.call('ZADD', ARGV[4], 0, ARGV[9])
end
local names = ARGV[5]
if string.find(names, 't', 1, true) then redis.call('HSET', bk, 'tlim', ARGV[6]) end
if string.find(names, 'c', 1, true) then redis.call('HSET', bk, 'clim', ARGV[7]) end
if string.find(names, 'p', 1, true) then
  if redis.call('HGET', bk, 'period') ~= ARGV[8] then
    redis.call('HSET', bk, 'period', ARGV[8], 'pstart', ARGV[10], 'spent_t', 0, 'spent_c', 0)
  end
end
redis.call('HSET', bk, 'etag', newtag, 'update_ms', now, 'updated_by', ARGV[11], 'scope',
  ARGV[12], 'tenant', ARGV[13], 'user', ARGV[14], 'key', ARGV[15])
return {'ok'}
"""

# Writes a key (ARGV[6..]: its record's fields and values), its hash index and its listing
# entries, unless a key with that id exists; returns 1 when it wrote.
CREATE_KEY = r"""
local P, id, hash, tenant, created = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local kk = P .. ':key:' .. id
if redis.call('EXISTS', kk) == 1 then return 0 end
redis.call('HSET', kk, unpack(ARGV, 6))
redis.call('SET', P .. ':kh:' .. hash, id)
redis.call('ZADD', P .. ':keys', created, id)
redis.call('ZADD', P .. ':keys:t:' .. tenant, created, id)
return 1
"""
