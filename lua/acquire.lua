-- acquire.lua: admit or refuse a request for units under the group's fair limits (§3, §5).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue   (one group, one slot)
-- ARGV[1] now_ms      pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema      key schema of the caller
-- ARGV[3] tenant      tenant name
-- ARGV[4] units       integer >= 1
-- ARGV[5] lease_id    request id; a retry with the same id returns the same lease
-- ARGV[6] ttl_ms      lease lifetime, <= the policy's max_lease_ttl
-- ARGV[7] wait        "1": on refusal, register the units as pending demand
-- ARGV[8] pending_ms  lifetime of that registration unless refreshed by a retry
-- ARGV[9] purge       most expired entries to drop in this call
--
-- reply: {status, reason, expiry_ms, token, tenant_used, limit, group_used, capacity,
--         retry_ms, version, replay}
--   status 1 admitted (reason "admitted"), 0 refused (reason "too_large" | "tenant_limit" |
--   "group_full" | "unknown_tenant"), -1 error (reason "no_policy" | "schema" | "bad_ttl").
--   limit is a string (%.17g); tenant_used/group_used are after the call; replay is 1 when an
--   earlier attempt with the same lease_id had already been admitted. retry_ms is a hint; for
--   the first QUEUE_PACED waiting requests of the tenant it grows with their place in line.
--
-- Waiting requests of one tenant are served in arrival order: any other request of that tenant
-- must leave room (in the tenant limit and in the group) for the tenant's oldest waiting
-- request, so a large batch is not starved by a stream of small ones.

local now = now_ms(ARGV[1])
local tenant, units, id = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local ttl, wait, pending_ms = tonumber(ARGV[6]), ARGV[7] == '1', tonumber(ARGV[8])

local policy, err = load_policy(ARGV[2])
if not policy then return err end
if ttl > policy.ttl then
  return {-1, 'bad_ttl', 0, 0, 0, '0', 0, policy.capacity, 0, policy.version, policy.ttl}
end

purge(now, tonumber(ARGV[9]))

local lease_member, wait_member = 'L' .. id, 'P' .. id
local used, pending, group_used = load_demand()

-- Idempotency: the first attempt committed and its reply was lost.
local entries = redis.call('HMGET', KEYS[4], lease_member, wait_member)
local known, wait_info = entries[1], entries[2]
if known then
  local _, token = string.match(known, '^(%d+):(%d+):')
  local expiry = redis.call('ZSCORE', KEYS[3], lease_member)
  return {1, 'admitted', tonumber(expiry), tonumber(token), used[tenant] or 0, '0', group_used,
          policy.capacity, 0, policy.version, 1}
end

local already_waiting = wait_info ~= false and wait_info ~= nil
local demand, names = active_demand(used, pending)
if not already_waiting then demand[tenant] = (demand[tenant] or 0) + units end
if not demand[tenant] then demand[tenant] = 0 end
if not used[tenant] and not pending[tenant] then names[#names + 1] = tenant end

local specs = load_specs(names, policy)
local spec = specs[tenant]
local tenant_used = used[tenant] or 0
if not spec then
  return {0, 'unknown_tenant', 0, 0, tenant_used, '0', group_used, policy.capacity, 0,
          policy.version, 0}
end

local rows = allocate(policy.capacity, policy.reserve, demand, specs)
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
elseif group_used + units + reserve > policy.capacity then
  reason = 'group_full'
end

if reason ~= 'admitted' then
  local retry_ms = pending_ms
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if first[2] then retry_ms = math.max(1, math.min(retry_ms, tonumber(first[2]) - now)) end
  if wait and reason ~= 'too_large' then
    redis.call('ZADD', KEYS[3], now + pending_ms, wait_member)
    if not already_waiting then
      -- The fencing counter doubles as the arrival sequence: monotonic, kept across policies.
      local seq = redis.call('HINCRBY', KEYS[1], 'fence', 1)
      redis.call('HSET', KEYS[4], wait_member, units .. ':' .. seq .. ':' .. tenant)
      redis.call('HINCRBY', KEYS[2], 'p:' .. tenant, units)
      redis.call('ZADD', KEYS[5], 0, queue_member(tenant, seq, units, id))
    end
    touch(policy, true)
    -- The front of the line retries soon, paced by position: the head may fit at the next
    -- release, and each waiter behind it moves up as the ones ahead are admitted.
    for position, entry in ipairs(queue_front(tenant, QUEUE_PACED)) do
      if entry[2] == id then
        retry_ms = math.min(retry_ms, NEXT_IN_LINE_RETRY_MS * math.max(1, position - 1))
      end
    end
  end
  return {0, reason, 0, 0, tenant_used, fmt(limit), group_used, policy.capacity, retry_ms,
          policy.version, 0}
end

if already_waiting then drop_waiting(id, wait_info) end

local token = redis.call('HINCRBY', KEYS[1], 'fence', 1)
local expiry = now + ttl
redis.call('ZADD', KEYS[3], expiry, lease_member)
redis.call('HSET', KEYS[4], lease_member, units .. ':' .. token .. ':' .. tenant)
redis.call('HINCRBY', KEYS[2], 'u:' .. tenant, units)
touch(policy)
return {1, 'admitted', expiry, token, tenant_used + units, fmt(limit), group_used + units,
        policy.capacity, 0, policy.version, 0}
