-- apply_policy.lua: publish one group's policy atomically, keeping its fencing counter, and
-- rebuild the group's fair state for it in the same call.
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- ARGV[1] schema      key schema of the writer
-- ARGV[2] capacity    integer units
-- ARGV[3] reserve     sum of G*(1-lendable) over listed tenants (%.17g)
-- ARGV[4] unknown     "refuse" | "default"
-- ARGV[5] default     spec "G|lendable|B|weight|max_units" for unknown tenants
-- ARGV[6] ttl_ms      the group's max_lease_ttl in ms
-- ARGV[7] digest      content digest of the group policy (unchanged content: no new version)
-- ARGV[8..] tenant name, spec pairs
--
-- reply: {status, version}
--   status 1 written (version is the new one), 0 unchanged (same digest; current version),
--   -1 the hash was written by a newer schema (version is that schema).
--
-- The rebuild reads every active tenant once (O(active tenants), like snapshot): a policy
-- change moves every tenant's lo, up and weight, so nothing incremental survives it.

local schema = tonumber(ARGV[1])
local old = redis.call('HMGET', KEYS[1], 'schema', 'version', 'fence', 'digest')
if old[1] and tonumber(old[1]) > schema then return {-1, tonumber(old[1])} end
if old[4] == ARGV[7] then return {0, tonumber(old[2])} end

local version = (tonumber(old[2]) or 0) + 1
local header = schema .. '|' .. version .. '|' .. ARGV[2] .. '|' .. ARGV[6] .. '|' .. ARGV[4] ..
  '|' .. ARGV[3] .. '|' .. ARGV[5]
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'schema', schema, 'version', version, 'fence', old[3] or 0,
  'digest', ARGV[7], 'hdr', header)
-- HSET in chunks: unpack() of a very long list overflows Lua's C stack.
local specs, batch = {}, {}
for i = 8, #ARGV, 2 do
  specs[ARGV[i]] = ARGV[i + 1]
  batch[#batch + 1] = 't:' .. ARGV[i]
  batch[#batch + 1] = ARGV[i + 1]
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
    local lo = claim_lo(s, demand[name])
    local r = {name = name, lo = lo, up = claim_up(s, demand[name], lo), w = s.w, keep = s.keep}
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
redis.call('ZADD', KEYS[6], -1, FAIR_ANCHOR)
local ttl = policy.ttl + KEY_GRACE_MS
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[6], ttl)
return {1, version}
