-- _lib.lua: shared functions, prepended to every group script when it is loaded.
--
-- Not a script of its own: it has no KEYS/ARGV/reply header. Every group
-- script receives the same five keys (see ratequota/keys.py):
--   KEYS[1] policy  hash  C, reserve, unknown, default, ttl, schema, version, fence, t:<tenant>,
--                         busy (latest lease expiry ever granted, ms), recover (end of the
--                         recovery window, ms); no expiry, so it outlives lost state
--   KEYS[2] demand  hash  u:<tenant> units held, p:<tenant> units waiting, s: sentinel (0)
--   KEYS[3] exp     zset  L<lease id> / P<request id> -> expiry, ms of Redis time;
--                         s: sentinel (score SENTINEL_SCORE, never purged)
--   KEYS[4] info    hash  L<id> -> "units:token:tenant", P<id> -> "units:seq:tenant", s: sentinel
--   KEYS[5] queue   zset  waiting requests in arrival order per tenant (all scores 0,
--                         members "<len>:<tenant>|<seq, 16 digits>|<units>|<id>", read by lex range)
-- The fairness rule below mirrors ratequota/fairness.py step for step.
--
-- Integers (units, tokens, ms) always go to Redis and into strings through int(), never
-- through Lua's number-to-string conversion: Redis's Lua prints 10^14 as "1e+14", which no
-- reader parses back. Units and capacity are bounded by 2^50 (ratequota.policy.MAX_UNITS), so
-- every sum the scripts form stays an exact double.
--
-- State loss (docs/design.md, "Recovery"): demand, exp and info each hold a sentinel member
-- "s:" while the group is in use, so none of them is ever empty; a key that is missing while
-- another exists, or all three missing while the policy's busy (the latest expiry ever
-- granted) is still ahead, means Redis lost the group's state with leases possibly live. The
-- group then recovers until that expiry: renewals re-assert their leases, new work is refused.

local EPSILON = 1e-9
local KEY_GRACE_MS = 120000
local NEXT_IN_LINE_RETRY_MS = 20
local QUEUE_PACED = 8
-- Score of the exp sentinel: above any expiry, so purges never reach it (2^53 - 1).
local SENTINEL_SCORE = '9007199254740991'

-- An integer as exact decimal text (never "1e+14").
local function int(x)
  return string.format('%d', x)
end

-- Redis time in ms, unless the caller pins the clock (tests and simulations).
local function now_ms(pinned)
  if pinned ~= nil and pinned ~= '' then
    return tonumber(pinned)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Tenant spec "G|lendable|B|weight|max_units"; B and max_units may be empty.
local function parse_spec(spec)
  local g, l, b, w, m = string.match(spec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  local guarantee = tonumber(g)
  local ceiling = math.huge
  if b ~= '' then ceiling = guarantee + tonumber(b) end
  local max_units = math.huge
  if m ~= '' then max_units = tonumber(m) end
  return {g = guarantee, l = tonumber(l), ceil = ceiling, w = tonumber(w), max = max_units}
end

-- A waiting request's place in its tenant's queue; the length prefix makes the
-- tenant part unambiguous whatever characters the name holds.
local function queue_member(tenant, seq, units, id)
  return string.len(tenant) .. ':' .. tenant .. '|' .. string.format('%016d', tonumber(seq)) ..
    '|' .. int(tonumber(units)) .. '|' .. id
end

-- The tenant's `n` oldest waiting requests, oldest first, as {units, id} pairs.
local function queue_front(tenant, n)
  local prefix = string.len(tenant) .. ':' .. tenant
  -- '|' < '}' in ASCII: this range holds exactly the members starting with prefix .. '|'.
  local members = redis.call('ZRANGEBYLEX', KEYS[5], '[' .. prefix .. '|', '(' .. prefix .. '}',
    'LIMIT', 0, n)
  local front = {}
  for i, member in ipairs(members) do
    local units, id = string.match(string.sub(member, #prefix + 2), '^%d+|(%d+)|(.*)$')
    front[i] = {tonumber(units), id}
  end
  return front
end

-- Removes a waiting registration (admitted, withdrawn): demand, queue, expiry, info.
local function drop_waiting(id, info)
  local u, seq, tenant = string.match(info, '^(%d+):(%d+):(.*)$')
  if redis.call('HINCRBY', KEYS[2], 'p:' .. tenant, int(-tonumber(u))) <= 0 then
    redis.call('HDEL', KEYS[2], 'p:' .. tenant)
  end
  redis.call('ZREM', KEYS[5], queue_member(tenant, seq, u, id))
  redis.call('ZREM', KEYS[3], 'P' .. id)
  redis.call('HDEL', KEYS[4], 'P' .. id)
end

-- Drops up to `limit` expired entries and credits their units back.
local function purge(now, limit)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, limit)
  if #dead == 0 then return 0 end
  local infos = redis.call('HMGET', KEYS[4], unpack(dead))
  for i, member in ipairs(dead) do
    local info = infos[i]
    if info then
      local field, units
      if string.sub(member, 1, 1) == 'L' then
        local u, _, tenant = string.match(info, '^(%d+):(%d+):(.*)$')
        field, units = 'u:' .. tenant, tonumber(u)
      else
        local u, seq, tenant = string.match(info, '^(%d+):(%d+):(.*)$')
        field, units = 'p:' .. tenant, tonumber(u)
        redis.call('ZREM', KEYS[5], queue_member(tenant, seq, u, string.sub(member, 2)))
      end
      if redis.call('HINCRBY', KEYS[2], field, int(-units)) <= 0 then
        redis.call('HDEL', KEYS[2], field)
      end
    end
  end
  redis.call('ZREM', KEYS[3], unpack(dead))
  redis.call('HDEL', KEYS[4], unpack(dead))
  return #dead
end

-- Units held and waiting per tenant, and units held by the whole group.
local function load_demand()
  local flat = redis.call('HGETALL', KEYS[2])
  local used, pending, total = {}, {}, 0
  for i = 1, #flat, 2 do
    local kind, tenant = string.sub(flat[i], 1, 1), string.sub(flat[i], 3)
    local units = tonumber(flat[i + 1])
    if kind == 'u' then
      used[tenant] = units
      total = total + units
    elseif kind == 'p' then
      pending[tenant] = units
    end  -- 's': the sentinel
  end
  return used, pending, total
end

-- Smallest level with sum(clamp(level*w, lo, up)) = target (fairness._water_level).
local function water_level(target, sum_lo, sum_up, rows)
  if target <= sum_lo then return 0 end
  -- Breakpoints: the slope grows by w at lo/w and shrinks by w at up/w. Deltas of equal
  -- breakpoints are merged, so a plain numeric sort does (a Lua comparator is several times
  -- slower), and an uncontended group (target >= sum_up) needs no sort at all.
  local delta, xs, top = {}, {}, nil
  for _, r in ipairs(rows) do
    if r.up > r.lo then
      local from, to = r.lo / r.w, r.up / r.w
      if delta[from] then delta[from] = delta[from] + r.w else xs[#xs + 1], delta[from] = from, r.w end
      if delta[to] then delta[to] = delta[to] - r.w else xs[#xs + 1], delta[to] = to, -r.w end
      if not top or to > top then top = to end
    end
  end
  if not top then return 0 end
  if target >= sum_up then return top end
  table.sort(xs)
  local value, slope, previous = sum_lo, 0, 0
  for _, x in ipairs(xs) do
    local reached = value + slope * (x - previous)
    if reached >= target and slope > 0 then
      return previous + (target - value) / slope
    end
    value, previous, slope = reached, x, slope + delta[x]
  end
  return previous
end

-- Fair limits of the active tenants. `demand` maps tenant -> units wanted;
-- `specs` maps tenant -> parsed spec (tenants without one are skipped).
-- Returns rows {name, lo, up, w, limit} and the level.
local function allocate(capacity, reserve_total, demand, specs)
  local rows, sum_lo, sum_up, active_reserve = {}, 0, 0, 0
  for tenant, d in pairs(demand) do
    local s = specs[tenant]
    if s then
      local keep = s.g * (1 - s.l)
      local lo = math.max(keep, math.min(d, s.g))
      local up = math.min(s.ceil, math.max(d, lo))
      rows[#rows + 1] = {name = tenant, lo = lo, up = up, w = s.w}
      sum_lo, sum_up = sum_lo + lo, sum_up + up
      active_reserve = active_reserve + keep
    end
  end
  local idle = math.max(0, reserve_total - active_reserve)
  local target = math.min(capacity, sum_up + idle) - idle
  local level = water_level(target, sum_lo, sum_up, rows)
  for _, r in ipairs(rows) do
    r.limit = math.min(math.max(level * r.w, r.lo), r.up)
  end
  return rows, level
end

-- Specs of the named tenants from the policy hash, one HMGET; unknown tenants
-- get the default spec when the policy admits strangers.
local function load_specs(names, policy)
  local specs = {}
  if #names == 0 then return specs end
  -- In chunks: unpack() of a very long list overflows Lua's C stack.
  local raw = {}
  for first = 1, #names, 1000 do
    local fields = {}
    for i = first, math.min(first + 999, #names) do fields[#fields + 1] = 't:' .. names[i] end
    local part = redis.call('HMGET', KEYS[1], unpack(fields))
    for i, value in ipairs(part) do raw[first + i - 1] = value end
  end
  for i, name in ipairs(names) do
    local spec = raw[i]
    if not spec and policy.unknown == 'default' then spec = policy.default end
    if spec then specs[name] = parse_spec(spec) end
  end
  return specs
end

-- The policy header, or nil plus an error reply.
local function load_policy(schema)
  local p = redis.call('HMGET', KEYS[1], 'C', 'reserve', 'unknown', 'default', 'ttl', 'schema',
    'version', 'busy', 'recover', 'fence')
  if not p[1] then
    return nil, {-1, 'no_policy', 0, 0, 0, '0', 0, 0, 0, 0, 0}
  end
  if tonumber(p[6]) > tonumber(schema) then
    return nil, {-1, 'schema', 0, 0, 0, '0', 0, 0, 0, tonumber(p[6]), 0}
  end
  return {
    capacity = tonumber(p[1]), reserve = tonumber(p[2]), unknown = p[3], default = p[4],
    ttl = tonumber(p[5]), version = tonumber(p[7]),
    busy = tonumber(p[8]) or 0, recover = tonumber(p[9]) or 0, fence = tonumber(p[10]) or 0,
  }, nil
end

-- Gives every expiring key of the group a lifetime longer than any lease.
-- The queue only gains members on the waiting path, which passes with_queue;
-- elsewhere members are only removed, and an existing key keeps its expiry.
-- Leases granted under a longer max_lease_ttl (lowered since) are covered through busy.
local function touch(policy, with_queue, now)
  local ttl = int(math.max(policy.ttl, policy.busy - now) + KEY_GRACE_MS)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
  if with_queue then redis.call('PEXPIRE', KEYS[5], ttl) end
end

local function fmt(x)
  return string.format('%.17g', x)
end

-- The next fencing token, written back with (when given) a new lease expiry in one HSET:
-- busy records that a lease may live until then (the policy hash outlives lost state).
-- A token is above every token handed out before, even after Redis lost the counter: the
-- floor is Redis time in ms x 1000, which grows by 1000 per ms, so tokens never go back
-- across a loss unless the group handed out more than 1000 tokens per ms for longer than
-- the outage lasted (or the server's clock went back). Exact in doubles until 2255.
local function next_fence(policy, now, expiry)
  local token = math.max(policy.fence + 1, now * 1000)
  policy.fence = token
  if expiry and expiry > policy.busy then
    policy.busy = expiry
    redis.call('HSET', KEYS[1], 'fence', int(token), 'busy', int(expiry))
  else
    redis.call('HSET', KEYS[1], 'fence', int(token))
  end
  return token
end

-- Records that a lease may live until `expiry` (a renewal: no new token).
local function mark_busy(policy, expiry)
  if expiry > policy.busy then
    redis.call('HSET', KEYS[1], 'busy', int(expiry))
    policy.busy = expiry
  end
end

-- How many of demand, exp and info still hold their sentinel (3: the state is whole).
-- HGET/ZSCORE rather than EXISTS: the documented minimal ACL already allows them, and a key an
-- older release created without a sentinel counts as missing (so state is never trusted
-- unless this release saw it whole).
local function sentinels()
  local present = 0
  if redis.call('HGET', KEYS[2], 's:') then present = present + 1 end
  if redis.call('ZSCORE', KEYS[3], 's:') then present = present + 1 end
  if redis.call('HGET', KEYS[4], 's:') then present = present + 1 end
  return present
end

-- The end of the recovery window if the group's state is found lost now, or the one already
-- open (0: none). Read-only (snapshot.lua); see check_state for the rule.
local function recovery_until(policy, now)
  if policy.recover > now then return policy.recover end
  local present = sentinels()
  if present < 3 and (present > 0 or policy.busy > now) then return policy.busy end
  return 0
end

-- Detects lost state and opens the recovery window; writes the sentinels of a fresh group.
-- Sets policy.recovering. A partial loss (some keys evicted) drops the rest: the holders
-- re-assert what is still live, which rebuilds demand, exp and info consistently.
local function check_state(policy, now)
  local present = sentinels()
  if present < 3 then
    if present > 0 or policy.busy > now then
      redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
      if policy.busy > policy.recover then
        redis.call('HSET', KEYS[1], 'recover', int(policy.busy))
        policy.recover = policy.busy
      end
    end
    redis.call('HSET', KEYS[2], 's:', 0)
    redis.call('ZADD', KEYS[3], SENTINEL_SCORE, 's:')
    redis.call('HSET', KEYS[4], 's:', 0)
    touch(policy, false, now)
  end
  policy.recovering = policy.recover > now
end

-- Demand of every tenant with units held or waiting (the active set).
local function active_demand(used, pending)
  local demand, names = {}, {}
  for tenant, units in pairs(used) do demand[tenant] = units end
  for tenant, units in pairs(pending) do demand[tenant] = (demand[tenant] or 0) + units end
  for tenant, _ in pairs(demand) do names[#names + 1] = tenant end
  return demand, names
end

-- The limit of one tenant inside allocate()'s rows (0 when it has no spec).
local function limit_of(rows, tenant)
  for _, r in ipairs(rows) do
    if r.name == tenant then return r.limit end
  end
  return 0
end


-- One or more acquire decisions in one script call share this context: the policy, the
-- clock, and an in-memory mirror of the group's demand that every decision updates, so a
-- batch decides exactly as the same requests sent one after another would.
local function acquire_begin(now, schema)
  local policy, err = load_policy(schema)
  if not policy then return nil, err end
  return {now = now, policy = policy, specs = {}, entries = {}, touch = false,
          touch_queue = false}, nil
end

-- Checks for lost state, purges expired entries and loads the demand, once per script call.
local function acquire_prepare(ctx, purge_limit)
  check_state(ctx.policy, ctx.now)
  purge(ctx.now, purge_limit)
  ctx.used, ctx.pending, ctx.group_used = load_demand()
end

-- Loads, in one HMGET, the info entries of the given lease ids not seen yet.
local function prefetch_entries(ctx, ids)
  local fields = {}
  for _, id in ipairs(ids) do
    if ctx.entries['L' .. id] == nil then
      fields[#fields + 1] = 'L' .. id
      fields[#fields + 1] = 'P' .. id
    end
  end
  if #fields == 0 then return end
  local values = redis.call('HMGET', KEYS[4], unpack(fields))
  for i, field in ipairs(fields) do ctx.entries[field] = values[i] end
end

-- Parsed specs of `names`, loading the ones not loaded yet (false: unknown, refused).
local function ensure_specs(ctx, names)
  local missing = {}
  for _, name in ipairs(names) do
    if ctx.specs[name] == nil then missing[#missing + 1] = name end
  end
  if #missing == 0 then return end
  local loaded = load_specs(missing, ctx.policy)
  for _, name in ipairs(missing) do ctx.specs[name] = loaded[name] or false end
end

-- Refreshes the expiry of the keys written by the decisions of this call.
local function acquire_finish(ctx)
  if ctx.touch then touch(ctx.policy, ctx.touch_queue, ctx.now) end
end

-- "units:token-or-seq:tenant" of an info entry, parsed.
local function parse_info(info)
  local u, n, owner = string.match(info, '^(%d+):(%d+):(.*)$')
  return tonumber(u), n, owner
end

-- Decides one request (§3) and records it; returns acquire.lua's reply (see its header).
local function acquire_one(ctx, tenant, units, id, ttl, wait, pending_ms)
  local policy, now, used, pending = ctx.policy, ctx.now, ctx.used, ctx.pending
  if ttl > policy.ttl then
    return {-1, 'bad_ttl', 0, 0, 0, '0', 0, policy.capacity, 0, policy.version, policy.ttl}
  end
  local lease_member, wait_member = 'L' .. id, 'P' .. id
  prefetch_entries(ctx, {id})
  local tenant_used = used[tenant] or 0

  -- A request id is the tenant's: a retry must repeat the original request (same tenant,
  -- same units) to be answered by it; anything else is refused and changes nothing.
  local known = ctx.entries[lease_member]
  local wait_info = ctx.entries[wait_member]
  local already_waiting = wait_info ~= false and wait_info ~= nil
  local original = known or (already_waiting and wait_info) or nil
  if original then
    local u, _, owner = parse_info(original)
    if owner ~= tenant or u ~= units then
      return {0, 'id_mismatch', 0, 0, tenant_used, '0', ctx.group_used, policy.capacity, 0,
              policy.version, 0}
    end
  end

  -- Idempotency: the first attempt committed and its reply was lost.
  if known then
    local _, token = parse_info(known)
    local expiry = redis.call('ZSCORE', KEYS[3], lease_member)
    return {1, 'admitted', tonumber(expiry), tonumber(token), tenant_used, '0',
            ctx.group_used, policy.capacity, 0, policy.version, 1}
  end

  local demand, names = active_demand(used, pending)
  if not already_waiting then demand[tenant] = (demand[tenant] or 0) + units end
  if not demand[tenant] then demand[tenant] = 0 end
  if not used[tenant] and not pending[tenant] then names[#names + 1] = tenant end

  ensure_specs(ctx, names)
  local spec = ctx.specs[tenant]
  if not spec then
    return {0, 'unknown_tenant', 0, 0, tenant_used, '0', ctx.group_used, policy.capacity, 0,
            policy.version, 0}
  end

  if units <= math.min(policy.capacity, spec.ceil, spec.max) and policy.recovering then
    -- Leases granted before the state was lost may still run: admit nothing new until the
    -- last of them has certainly ended; their holders' renewals re-assert them meanwhile.
    return {0, 'recovering', 0, 0, tenant_used, '0', ctx.group_used, policy.capacity,
            policy.recover - now, policy.version, 0}
  end

  local rows = allocate(policy.capacity, policy.reserve, demand, ctx.specs)
  local limit = limit_of(rows, tenant)

  local reserve = 0
  if pending[tenant] then  -- only a tenant with waiting requests has a queue
    local head = queue_front(tenant, 1)[1]
    if head and head[2] ~= id then reserve = head[1] end
  end

  local reason = 'admitted'
  if units > math.min(policy.capacity, spec.ceil, spec.max) then
    reason = 'too_large'
  elseif tenant_used + units + reserve > limit + EPSILON then
    reason = 'tenant_limit'
  elseif ctx.group_used + units + reserve > policy.capacity then
    reason = 'group_full'
  end

  if reason ~= 'admitted' then
    local retry_ms = pending_ms
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    if first[2] then retry_ms = math.max(1, math.min(retry_ms, tonumber(first[2]) - now)) end
    if wait and reason ~= 'too_large' then
      redis.call('ZADD', KEYS[3], int(now + pending_ms), wait_member)
      if not already_waiting then
        -- The fencing counter doubles as the arrival sequence: monotonic, kept across policies.
        local seq = next_fence(policy, now)
        local info = int(units) .. ':' .. int(seq) .. ':' .. tenant
        redis.call('HSET', KEYS[4], wait_member, info)
        redis.call('HINCRBY', KEYS[2], 'p:' .. tenant, int(units))
        redis.call('ZADD', KEYS[5], 0, queue_member(tenant, seq, units, id))
        ctx.entries[wait_member] = info
        pending[tenant] = (pending[tenant] or 0) + units
      end
      ctx.touch, ctx.touch_queue = true, true
      -- The front of the line retries soon, paced by position: the head may fit at the next
      -- release, and each waiter behind it moves up as the ones ahead are admitted.
      for position, entry in ipairs(queue_front(tenant, QUEUE_PACED)) do
        if entry[2] == id then
          retry_ms = math.min(retry_ms, NEXT_IN_LINE_RETRY_MS * math.max(1, position - 1))
        end
      end
    end
    return {0, reason, 0, 0, tenant_used, fmt(limit), ctx.group_used, policy.capacity, retry_ms,
            policy.version, 0}
  end

  if already_waiting then
    drop_waiting(id, wait_info)
    pending[tenant] = (pending[tenant] or 0) - units
    if pending[tenant] <= 0 then pending[tenant] = nil end
    ctx.entries[wait_member] = false
  end

  local expiry = now + ttl
  local token = next_fence(policy, now, expiry)
  local info = int(units) .. ':' .. int(token) .. ':' .. tenant
  redis.call('ZADD', KEYS[3], int(expiry), lease_member)
  redis.call('HSET', KEYS[4], lease_member, info)
  redis.call('HINCRBY', KEYS[2], 'u:' .. tenant, int(units))
  ctx.entries[lease_member] = info
  used[tenant] = tenant_used + units
  ctx.group_used = ctx.group_used + units
  ctx.touch = true
  return {1, 'admitted', expiry, token, tenant_used + units, fmt(limit), ctx.group_used,
          policy.capacity, 0, policy.version, 0}
end

-- Ends lease `id` of `tenant` whose fencing token is `token` (text, as stored), and withdraws
-- a waiting request of that id and tenant; release.lua's reply. An entry of that id owned by
-- another tenant, or a lease with another token, is left alone: reply "fenced".
local function release_one(now, id, tenant, token)
  local member = 'L' .. id
  local entries = redis.call('HMGET', KEYS[4], member, 'P' .. id)
  local info, wait_info = entries[1], entries[2]
  if info then
    local units, held_token, owner = parse_info(info)
    if owner ~= tenant or held_token ~= token then return {'fenced', 0} end
    local expiry = tonumber(redis.call('ZSCORE', KEYS[3], member))
    local state = 'released'
    if expiry <= now then state = 'expired' end
    if redis.call('HINCRBY', KEYS[2], 'u:' .. tenant, int(-units)) <= 0 then
      redis.call('HDEL', KEYS[2], 'u:' .. tenant)
    end
    redis.call('ZREM', KEYS[3], member)
    redis.call('HDEL', KEYS[4], member)
    -- A waiting registration under a live lease's id cannot exist (admission drops it).
    return {state, units}
  end
  -- A caller giving up on a waiting request releases its id: drop the registration.
  if wait_info then
    local _, _, owner = parse_info(wait_info)
    if owner ~= tenant then return {'fenced', 0} end
    drop_waiting(id, wait_info)
  end
  return {'unknown', 0}
end
