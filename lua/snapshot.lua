-- snapshot.lua: one consistent, read-only view of a group (writes nothing).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- ARGV[1] now_ms      pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema      key schema of the caller
-- ARGV[3] max_leases  most live leases to list
-- ARGV[4..] tenant names to report even when idle
--
-- reply: {status, reason, now, capacity, group_used, version, level, tenants, leases, truncated,
--         recovering_until}
--   status 1 ok (reason "ok"), -1 error (reason "no_policy" | "schema"; then capacity holds
--   the newer schema).
--   tenants: flat list of 7-tuples {name, used, pending, limit, lo, up, guarantee}; numbers
--     of the fairness rule are strings (%.17g). Expired entries not yet purged are left out;
--     a tenant without a spec (refused stranger) has limit, lo, up and guarantee 0.
--   leases: flat list of 5-tuples {lease_id, tenant, units, token, expiry_ms}.
--   truncated: 1 when more live leases exist than listed.
--   recovering_until: end of the group's recovery window in ms (0: none). Also reported when
--     the loss is visible but no writing call has found it yet (this script writes nothing).
--
-- Computed from scratch (O(active tenants)), with _fair.lua's water_level: an independent
-- reading of the rule beside the incremental state the decisions use.

local now = now_ms(ARGV[1])
local ctx, err = open_group(now, ARGV[2], {}, read_header({}))
if not ctx then return {-1, err[2], now, err[10], 0, 0, '0', {}, {}, 0, 0} end
local policy = ctx.policy

local flat = redis.call('HGETALL', KEYS[2])
local used, pending, group_used = {}, {}, 0
for i = 1, #flat, 2 do
  local kind, tenant = string.sub(flat[i], 1, 2), string.sub(flat[i], 3)
  if kind == 'u:' then
    used[tenant] = tonumber(flat[i + 1])
    group_used = group_used + used[tenant]
  elseif kind == 'p:' then
    pending[tenant] = tonumber(flat[i + 1])
  end
end
-- Discount entries that have expired but not been purged: a read must not write.
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, member in ipairs(dead) do
  local info = redis.call('HGET', KEYS[4], member)
  if info then
    local u, _, tenant = parse_entry(info)
    if string.sub(member, 1, 1) == 'L' then
      used[tenant] = (used[tenant] or 0) - u
      group_used = group_used - u
      if used[tenant] <= 0 then used[tenant] = nil end
    else
      pending[tenant] = (pending[tenant] or 0) - u
      if pending[tenant] <= 0 then pending[tenant] = nil end
    end
  end
end

local demand, names = {}, {}
for tenant, units in pairs(used) do demand[tenant] = units end
for tenant, units in pairs(pending) do demand[tenant] = (demand[tenant] or 0) + units end
for tenant, _ in pairs(demand) do names[#names + 1] = tenant end
for i = 4, #ARGV do
  if not demand[ARGV[i]] then
    demand[ARGV[i]] = 0
    names[#names + 1] = ARGV[i]
  end
end
load_specs(ctx, names)
local rows, sum_lo, sum_up, active_reserve = {}, 0, 0, 0
for _, name in ipairs(names) do
  local s = ctx.specs[name]
  if s then
    local lo, up = claim_bounds(s.keep, s.g, s.ceil, demand[name])
    local r = {name = name, lo = lo, up = up, w = s.w}
    rows[#rows + 1] = r
    sum_lo, sum_up, active_reserve = sum_lo + r.lo, sum_up + r.up, active_reserve + s.keep
  end
end
local target = target_of(policy.capacity, policy.reserve, active_reserve, sum_up)
local level = water_level(target, sum_lo, sum_up, rows)
local by_name = {}
for _, r in ipairs(rows) do by_name[r.name] = r end
local tenants = {}
for _, name in ipairs(names) do
  local r = by_name[name]
  local limit, lo, up, guarantee = '0', '0', '0', 0
  if r then
    limit, lo, up = fmt(clamp_limit(level, r.w, r.lo, r.up)), fmt(r.lo), fmt(r.up)
    guarantee = ctx.specs[name].g
  end
  tenants[#tenants + 1] = name
  tenants[#tenants + 1] = used[name] or 0
  tenants[#tenants + 1] = pending[name] or 0
  tenants[#tenants + 1] = limit
  tenants[#tenants + 1] = lo
  tenants[#tenants + 1] = up
  tenants[#tenants + 1] = guarantee
end

local max_leases = tonumber(ARGV[3])
local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now, '+inf')
local leases, listed, truncated = {}, 0, 0
for _, member in ipairs(live) do
  if string.sub(member, 1, 1) == 'L' then
    if listed >= max_leases then
      truncated = 1
      break
    end
    local info = redis.call('HGET', KEYS[4], member)
    local u, token, tenant = parse_entry(info)
    leases[#leases + 1] = string.sub(member, 2)
    leases[#leases + 1] = tenant
    leases[#leases + 1] = u
    leases[#leases + 1] = tonumber(token)
    leases[#leases + 1] = tonumber(redis.call('ZSCORE', KEYS[3], member))
    listed = listed + 1
  end
end
return {1, 'ok', now, policy.capacity, group_used, policy.version, fmt(level), tenants, leases,
        truncated, recovery_until(policy, now)}
