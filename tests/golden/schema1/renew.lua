-- renew.lua: extend a live lease and say whether its tenant is above its fair limit (§5).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue   (one group, one slot)
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
local policy, err = load_policy(ARGV[2])
if not policy then return {-1, err[2], 0, 0, 0, '0', 0, err[10]} end
if ttl > policy.ttl then return {-1, 'bad_ttl', 0, 0, 0, '0', 0, policy.ttl} end

local expiry = redis.call('ZSCORE', KEYS[3], member)
local info = redis.call('HGET', KEYS[4], member)
if not expiry or not info or tonumber(expiry) <= now then
  purge(now, tonumber(ARGV[5]))
  return {0, 'lost', 0, 0, 0, '0', 0, policy.capacity}
end
purge(now, tonumber(ARGV[5]))

local tenant = string.match(info, '^%d+:%d+:(.*)$')
local new_expiry = now + ttl
redis.call('ZADD', KEYS[3], new_expiry, member)
touch(policy)

local used, pending, group_used = load_demand()
local demand, names = active_demand(used, pending)
local specs = load_specs(names, policy)
local rows = allocate(policy.capacity, policy.reserve, demand, specs)
local limit = limit_of(rows, tenant)
local tenant_used = used[tenant] or 0
local over = 0
if specs[tenant] and tenant_used > limit + EPSILON then over = 1 end
return {1, 'renewed', new_expiry, over, tenant_used, fmt(limit), group_used, policy.capacity}
