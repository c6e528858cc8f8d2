-- _metered.lua: rate meters enforced beside the lease (docs/rates.md), the glue between the
-- pure arithmetic of _meters.lua and a group's keys. Prepended after _meters.lua and before
-- _lib.lua; no KEYS/ARGV/reply header of its own. A script that takes no meter amounts never
-- reaches any of this (link() leaves out what a script cannot call).
--
-- Where it lives (codec in one place, here):
--   policy hash  meters      "name|rate|cap|reserve|floor|quantum|window;..." (slot order,
--                            ticks; window: 1 for a meter per second, 60 per minute)
--                ms:<tenant> "rate|ceil|cap|ccap|weight;..." the tenant's share per slot
--                md          the same for tenants the policy does not list (unknown=default)
--   demand hash  mg:<meter>           "level:stamp"              the group's bucket
--                mu:<meter>:<tenant>  "own:ceil:stamp:tag:until" the tenant's buckets, its
--                                     borrowing tag and the end of its contention (ms)
--   info hash    R<id>  "meter:path:estimate:final;..." the lease's reservations (final
--                       empty until settled); deleted with the lease (release, purge)
--   KEYS[8 + i]  zset   contention of meter slot i: tenant -> tag of borrowers; a member
--                       whose until has passed is dropped when it reaches the head. The
--                       sentinel "~" at +inf (apply_policy.lua) keeps the set in existence:
--                       it is the head only when nobody contends.
--
--   policy hash  mfull       ms: until then a bucket charged may still be below full
--                            (meter_charged); the group's keys outlive it (flush)
--   demand hash  ml          ms: when check_state found the group's state lost with mfull
--                            still ahead: a missing bucket is then at its debt floor since
--                            ml (meter_lost_group/_tenant), not full
--
-- A missing state is a full bucket (_meters.lua), so all of it may expire with the group once
-- mfull has passed (the keys' expiry covers it); the contention sets do not expire (their
-- members are dropped as they end, the sentinel stays). docs/rates.md, "When Redis loses
-- the meters".

local METER_CONTEND_MS = 2000
-- How far past a charge's own horizon mfull is written, so that a busy group writes it about
-- once a minute rather than on every charge.
local METER_FULL_SLACK_MS = 60000

-- "tokens=500,requests=1" -> {{name, amount}, ...} in the given order.
local function meter_amounts(text)
  local out = {}
  if text == nil or text == '' then return out end
  for name, amount in string.gmatch(text, '([^=,]+)=(%d+)') do
    out[#out + 1] = {name = name, amount = tonumber(amount)}
  end
  return out
end

-- One pattern match per meter or share (their fields are never empty): a split into a
-- table of fields costs a metered acquire several times as much.
local METER_LIMITS = '([^|;]+)|([^|;]+)|([^|;]+)|([^|;]+)|([^|;]+)|([^|;]+)|([^|;]+)'
local METER_SHARE = '([^|;]+)|([^|;]+)|([^|;]+)|([^|;]+)|([^|;]+)'

local function meter_parse_shares(text)
  local shares = {}
  for rate, ceil, cap, ccap, weight in string.gmatch(text, METER_SHARE) do
    shares[#shares + 1] = {rate = rate - 0, ceil = ceil - 0, cap = cap - 0, ccap = ccap - 0,
      weight = tonumber(weight)}
  end
  return shares
end

-- The group's meters by name ({slot, limits, window}) and the share table of `tenant` (by
-- slot), read once per call and tenant (the first read is one HMGET for both); nil when the
-- policy has no meters or does not know the tenant.
local function meter_policy(ctx, tenant)
  local shares = ctx.meter_shares and ctx.meter_shares[tenant]
  if ctx.meters == nil then
    ctx.meters, ctx.meter_shares = false, {}
    local raw = redis.call('HMGET', KEYS[1], 'meters', 'md', 'ms:' .. tenant, 'mfull')
    ctx.mfull = raw[4] and raw[4] - 0 or 0
    if raw[1] and raw[1] ~= '' then
      ctx.meters = {}
      local slot = 0
      local each = string.gmatch(raw[1], METER_LIMITS)
      for name, rate, cap, reserve, floor, quantum, window in each do
        slot = slot + 1
        ctx.meters[name] = {slot = slot, limits = {rate = rate - 0, cap = cap - 0,
          reserve = reserve - 0, floor = floor - 0, quantum = tonumber(quantum)},
          window = window - 0}
      end
      ctx.meter_default = raw[2]
      shares = raw[3] and meter_parse_shares(raw[3]) or nil
      if shares then ctx.meter_shares[tenant] = shares end
    end
  end
  if not ctx.meters then return nil, nil end
  if shares == nil then
    local text = redis.call('HGET', KEYS[1], 'ms:' .. tenant)
    if not text and ctx.policy and ctx.policy.unknown == 'default' then
      text = ctx.meter_default
    end
    shares = text and meter_parse_shares(text) or false
    ctx.meter_shares[tenant] = shares
  end
  return ctx.meters, shares or nil
end

-- The first of `amounts` the policy has no meter for (or no share of for this tenant), or nil.
local function meter_unknown(ctx, tenant, amounts)
  local meters, shares = meter_policy(ctx, tenant)
  for _, a in ipairs(amounts) do
    local m = meters and meters[a.name]
    if not m or not shares or not shares[m.slot] then return a.name end
  end
  return nil
end

local function meter_group_state(ctx, name)
  local f = 'mg:' .. name
  load_fields(ctx, {f})
  local v = ctx.cache[f]
  if not v then return nil end
  local level, stamp = string.match(v, '^([^:]+):([^:]+)$')
  return {level = tonumber(level), stamp = tonumber(stamp)}
end

-- The tenant's buckets and the end of its contention (0: never contended).
local function meter_tenant_state(ctx, name, tenant)
  local f = 'mu:' .. name .. ':' .. tenant
  load_fields(ctx, {f})
  local v = ctx.cache[f]
  if not v then return nil, 0 end
  local own, ceil, stamp, tag, till = string.match(v, '^([^:]+):([^:]+):([^:]+):([^:]+):([^:]+)$')
  return {own = tonumber(own), ceil = tonumber(ceil), stamp = tonumber(stamp),
          tag = tonumber(tag)}, tonumber(till)
end

-- When the group's meter state was found lost (check_state writes ml), or nil.
local function meter_lost_since(ctx)
  load_fields(ctx, {'ml'})
  local v = ctx.cache['ml']
  return v and v - 0 or nil
end

-- The group's bucket and the tenant's (with its contention's end) as meter_decide and
-- meter_settle take them: nil for a bucket never used or expired full, its lost state when
-- Redis lost it.
local function meter_states(ctx, limits, share, name, tenant)
  local g = meter_group_state(ctx, name)
  local t, till = meter_tenant_state(ctx, name, tenant)
  if g == nil or t == nil then
    local since = meter_lost_since(ctx)
    if since then
      if g == nil then g = meter_lost_group(limits, since) end
      if t == nil then t = meter_lost_tenant(limits, share, since) end
    end
  end
  return g, t, till
end

-- Records a charge to the buckets of limits/share at ctx.now: until they are all full again
-- the group's keys must not expire (flush makes them outlive mfull), and a loss noticed
-- before then restarts them at the debt floor (check_state).
local function meter_charged(ctx, limits, share)
  local full = ctx.now + meter_horizon(limits, share)
  if full > ctx.mfull then
    ctx.mfull = full + METER_FULL_SLACK_MS
    redis.call('HSET', KEYS[1], 'mfull', int(ctx.mfull))
  end
end

local function meter_put_group(ctx, name, g)
  local f = 'mg:' .. name
  ctx.cache[f] = int(g.level) .. ':' .. int(g.stamp)
  ctx.dirty[f] = true
end

-- Writes the tenant's buckets; `till` is its contention's end. A contender's zset score is
-- kept equal to its tag (the floor is read from the head of the set).
local function meter_put_tenant(ctx, slot, name, tenant, t, till)
  local f = 'mu:' .. name .. ':' .. tenant
  ctx.cache[f] = int(t.own) .. ':' .. int(t.ceil) .. ':' .. int(t.stamp) .. ':' .. fmt(t.tag) ..
    ':' .. int(till)
  ctx.dirty[f] = true
  if till > ctx.now then
    redis.call('ZADD', KEYS[8 + slot], fmt(t.tag), tenant)
  end
end

-- The least tag among the tenants still in contention on meter `name` (nil: none). Heads whose
-- contention has ended are dropped on the way: each member is dropped at most once.
local function meter_floor_of(ctx, slot, name)
  local key = KEYS[8 + slot]
  while true do
    local head = redis.call('ZRANGE', key, 0, 0)
    if not head[1] or head[1] == '~' then return nil end
    local t, till = meter_tenant_state(ctx, name, head[1])
    if t and till > ctx.now then return t.tag end
    redis.call('ZREM', key, head[1])
  end
end

-- Every meter's decision on one request, before anything is committed: {a, m, share, d,
-- till} per amount, in order. The only writes are meter_floor_of's, which drops contenders
-- whose contention has ended: a call that decides again after this one (acquire's fast path
-- for meters leaves a refusal in shadow mode to the general path) finds the same floor.
local function meter_items(ctx, tenant, amounts)
  local meters, shares = meter_policy(ctx, tenant)
  local items, fields = {}, {}
  for _, a in ipairs(amounts) do
    fields[#fields + 1] = 'mg:' .. a.name
    fields[#fields + 1] = 'mu:' .. a.name .. ':' .. tenant
  end
  fields[#fields + 1] = 'ml'
  load_fields(ctx, fields)  -- every meter's states in one HMGET
  for i, a in ipairs(amounts) do
    local m = meters[a.name]  -- checked by meter_unknown
    local share = shares[m.slot]
    local g, t, till = meter_states(ctx, m.limits, share, a.name, tenant)
    -- The floor matters only off the rate path: skip the read when the guarantee serves it.
    local floor = nil
    local need = a.amount * METER_TICKS
    local at = meter_tenant_at(share, t, ctx.now)
    if need > 0 and not (need <= share.cap and at.own >= need and at.ceil >= need) then
      floor = meter_floor_of(ctx, m.slot, a.name)
    end
    local d = meter_decide(m.limits, share, g, t, a.amount, ctx.now, floor,
                           t ~= nil and till > ctx.now)
    items[i] = {a = a, m = m, share = shares[m.slot], d = d, till = till}
  end
  return items
end

-- Commits the decisions meter_items made for one request: all of them, or (on a refusal)
-- only the refusals' contention marks; in shadow mode a refusal is charged as a borrow would
-- be (down to the debt bound) and admitted. Returns ok, the reply rows, the reservation
-- text, the longest retry of the refusing meters (-1: one can never pass).
local function meter_gate(ctx, tenant, items, shadow)
  local all, retry = true, 0
  for _, it in ipairs(items) do
    if not it.d.admitted then
      all = false
      if it.d.retry == nil or retry < 0 then retry = -1 else retry = math.max(retry, it.d.retry) end
    end
  end
  local rows, record = {}, {}
  for _, it in ipairs(items) do
    local d, name, slot = it.d, it.a.name, it.m.slot
    local till = it.till
    if d.contending then till = ctx.now + METER_CONTEND_MS end
    local path = d.path or 'rate'
    if d.admitted and (all or shadow) then
      meter_charged(ctx, it.m.limits, it.share)
      meter_put_group(ctx, name, d.group)
      meter_put_tenant(ctx, slot, name, tenant, d.tenant, till)
    elseif shadow then
      meter_charged(ctx, it.m.limits, it.share)
      local g, t = meter_settle(it.m.limits, it.share, d.group, d.tenant, 'borrow', it.a.amount,
                                ctx.now)
      meter_put_group(ctx, name, g)
      meter_put_tenant(ctx, slot, name, tenant, t, till)
      path = 'borrow'
    elseif not d.admitted and d.contending then
      -- A refused borrower still contends (its tag is where it starts); a meter that would
      -- have admitted writes nothing when another refused.
      meter_put_tenant(ctx, slot, name, tenant, d.tenant, till)
    end
    record[#record + 1] = name .. ':' .. path .. ':' .. int(it.a.amount) .. ':'
    -- The ledger's tokens reserved: the estimate charged at admission (docs/usage.md).
    if name == 'tokens' and (all or shadow) then
      ledger_note(ctx, tenant, 'tr', it.a.amount)
    end
    local r = d.retry
    if r == nil then r = -1 end
    rows[#rows + 1] = name
    rows[#rows + 1] = d.admitted and 1 or 0
    rows[#rows + 1] = d.reason
    rows[#rows + 1] = r
    rows[#rows + 1] = d.remaining
    rows[#rows + 1] = d.reset
    rows[#rows + 1] = d.path or ''
    -- The tenant's ceil in tokens per window (ticks/ms x window x 1000 / 60,000: exact).
    rows[#rows + 1] = it.share.ceil * it.m.window / 60
    rows[#rows + 1] = it.m.window
  end
  return all, rows, table.concat(record, ';'), retry
end

-- Settles the reservations of lease `id` (named by tenant and fencing token) at the actual
-- amounts; returns settle.lua's rows (see its header).
local function meter_settle_lease(ctx, tenant, id, token, actuals)
  local both = redis.call('HMGET', KEYS[4], 'L' .. id, 'R' .. id)  -- the lease, its reservations
  local info = both[1]
  local state = 'open'
  if not info then
    state = 'closed'
  else
    local _, held_token, owner = parse_entry(info)
    if owner ~= tenant or held_token ~= token then
      state = 'mismatch'
    else
      local expiry = redis.call('ZSCORE', KEYS[3], 'L' .. id)
      if not expiry or tonumber(expiry) <= ctx.now then state = 'closed' end
    end
  end
  local records, order = {}, {}
  if state == 'open' then
    local text = both[2] or ''
    for part in string.gmatch(text, '[^;]+') do
      local name, path, estimate, final = string.match(part, '^([^:]+):([^:]+):([^:]+):(.*)$')
      local final_n = nil
      if final ~= '' then final_n = tonumber(final) end
      records[name] = {lease_id = id, token = token, tenant = tenant, path = path,
                       estimate = tonumber(estimate), final = final_n}
      order[#order + 1] = name
    end
  end
  local rows, changed = {}, false
  for _, a in ipairs(actuals) do
    local outcome, delta, clip = state, 0, {0, 0, 0}
    if state == 'open' then
      local record = records[a.name]
      if not record then
        outcome = 'unreserved'
      else
        local new, d, out = meter_settle_reservation(record, id, token, a.amount)
        outcome = out
        if d ~= nil then
          records[a.name], changed, delta = new, true, d
          -- The ledger's tokens settled: the actual amount, once per lease (the first
          -- settlement; a replay or a conflict charges nothing and counts nothing).
          if a.name == 'tokens' then ledger_note(ctx, tenant, 'ts', a.amount) end
          local meters, shares = meter_policy(ctx, tenant)
          local m = meters and meters[a.name]
          if m and shares and shares[m.slot] then
            local g, t, till = meter_states(ctx, m.limits, shares[m.slot], a.name, tenant)
            meter_charged(ctx, m.limits, shares[m.slot])
            local ng, nt, clipped = meter_settle(m.limits, shares[m.slot], g, t, record.path, d,
                                                 ctx.now)
            meter_put_group(ctx, a.name, ng)
            meter_put_tenant(ctx, m.slot, a.name, tenant, nt, till)
            clip = clipped
          end
        end
      end
    end
    rows[#rows + 1] = a.name
    rows[#rows + 1] = outcome
    rows[#rows + 1] = delta
    rows[#rows + 1] = clip[1]
    rows[#rows + 1] = clip[2]
    rows[#rows + 1] = clip[3]
  end
  if changed then
    local parts = {}
    for _, name in ipairs(order) do
      local r = records[name]
      local final = ''
      if r.final ~= nil then final = int(r.final) end
      parts[#parts + 1] = name .. ':' .. r.path .. ':' .. int(r.estimate) .. ':' .. final
    end
    redis.call('HSET', KEYS[4], 'R' .. id, table.concat(parts, ';'))
  end
  return rows
end
