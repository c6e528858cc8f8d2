-- _fast.lua: the decisions that need no water-level walk, answered before the general path
-- (docs/design.md, "Fast paths"). Prepended last (see ratequota/engine/scripts.py).
--
-- Redis runs a script's whole text on every call, and every function definition it executes
-- allocates a closure: the general path's library definitions cost as much as a dozen cheap
-- commands. An entry script is therefore linked in two parts: the definitions its fast path
-- reaches, the fast path, then the definitions only the general path needs and the general
-- path. A call the fast path answers returns before the second part runs.
--
-- A fast path decides only what it can decide exactly as the general path would, from the
-- same reads; anything else (a retry, a waiting request, a refusal, a walk, lost state,
-- expired entries to purge, meters) falls through to the general path,
-- which starts from the reads already made. tests/test_fast_paths.py holds the two equal:
-- the same calls with the fast paths switched off (FAST_PATHS, set false only by that test's
-- copy of the scripts) leave the same keys and answer the same replies.

local FAST_PATHS = true

-- Everything an acquire of `tenant` with request id `id` reads before deciding, in six
-- commands: the policy header with the tenant's spec (read_header), the tenant's demand
-- fields with the fair state and demand's sentinel, the id's entries with info's sentinel,
-- the sentinels of exp and fair, and whether any entry is due for purging. Seeds `ctx`
-- (open_group's) with them, so the general path reads none of them again.
local function acquire_reads(now, tenant, id)
  local head = read_header({tenant})
  local uf, pf = 'u:' .. tenant, 'p:' .. tenant
  local dem = redis.call('HMGET', KEYS[2], 'g', uf, pf, 's:')
  local ent = redis.call('HMGET', KEYS[4], 'L' .. id, 'P' .. id, 's:')
  local present = 0
  if dem[4] then present = present + 1 end
  if ent[3] then present = present + 1 end
  -- Sentinels an earlier release wrote ("0"), upgraded to their hashtable-keeping value.
  if dem[4] == '0' then redis.call('HSET', KEYS[2], 's:', WIDE) end
  if ent[3] == '0' then redis.call('HSET', KEYS[4], 's:', WIDE) end
  if redis.call('ZSCORE', KEYS[3], 's:') then present = present + 1 end
  if redis.call('ZSCORE', KEYS[6], FAIR_ANCHOR) then present = present + 1 end
  local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1)
  return head, function(ctx)
    local cache, entries = ctx.cache, ctx.entries
    cache['g'], cache[uf], cache[pf], cache['s:'] = dem[1], dem[2], dem[3], dem[4]
    entries['L' .. id], entries['P' .. id] = ent[1], ent[2]
    ctx.present, ctx.due = present, #due > 0
  end
end

-- Admits a lease that needs no walk, or returns nil for the general path: no meters, the
-- group's state whole and nothing due, no recovery, a new id, a known tenant with nothing
-- waiting, and a request that fits its tenant limit and the group at a level of 0 or INF.
local function fast_acquire(ctx, tenant, units, id, ttl, meters)
  local policy = ctx.policy
  if not FAST_PATHS or meters ~= '' or ctx.present ~= 4 or ctx.due or
      policy.recover > ctx.now or ttl > policy.ttl or ctx.entries['L' .. id] or
      ctx.entries['P' .. id] then
    return nil
  end
  local spec = ctx.specs[tenant]
  if not spec or units_of(ctx, 'p:' .. tenant) > 0 or
      units > math.min(policy.capacity, spec.ceil, spec.max) then
    return nil
  end
  local used, st = units_of(ctx, 'u:' .. tenant), fair_state(ctx)
  local trial = copy_state(st)
  local before, after = change_demand(trial, spec, used, used + units)
  if not level_ends(trial, policy) then return nil end
  local limit = clamp_limit(trial.lam, spec.w, after.lo, after.up)
  if used + units > limit + EPSILON or st.used + units > policy.capacity then return nil end
  -- What check_state would have concluded from four sentinels and no recovery window.
  ctx.whole, policy.recovering = true, false
  hold_trial(ctx, tenant, spec, used, units, trial, before, after)
  local expiry, token = write_lease(ctx, tenant, units, id, ttl, nil)
  return {1, 'admitted', expiry, token, used + units, fmt(limit), trial.used, policy.capacity,
          0, policy.version, 0}
end

-- Ends lease `id` of `tenant` when the call holds its fencing token `token`, as release_one
-- would; nil (nothing done) for anything else: no policy, no such live lease, another
-- owner or token. Returns the reply and whether the level is settled without a walk (when
-- it is not, the general path walks it: the state is otherwise the one release_one leaves).
local function fast_release(ctx, id, tenant, token)
  if not FAST_PATHS or not ctx.policy then return nil end
  prefetch_entries(ctx, {id})
  local info = ctx.entries['L' .. id]
  if not info then return nil end
  local units, held_token, owner = parse_entry(info)
  if owner ~= tenant or held_token ~= token then return nil end
  local reply = end_lease(ctx, id, tenant, units, held_token)
  return reply, level_ends(fair_state(ctx), ctx.policy)
end
