-- _lib.lua: lease operations shared by the group scripts; prepended after _fair.lua,
-- _codec.lua and _state.lua (see ratequota/engine/scripts.py). No KEYS/ARGV/reply header
-- of its own: the keys are listed in _state.lua.
--
-- State loss (docs/design.md, "Recovery"): demand, exp and info each hold a sentinel member
-- "s:" while the group is in use, and fair its "~", so none of them is ever empty; a key that
-- is missing while another exists, or all missing while the policy's busy (the latest expiry
-- ever granted) is still ahead, means Redis lost the group's state with leases possibly live.
-- The group then recovers until that expiry: renewals re-assert their leases, new work is
-- refused.

local KEY_GRACE_MS = 120000
local NEXT_IN_LINE_RETRY_MS = 20
local QUEUE_PACED = 8
-- Score of the exp sentinel: above any expiry, so purges never reach it (2^53 - 1).
local SENTINEL_SCORE = '9007199254740991'

-- Redis time in ms, unless the caller pins the clock (tests and simulations).
local function now_ms(pinned)
  if pinned ~= nil and pinned ~= '' then
    return tonumber(pinned)
  end
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- The policy header's fields and the specs of `names`, in one HMGET (for open_group).
local function read_header(names)
  -- The schema field first: a newer release may write its header differently.
  local fields = {'schema', 'hdr', 'busy', 'recover', 'fence', 'led_ok'}
  for i, name in ipairs(names) do fields[i + 6] = 't:' .. name end
  return redis.call('HMGET', KEYS[1], unpack(fields))
end

-- The policy header and the specs of `names` from `raw`, read_header's reply (the caller reads
-- it: acquire's fast path with its other reads, without linking read_header); nil plus an
-- error reply when the group has no policy or one written by a newer schema.
local function open_group(now, schema, names, raw)
  if not raw[1] then
    return nil, {-1, 'no_policy', 0, 0, 0, '0', 0, 0, 0, 0, 0}
  end
  if raw[1] - 0 > tonumber(schema) then
    return nil, {-1, 'schema', 0, 0, 0, '0', 0, 0, 0, tonumber(raw[1]), 0}
  end
  local policy = parse_header(raw[2], raw[3], raw[4], raw[5], raw[6])
  local ctx = open_ctx(now, policy)
  for i, name in ipairs(names) do
    if ctx.specs[name] == nil then  -- a batch may name a tenant many times
      local spec = raw[i + 6]
      if not spec and policy.unknown == 'default' then spec = policy.default end
      ctx.specs[name] = spec and parse_spec(spec) or false
    end
  end
  return ctx, nil
end

-- The next fencing token, recorded with (when given) a new lease expiry: busy records that a
-- lease may live until then (the policy hash outlives lost state). Both are written back by
-- flush, once per call however many leases the call grants (acquire_many).
-- A token is above every token handed out before, even after Redis lost the counter: the
-- floor is Redis time in ms x 1000, which grows by 1000 per ms, so tokens never go back
-- across a loss unless the group handed out more than 1000 tokens per ms for longer than
-- the outage lasted (or the server's clock went back). Exact in doubles until 2255.
-- token_after: the token itself, from the counter `fence` (acquire's fast path, which keeps
-- the counter in a local).
local function token_after(fence, now)
  local floor = now * 1000
  if fence + 1 > floor then return fence + 1 end
  return floor
end

local function next_fence(policy, now, expiry)
  local token = token_after(policy.fence, now)
  policy.fence, policy.fence_dirty = token, true
  if expiry and expiry > policy.busy then policy.busy, policy.busy_dirty = expiry, true end
  return token
end

-- Records that a lease may live until `expiry` (a renewal: no new token), written by flush.
local function mark_busy(policy, expiry)
  if expiry > policy.busy then policy.busy, policy.busy_dirty = expiry, true end
end

-- How many of demand, exp, info and fair still hold their sentinel (4: the state is whole).
-- HGET/ZSCORE rather than EXISTS: the documented minimal ACL already allows them, and a key
-- written without a sentinel counts as missing (so state is never trusted unless this
-- release saw it whole).
local function sentinels()
  local present = 0
  if redis.call('HGET', KEYS[2], 's:') then present = present + 1 end
  if redis.call('ZSCORE', KEYS[3], 's:') then present = present + 1 end
  if redis.call('HGET', KEYS[4], 's:') then present = present + 1 end
  if redis.call('ZSCORE', KEYS[6], FAIR_ANCHOR) then present = present + 1 end
  return present
end

-- The end of the recovery window if the group's state is found lost now, or the one already
-- open (0: none). Read-only (snapshot.lua); see check_state for the rule.
local function recovery_until(policy, now)
  if policy.recover > now then return policy.recover end
  local present = sentinels()
  if present < 4 and (present > 0 or policy.busy > now) then return policy.busy end
  return 0
end

-- Detects lost state and opens the recovery window; writes the sentinels of a fresh group.
-- Sets policy.recovering. A partial loss (some keys evicted) drops the rest, the fair state
-- with it: the holders re-assert what is still live, which rebuilds everything consistently.
-- ctx.present, when set: the sentinels the call has counted already (acquire_reads).
local function check_state(ctx)
  local policy, now = ctx.policy, ctx.now
  local present = ctx.present or sentinels()
  if present < 4 then
    if present > 0 or policy.busy > now then
      redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
      if policy.busy > policy.recover then
        redis.call('HSET', KEYS[1], 'recover', int(policy.busy))
        policy.recover = policy.busy
      end
    end
    -- rw: the window's end, kept with the re-created state too: the policy hash that holds
    -- `recover` can be lost on its own, and a restored policy then reads it (apply_policy.lua).
    if policy.recover > now then
      redis.call('HSET', KEYS[2], 's:', WIDE, 'rw', int(policy.recover))
    else
      redis.call('HSET', KEYS[2], 's:', WIDE)
    end
    redis.call('ZADD', KEYS[3], SENTINEL_SCORE, 's:', SENTINEL_SCORE, WIDE_MEMBER)
    redis.call('HSET', KEYS[4], 's:', WIDE)
    redis.call('ZADD', KEYS[6], -1, FAIR_ANCHOR, -1, WIDE_MEMBER)
    ctx.cache, ctx.entries, ctx.st = {}, {}, nil
    ctx.touch = true
    -- Meter buckets charged before the loss may not be full yet: until mfull they restart at
    -- their debt floor from now (ml, _metered.lua), and the keys outlive mfull (flush).
    local mfull = redis.call('HGET', KEYS[1], 'mfull')
    if mfull and mfull - 0 > now then
      ctx.mfull = mfull - 0
      ctx.cache['ml'], ctx.dirty['ml'] = int(now), true
    end
  else
    ctx.whole = true  -- the four keys existed, each with the expiry flush last gave them all
  end
  policy.recovering = policy.recover > now
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
local function drop_waiting(ctx, id, info)
  local units, seq, tenant = parse_entry(info)
  redis.call('ZREM', KEYS[5], queue_member(tenant, seq, units, id))
  redis.call('ZREM', KEYS[3], 'P' .. id)
  redis.call('HDEL', KEYS[4], 'P' .. id)
  ctx.entries['P' .. id] = false
  add_demand(ctx, tenant, 0, -units)
end

-- A tenant's limit at the state's level (no walk: the level is already the one for it).
local function limit_at(st, spec, d)
  local lo, up = claim_bounds(spec.keep, spec.g, spec.ceil, d)
  return clamp_limit(st.lam, spec.w, lo, up)
end

-- Commits a trial decision that admits `units` for `tenant`, none of them waiting before:
-- the trial, whose demand counted them, is exactly the new state.
local function hold_trial(ctx, tenant, spec, used, units, trial, before, after)
  set_units(ctx, 'u:' .. tenant, used + units)
  trial.used = trial.used + units
  ctx.st, ctx.st_dirty = trial, true
  move_points(ctx, tenant, spec.w, before, after)
end

-- Writes an admitted lease: its fencing token, expiry and entry (and, when metered, its
-- meter reservations). Returns the expiry and the token.
local function write_lease(ctx, tenant, units, id, ttl, meter_record)
  local expiry, member = ctx.now + ttl, 'L' .. id
  local token = next_fence(ctx.policy, ctx.now, expiry)
  local info = entry(units, token, tenant)
  schedule(ctx, member, expiry)
  redis.call('HSET', KEYS[4], member, info)
  ctx.entries[member] = info
  ctx.touch = true
  if meter_record then redis.call('HSET', KEYS[4], 'R' .. id, meter_record) end
  return expiry, token
end

-- Decides one request (§3) and records it; returns acquire.lua's reply (see its header).
local function acquire_one(ctx, tenant, units, id, ttl, wait, pending_ms, shadow, amounts)
  local policy, now = ctx.policy, ctx.now
  if ttl > policy.ttl then
    return {-1, 'bad_ttl', 0, 0, 0, '0', 0, policy.capacity, 0, policy.version, policy.ttl}
  end
  local lease_member, wait_member = 'L' .. id, 'P' .. id
  prefetch_entries(ctx, {id})
  local uf, pf = 'u:' .. tenant, 'p:' .. tenant
  load_fields(ctx, {'g', uf, pf})
  local st = fair_state(ctx)
  local tenant_used, tenant_waiting = units_of(ctx, uf), units_of(ctx, pf)

  -- A request id is the tenant's: a retry must repeat the original request (same tenant,
  -- same units) to be answered by it; anything else is refused and changes nothing.
  local known = ctx.entries[lease_member]
  local wait_info = ctx.entries[wait_member]
  local already_waiting = wait_info ~= false and wait_info ~= nil
  local original = known or (already_waiting and wait_info) or nil
  if original then
    local u, _, owner = parse_entry(original)
    if owner ~= tenant or u ~= units then
      return {0, 'id_mismatch', 0, 0, tenant_used, '0', st.used, policy.capacity, 0,
              policy.version, 0}
    end
  end

  -- Idempotency: the first attempt committed and its reply was lost.
  if known then
    local _, token = parse_entry(known)
    local expiry = redis.call('ZSCORE', KEYS[3], lease_member)
    return {1, 'admitted', tonumber(expiry), tonumber(token), tenant_used, '0', st.used,
            policy.capacity, 0, policy.version, 1}
  end

  local spec = spec_of(ctx, tenant)
  if not spec then
    return {0, 'unknown_tenant', 0, 0, tenant_used, '0', st.used, policy.capacity, 0,
            policy.version, 0}
  end
  local metered = amounts ~= nil and #amounts > 0
  if metered then  -- rate meters (_metered.lua): every name must be one of the policy's
    local bad = meter_unknown(ctx, tenant, amounts)
    if bad then return {-1, 'bad_meter', 0, 0, 0, '0', 0, policy.capacity, 0, policy.version, bad} end
  end
  if units <= math.min(policy.capacity, spec.ceil, spec.max) and policy.recovering then
    -- Leases granted before the state was lost may still run: admit nothing new until the
    -- last of them has certainly ended; their holders' renewals re-assert them meanwhile.
    return {0, 'recovering', 0, 0, tenant_used, '0', st.used, policy.capacity,
            policy.recover - now, policy.version, 0}
  end

  -- The limit with this request's units counted in the demand: the level moves only when
  -- they were not counted already (a retry of a registered waiting request).
  local d0 = tenant_used + tenant_waiting
  local limit, trial, before, after = nil, nil, nil, nil
  if already_waiting then
    limit = limit_at(st, spec, d0)
  else
    trial = copy_state(st)
    before, after = change_demand(trial, spec, d0, d0 + units)
    settle(ctx, trial, {tenant = tenant, pts = points_of(tenant, spec.w, after)})
    limit = clamp_limit(trial.lam, spec.w, after.lo, after.up)
  end

  local reserve = 0
  if tenant_waiting > 0 then  -- only a tenant with waiting requests has a queue
    local head = queue_front(tenant, 1)[1]
    if head and head[2] ~= id then reserve = head[1] end
  end

  local reason = 'admitted'
  if units > math.min(policy.capacity, spec.ceil, spec.max) then
    reason = 'too_large'
  elseif tenant_used + units + reserve > limit + EPSILON then
    reason = 'tenant_limit'
  elseif st.used + units + reserve > policy.capacity then
    reason = 'group_full'
  end

  -- Shadow mode: the decision is made in full, and a refusal for the tenant's limit or the
  -- group's capacity admits anyway (a real lease), answered with that refusal's reason.
  local shadowed = false
  if shadow and (reason == 'tenant_limit' or reason == 'group_full') then
    shadowed, reason = reason, 'admitted'
  end

  if reason ~= 'admitted' then
    local retry_ms = pending_ms
    local first = redis.call('ZRANGE', KEYS[3], '0', '0', 'WITHSCORES')
    if first[2] then retry_ms = math.max(1, math.min(retry_ms, tonumber(first[2]) - now)) end
    if wait and reason ~= 'too_large' then
      schedule(ctx, wait_member, now + pending_ms)
      if not already_waiting then
        -- The fencing counter doubles as the arrival sequence: monotonic, kept across policies.
        local seq = next_fence(policy, now)
        local info = entry(units, seq, tenant)
        redis.call('HSET', KEYS[4], wait_member, info)
        redis.call('ZADD', KEYS[5], '0', queue_member(tenant, seq, units, id))
        ctx.entries[wait_member] = info
        -- The trial is exactly the new state: its demand counted these units.
        set_units(ctx, pf, tenant_waiting + units)
        ctx.st, ctx.st_dirty = trial, true
        move_points(ctx, tenant, spec.w, before, after)
      end
      ctx.touch, ctx.touch_queue = true, true
      -- The front of the line retries soon, paced by position: the head may fit at the next
      -- release, and each waiter behind it moves up as the ones ahead are admitted.
      for position, e in ipairs(queue_front(tenant, QUEUE_PACED)) do
        if e[2] == id then
          retry_ms = math.min(retry_ms, NEXT_IN_LINE_RETRY_MS * math.max(1, position - 1))
        end
      end
    end
    return {0, reason, 0, 0, tenant_used, fmt(limit), st.used, policy.capacity, retry_ms,
            policy.version, 0}
  end

  -- Rate meters decide with the lease, all or nothing (docs/rates.md): a refusing meter
  -- refuses the lease and writes only its contention mark; in shadow mode it admits.
  local meter_rows, meter_record = nil, nil
  if metered then
    local ok, rows, record, retry = meter_gate(ctx, tenant, meter_items(ctx, tenant, amounts),
                                              shadow)
    if not ok and not shadow then
      return {0, 'meter', 0, 0, tenant_used, fmt(limit), st.used, policy.capacity, retry,
              policy.version, 0, rows}
    end
    if not ok then shadowed = shadowed or 'meter' end
    meter_rows, meter_record = rows, record
  end

  if already_waiting then
    -- The registration is this request's own (same tenant, same units): its units move from
    -- waiting to held, the tenant's demand and so the level stay as they are.
    drop_waiting(ctx, id, wait_info)
    add_demand(ctx, tenant, units, 0)
    settle(ctx, fair_state(ctx))
  else
    hold_trial(ctx, tenant, spec, tenant_used, units, trial, before, after)
  end

  local expiry, token = write_lease(ctx, tenant, units, id, ttl, meter_record)
  return {1, shadowed or 'admitted', expiry, token, tenant_used + units, fmt(limit),
          ctx.st.used, policy.capacity, 0, policy.version, 0, meter_rows}
end

-- Ends the live lease `id` of `tenant` (`units`, fencing token `token` as stored): ledger,
-- expiry and entry, but not yet its demand (end_lease). release.lua's reply.
local function close_lease(ctx, id, tenant, units, token)
  local member = 'L' .. id
  load_fields(ctx, {'g', 'u:' .. tenant, 'p:' .. tenant, 's:'})
  -- No expiry while the entry is there: exp was lost (evicted), and the next acquire or renew
  -- opens the recovery window (check_state). The holder still gives its units back now.
  local expiry = tonumber(redis.call('ZSCORE', KEYS[3], member))
  local state = 'released'
  if not expiry then
    expiry = ctx.now
  elseif expiry <= ctx.now then
    state = 'expired'
  end
  ledger_ended(ctx, tenant, units, token, expiry)
  redis.call('ZREM', KEYS[3], member)
  redis.call('HDEL', KEYS[4], member, 'R' .. id)  -- R: its meter reservations, if any
  ctx.entries[member] = false
  return {state, units}
end

-- close_lease and the lease's demand given back; the caller settles the level.
local function end_lease(ctx, id, tenant, units, token)
  local reply = close_lease(ctx, id, tenant, units, token)
  add_demand(ctx, tenant, -units, 0)
  return reply
end

-- Ends lease `id` of `tenant` whose fencing token is `token` (text, as stored), and withdraws
-- a waiting request of that id and tenant; release.lua's reply. An entry of that id owned by
-- another tenant, or a lease with another token, is left alone: reply "fenced".
local function release_one(ctx, id, tenant, token)
  local member = 'L' .. id
  prefetch_entries(ctx, {id})
  local info, wait_info = ctx.entries[member], ctx.entries['P' .. id]
  if info then
    local units, held_token, owner = parse_entry(info)
    if owner ~= tenant or held_token ~= token then return {'fenced', 0} end
    local reply = end_lease(ctx, id, tenant, units, held_token)
    settle(ctx, fair_state(ctx))
    -- A waiting registration under a live lease's id cannot exist (admission drops it).
    return reply
  end
  -- A caller giving up on a waiting request releases its id: drop the registration.
  if wait_info then
    local _, _, owner = parse_entry(wait_info)
    if owner ~= tenant then return {'fenced', 0} end
    load_fields(ctx, {'g', 'u:' .. tenant, 'p:' .. tenant, 's:'})
    drop_waiting(ctx, id, wait_info)
    settle(ctx, fair_state(ctx))
  end
  return {'unknown', 0}
end

-- Release works whatever the policy says (units must always come back): without a policy
-- of this schema it still frees the units, and apply_policy rebuilds the fair state.
-- `tenant` (optional): whose spec to read in the same HMGET as the header; `raw` (optional):
-- that HMGET's reply, already read (release's fast path).
local function release_ctx(now, schema, tenant, raw)
  if not raw and tenant then
    raw = redis.call('HMGET', KEYS[1], 'schema', 'hdr', 'busy', 'recover', 'fence', 'led_ok',
      't:' .. tenant)
  elseif not raw then
    raw = redis.call('HMGET', KEYS[1], 'schema', 'hdr', 'busy', 'recover', 'fence', 'led_ok')
  end
  if raw[1] and raw[2] and raw[1] - 0 <= tonumber(schema) then
    local ctx = open_ctx(now, parse_header(raw[2], raw[3], raw[4], raw[5], raw[6]))
    local policy = ctx.policy
    if tenant then
      local spec = raw[7]
      if not spec and policy.unknown == 'default' then spec = policy.default end
      ctx.specs[tenant] = spec and parse_spec(spec) or false
    end
    return ctx
  end
  return open_ctx(now, nil)
end

-- acquire_one, its decision counted in the ledger (_ledger.lua): a refusal as rf:<reason>
-- (not again for a request already registered as waiting), a shadow admission as sh:<reason>.
local function ledger_acquire(ctx, tenant, units, id, ttl, wait, pending_ms, shadow, amounts)
  prefetch_entries(ctx, {id})
  local registered = ctx.entries['P' .. id]
  local reply = acquire_one(ctx, tenant, units, id, ttl, wait, pending_ms, shadow, amounts)
  if reply[1] == 0 and not registered then
    ledger_note(ctx, tenant, 'rf:' .. reply[2], 1)
  elseif reply[1] == 1 and reply[2] ~= 'admitted' then
    ledger_note(ctx, tenant, 'sh:' .. reply[2], 1)
  end
  return reply
end
