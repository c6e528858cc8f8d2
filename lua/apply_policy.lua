-- apply_policy.lua: publish one group's policy atomically, keeping its fencing counter and
-- its record of live leases (busy, recover: see _lib.lua), and rebuild the group's fair state
-- for it in the same call.
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- KEYS[7] old_policy, KEYS[8] old_demand, KEYS[9] old_exp, KEYS[10] old_info, KEYS[11] old_queue
--   (the same group's keys in the previous layout, key schema 1: same hash tag, same slot)
-- KEYS[12] contend1, KEYS[13] contend2, KEYS[14] contend3, KEYS[15] contend4
--   (the rate meters' contention sets: a metered group's hold a sentinel, see below)
-- ARGV[1] schema      key schema of the writer
-- ARGV[2] capacity    integer units
-- ARGV[3] reserve     sum of G*(1-lendable) over listed tenants (%.17g)
-- ARGV[4] unknown     "refuse" | "default"
-- ARGV[5] default     spec "G|lendable|B|weight|max_units" for unknown tenants
-- ARGV[6] ttl_ms      the group's max_lease_ttl in ms
-- ARGV[7] digest      content digest of the group policy (unchanged content: no new version)
-- ARGV[8] now_ms      pinned clock in ms, or "" for Redis TIME
-- ARGV[9] recover_ms  restoring a lost policy: leases granted before the loss may live this
--                     long from now (busy >= now + recover_ms, so the group recovers, see
--                     acquire.lua); "0" when publishing
-- ARGV[10] migrate    "1": take the group over from a live previous layout (see below)
-- ARGV[11] meters      the group's rate meters "name|rate|cap|reserve|floor|quantum|window;..."
--                     in slot order (ratequota.rates.meter_limits, ticks), or "" for none
-- ARGV[12] shares     the rate-meter shares of tenants the policy does not list
--                     ("rate|ceil|cap|ccap|weight;..." per slot), or ""
-- ARGV[13] usage_retention_ms  how long each hour of the usage ledger is kept after it ends
--                     (field led_ttl, read by _ledger.lua)
-- ARGV[14] meter_full_ms  the longest time any rate-meter bucket of the policy takes to
--                     refill from its debt floor (ratequota.rates.policy_horizon; "0"
--                     without meters): a restored or changed policy keeps the group's keys
--                     and its lost-meter rule (mfull, _metered.lua) that long
-- ARGV[15..] tenant name, spec, meter shares ("" without meters) triples
--
-- reply: {status, version}
--   status 1 written (version is the new one), 0 unchanged (same digest; current version),
--   -1 the hash was written by a newer schema (version is that schema),
--   -2 a pod of the previous release still serves this group in the previous layout and
--      migrate was not asked for (version is that layout's schema); nothing was written.
--
-- The rebuild reads every active tenant once (O(active tenants), like snapshot): a policy
-- change moves every tenant's lo, up and weight, so nothing incremental survives it.
--
-- Upgrade from key schema 1: every publish leaves the previous layout's policy hash as a
-- tombstone holding schema = this schema, so pods of the previous release refuse the
-- group (their scripts answer "schema", their readiness fails) and cannot republish it. With
-- migrate, the live leases of the previous layout are carried over (units, token, expiry), its
-- fencing counter too (tokens never go back), waiting registrations are dropped (their callers
-- retry), and its state keys are deleted: no unit is ever counted in two places, so the two
-- releases can never both admit against the same capacity.

local schema = tonumber(ARGV[1])
local old = redis.call('HMGET', KEYS[1], 'schema', 'version', 'fence', 'digest', 'busy', 'recover',
  'mfull')
if old[1] and tonumber(old[1]) > schema then return {-1, tonumber(old[1])} end

-- A metered group's contention sets always exist, holding the sentinel "~" above every tag
-- and no expiry (like the policy hash): a metered acquire names them, and a Redis Cluster
-- refuses a script naming a missing key while its slot migrates. Without meters: none.
if ARGV[11] ~= '' then
  for i = 12, 15 do
    redis.call('ZADD', KEYS[i], '+inf', '~')
    redis.call('PERSIST', KEYS[i])
  end
else
  redis.call('DEL', KEYS[12], KEYS[13], KEYS[14], KEYS[15])
end

local legacy = redis.call('HMGET', KEYS[7], 'schema', 'fence', 'busy')
local legacy_live = legacy[1] and tonumber(legacy[1]) < schema
if legacy_live and ARGV[10] ~= '1' then return {-2, tonumber(legacy[1])} end

local now = tonumber(ARGV[8])
if ARGV[8] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local fence = tonumber(old[3]) or 0
local busy = tonumber(old[5]) or 0
local recover = tonumber(old[6]) or 0
local recover_ms = tonumber(ARGV[9])
if recover_ms > 0 then
  busy = math.max(busy, now + recover_ms)
  if not old[1] then
    -- The lost hash held the end of any recovery window open: the keys check_state re-created
    -- (with their sentinels) would pass for a whole state holding every live lease, and the
    -- group would admit on top of the leases not yet re-asserted. check_state keeps the
    -- window's end in demand too (rw); a lost demand is a lost state, a window of its own.
    local rw = tonumber(redis.call('HGET', KEYS[2], 'rw'))
    if rw and rw > now then recover = math.max(recover, rw) end
  end
end
-- Meter buckets drawn before a loss, or not full yet under a policy that refills slower, may
-- be below full for up to a whole refill from their debt floor.
local mfull = tonumber(old[7]) or 0
if ARGV[11] ~= '' and (recover_ms > 0 or mfull > now) then
  mfull = math.max(mfull, now + tonumber(ARGV[14]))
end
if legacy_live then
  fence = math.max(fence, tonumber(legacy[2]) or 0)
  busy = math.max(busy, tonumber(legacy[3]) or 0)
  local live = redis.call('ZRANGEBYSCORE', KEYS[9], '(' .. now, '+inf', 'WITHSCORES')
  local held = {}
  for i = 1, #live, 2 do
    local member = live[i]
    if string.sub(member, 1, 1) == 'L' then
      local info = redis.call('HGET', KEYS[10], member)
      if info then
        local units, _, tenant = parse_entry(info)
        redis.call('ZADD', KEYS[3], live[i + 1], member)
        redis.call('HSET', KEYS[4], member, info)
        held[tenant] = (held[tenant] or 0) + units
      end
    end
  end
  for tenant, units in pairs(held) do redis.call('HINCRBY', KEYS[2], 'u:' .. tenant, int(units)) end
  -- Whole state, as check_state would have written it (the fair anchor comes with the rebuild).
  redis.call('HSET', KEYS[2], 's:', WIDE)
  redis.call('ZADD', KEYS[3], SENTINEL_SCORE, 's:', SENTINEL_SCORE, WIDE_MEMBER)
  redis.call('HSET', KEYS[4], 's:', WIDE)
  redis.call('DEL', KEYS[8], KEYS[9], KEYS[10], KEYS[11])
end
if old[4] ~= ARGV[7] or legacy_live or not legacy[1] then
  redis.call('DEL', KEYS[7])
  -- C is there only so that the previous release's scripts get past their "no policy" check
  -- to their schema check (they would otherwise try to restore the group).
  redis.call('HSET', KEYS[7], 'schema', schema, 'C', 0)
end
-- Zsets an earlier release created keep their listpack encoding until they hold WIDE_MEMBER
-- (_codec.lua): added where the sentinel says the zset is whole, which keeps its expiry.
if redis.call('ZSCORE', KEYS[3], 's:') then
  redis.call('ZADD', KEYS[3], SENTINEL_SCORE, WIDE_MEMBER)
end
if redis.call('ZSCORE', KEYS[6], FAIR_ANCHOR) then redis.call('ZADD', KEYS[6], -1, WIDE_MEMBER) end
if old[4] == ARGV[7] and not legacy_live then
  redis.call('HSET', KEYS[1], 'wide', WIDE)  -- a policy published by an earlier release
  return {0, tonumber(old[2])}
end

local version = (tonumber(old[2]) or 0) + 1
local header = schema .. '|' .. version .. '|' .. ARGV[2] .. '|' .. ARGV[6] .. '|' .. ARGV[4] ..
  '|' .. ARGV[3] .. '|' .. ARGV[5]
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'schema', schema, 'version', version, 'fence', int(fence),
  'digest', ARGV[7], 'hdr', header, 'busy', int(busy), 'recover', int(recover),
  'led_ttl', ARGV[13], 'mfull', int(mfull), 'wide', WIDE)
-- HSET in chunks: unpack() of a very long list overflows Lua's C stack.
local specs, batch = {}, {}
-- Rate meters (_metered.lua): written only when the policy has some.
if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'meters', ARGV[11], 'md', ARGV[12]) end
for i = 15, #ARGV, 3 do
  specs[ARGV[i]] = ARGV[i + 1]
  batch[#batch + 1] = 't:' .. ARGV[i]
  batch[#batch + 1] = ARGV[i + 1]
  if ARGV[i + 2] ~= '' then
    batch[#batch + 1] = 'ms:' .. ARGV[i]
    batch[#batch + 1] = ARGV[i + 2]
  end
  if #batch >= 1000 then
    redis.call('HSET', KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('HSET', KEYS[1], unpack(batch)) end

-- The fair state under the new policy, from the units held and waiting.
local policy = parse_header(header)
redis.call('DEL', KEYS[6])
local flat = redis.call('HGETALL', KEYS[2])
if #flat == 0 then return {1, version} end
local demand, names = {}, {}
local st = unpack_state(nil)
for i = 1, #flat, 2 do
  local kind, tenant = string.sub(flat[i], 1, 2), string.sub(flat[i], 3)
  if kind == 'u:' or kind == 'p:' then
    local units = tonumber(flat[i + 1])
    if kind == 'u:' then st.used = st.used + units end
    if not demand[tenant] then names[#names + 1] = tenant end
    demand[tenant] = (demand[tenant] or 0) + units
  end
end
local rows = {}
for _, name in ipairs(names) do
  local text = specs[name]
  if not text and policy.unknown == 'default' then text = policy.default end
  if text and demand[name] > 0 then
    local s = parse_spec(text)
    local lo, up = claim_bounds(s.keep, s.g, s.ceil, demand[name])
    local r = {name = name, lo = lo, up = up, w = s.w, keep = s.keep}
    rows[#rows + 1] = r
    st.loh, st.lol = exact_add(st.loh, st.lol, r.lo, 1)
    st.uph, st.upl = exact_add(st.uph, st.upl, r.up, 1)
    st.kh, st.kl = exact_add(st.kh, st.kl, r.keep, 1)
  end
end
local sum_lo, sum_up = exact_value(st.loh, st.lol), exact_value(st.uph, st.upl)
local target = target_of(policy.capacity, policy.reserve, exact_value(st.kh, st.kl), sum_up)
if target <= sum_lo then
  st.lam = 0
elseif target >= sum_up then
  st.lam = INF
else
  st.lam = water_level(target, sum_lo, sum_up, rows)
end
local points = {}
for _, r in ipairs(rows) do
  local where = 0
  if r.up > r.lo then
    where = side_of(r.lo / r.w, r.up / r.w, st.lam, 0)
    points[#points + 1] = fmt(r.lo / r.w)
    points[#points + 1] = point_member('l', r.lo, r.up, r.w, r.name)
    points[#points + 1] = fmt(r.up / r.w)
    points[#points + 1] = point_member('u', r.lo, r.up, r.w, r.name)
    if #points >= 1000 then
      redis.call('ZADD', KEYS[6], unpack(points))
      points = {}
    end
  end
  contribute(st, where, r.lo, r.up, r.w, 1)
end
if #points > 0 then redis.call('ZADD', KEYS[6], unpack(points)) end
redis.call('HSET', KEYS[2], 'g', pack_state(st))
redis.call('ZADD', KEYS[6], -1, FAIR_ANCHOR, -1, WIDE_MEMBER)
local ttl = math.max(policy.ttl, busy - now, mfull - now) + KEY_GRACE_MS
for i = 2, 6 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {1, version}
