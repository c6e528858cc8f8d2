-- renew.lua: extend a live lease, fenced, and say whether its tenant is above its fair limit (§5).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- KEYS[7] ledger, KEYS[8] ledger_alt  the usage ledger's hour keys (see _ledger.lua)
-- ARGV[1] now_ms     pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema     key schema of the caller
-- ARGV[3] lease_id   the lease to extend
-- ARGV[4] ttl_ms     new lifetime from now; above the policy's max_lease_ttl it is clamped to it.
--                    A renewal never shortens a lease: the new expiry is the later of now +
--                    ttl_ms and the lease's expiry (see below)
-- ARGV[5] purge      most expired entries to drop in this call
-- ARGV[6] tenant     the lease's tenant
-- ARGV[7] units      the lease's units
-- ARGV[8] token      the lease's fencing token, decimal
-- ARGV[9] expiry_ms  the lease's expiry as the holder last learned it (Redis time)
--
-- reply: {status, reason, expiry_ms, over_limit, tenant_used, limit, group_used, capacity,
--         ttl_ms}
--   status 1: reason "renewed" (the lease was live) or "reasserted" (the group is recovering
--     from lost state and the lease, live by its last known expiry, was written back with its
--     id, tenant, units and token, within the capacity and the tenant's ceiling);
--   status 0: reason "lost" (expired or unknown lease; or, recovering, it no longer fits) or
--     "fenced" (lease_id names a lease of another tenant, token or units: nothing changed);
--   status -1: error, reason "no_policy" | "schema" (capacity holds the newer schema).
--   ttl_ms is the lifetime granted: the asked one, or the group's max_lease_ttl when that is
--   lower (it was lowered under a held lease); the lease lives at least that long from now,
--   longer when its expiry was already later. over_limit is 1 when the tenant holds more
--   than its fair limit now: a lender wants its guarantee back. limit is a string.
--
-- Why never shorter: a re-assert trusts the expiry the holder names (ARGV[9]), and a holder
-- may name one it learned before a later renewal (a LeaseInfo kept from the acquire). If a
-- renewal could move the expiry earlier, that stale expiry could outlive the true one, and
-- a lease that had ended (its units admitted to others since) would be written back. With
-- expiries that only grow, any expiry the holder ever learned is at most the true one.


local now = now_ms(ARGV[1])
local head, dem, ent, present, due = acquire_reads(now, ARGV[6], ARGV[3])
local fast = fast_renew(now, head, dem, ent, present, due)
if fast then
  return fast
end
-- end of the fast path

local member, tenant, units, token = 'L' .. ARGV[3], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local purge_limit = tonumber(ARGV[5])
local ctx, err = open_group(now, ARGV[2], {tenant}, head)
if not ctx then return {-1, err[2], 0, 0, 0, '0', 0, err[10], 0} end
-- What the fast path read, as ctx holds it: check_state counts no sentinel again, purge
-- knows whether anything is due, and the demand fields are cached (a loss resets them).
ctx.cache = acquire_cache(tenant, ARGV[3], dem, ent)
ctx.present, ctx.due = present, due
local policy = ctx.policy
local ttl = math.min(tonumber(ARGV[4]), policy.ttl)
check_state(ctx)

local reason = 'renewed'
local held_until  -- the lease's expiry before this renewal
local info = redis.call('HGET', KEYS[4], member)
if info then
  local held_units, held_token, owner = parse_entry(info)
  if owner ~= tenant or held_token ~= token or held_units ~= units then
    purge(ctx, purge_limit)
    flush(ctx, KEY_GRACE_MS)
    return {0, 'fenced', 0, 0, 0, '0', 0, policy.capacity, 0}
  end
  local expiry = redis.call('ZSCORE', KEYS[3], member)
  purge(ctx, purge_limit)
  if not expiry or tonumber(expiry) <= now then
    flush(ctx, KEY_GRACE_MS)
    return {0, 'lost', 0, 0, 0, '0', 0, policy.capacity, 0}
  end
  held_until = tonumber(expiry)
else
  purge(ctx, purge_limit)
  if not policy.recovering or tonumber(ARGV[9]) <= now or not string.match(token, '^%d+$') then
    flush(ctx, KEY_GRACE_MS)
    return {0, 'lost', 0, 0, 0, '0', 0, policy.capacity, 0}
  end
  -- Re-assert: the lease was granted before the state was lost and is live by its own expiry.
  -- Everything re-asserted was admitted together once, so it fits again unless the policy
  -- shrank meanwhile; what no longer fits is lost, never admitted above the capacity.
  local uf = 'u:' .. tenant
  load_fields(ctx, {'g', uf, 'p:' .. tenant})
  local spec = spec_of(ctx, tenant)
  local st = fair_state(ctx)
  if not spec or st.used + units > policy.capacity or units_of(ctx, uf) + units > spec.ceil then
    flush(ctx, KEY_GRACE_MS)
    return {0, 'lost', 0, 0, 0, '0', 0, policy.capacity, 0}
  end
  redis.call('HSET', KEYS[4], member, int(units) .. ':' .. token .. ':' .. tenant)
  add_demand(ctx, tenant, units, 0)
  settle(ctx, fair_state(ctx))
  if policy.fence < tonumber(token) then
    redis.call('HSET', KEYS[1], 'fence', token)
    policy.fence = tonumber(token)
  end
  reason = 'reasserted'
  -- The expiry the holder names, as the lease's, but no later than a renewal now could set:
  -- a forged or stale claim cannot keep units for longer than max_lease_ttl.
  held_until = tonumber(ARGV[9])
  if held_until > now + policy.ttl then held_until = now + policy.ttl end
end

-- Never earlier than the lease's expiry (see the header).
local new_expiry = now + ttl
if held_until > new_expiry then new_expiry = held_until end
schedule(ctx, member, new_expiry)
mark_busy(policy, new_expiry)
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
return {1, reason, new_expiry, over, tenant_used, fmt(limit), st.used, policy.capacity, ttl}
