-- renew.lua: extend a live lease and say whether its tenant is above its fair limit (§5).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- ARGV[1] now_ms    pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema    key schema of the caller
-- ARGV[3] lease_id  the lease to extend
-- ARGV[4] ttl_ms    new lifetime from now, <= the policy's max_lease_ttl
-- ARGV[5] purge     most expired entries to drop in this call
--
-- reply: {status, reason, expiry_ms, over_limit, tenant_used, limit, group_used, capacity}
--   status 1 renewed (reason "renewed"); 0 lost (reason "lost": expired or unknown lease);
--   -1 error (reason "no_policy" | "schema" | "bad_ttl"). over_limit is 1 when the tenant
--   holds more than its fair limit now: a lender wants its guarantee back. limit is a string.
--   On error the last field is the detail: the newer schema, or the max ttl in ms.

local now = now_ms(ARGV[1])
local member, ttl = 'L' .. ARGV[3], tonumber(ARGV[4])
local ctx, err = open_group(now, ARGV[2], {})
if not ctx then return {-1, err[2], 0, 0, 0, '0', 0, err[10]} end
local policy = ctx.policy
if ttl > policy.ttl then return {-1, 'bad_ttl', 0, 0, 0, '0', 0, policy.ttl} end

local expiry = redis.call('ZSCORE', KEYS[3], member)
local info = redis.call('HGET', KEYS[4], member)
purge(ctx, tonumber(ARGV[5]))
if not expiry or not info or tonumber(expiry) <= now then
  flush(ctx, KEY_GRACE_MS)
  return {0, 'lost', 0, 0, 0, '0', 0, policy.capacity}
end

local _, _, tenant = parse_entry(info)
local new_expiry = now + ttl
redis.call('ZADD', KEYS[3], new_expiry, member)
ctx.touch = true

-- The level is the group's own: the limit needs no walk.
local uf, pf = 'u:' .. tenant, 'p:' .. tenant
load_fields(ctx, {'g', uf, pf})
local st = fair_state(ctx)
local tenant_used = units_of(ctx, uf)
local spec = spec_of(ctx, tenant)
local limit, over = 0, 0
if spec then
  limit = limit_at(st, spec, tenant_used + units_of(ctx, pf))
  if tenant_used > limit + EPSILON then over = 1 end
end
flush(ctx, KEY_GRACE_MS)
return {1, 'renewed', new_expiry, over, tenant_used, fmt(limit), st.used, policy.capacity}
