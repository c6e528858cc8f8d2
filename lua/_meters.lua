-- _meters.lua: the rate-meter arithmetic (HTB sharing of a token bucket), a pure library.
--
-- Not a script of its own: it has no KEYS/ARGV/reply header and calls no redis command. A
-- script that enforces meters prepends it (as _lib.lua is prepended) and passes the states
-- it read; every function mirrors the one of the same name in ratequota/rates.py (prefixed
-- meter_ here so it cannot clash with a name of _lib.lua), and
-- tests/test_rates_differential.py holds the two to equality on random steps.
--
-- Buckets count in ticks (60,000 to a token) on Redis time in ms, so every level, rate and
-- wait is an exact integer below 2^53 (ratequota.policy.MAX_METER bounds the policy). Tags
-- (tokens / weight) are doubles, computed with the same operations in the same order as the
-- Python, so both sides round alike.
--
-- Tables:
--   meter  {rate, cap, reserve, floor, quantum}      the group's limits (ticks, ticks/ms)
--   share  {rate, ceil, cap, ccap, weight}           a tenant's limits
--   group  {level, stamp} or nil                     nil: never used, the bucket is full
--   tenant {own, ceil, stamp, tag} or nil            nil: both buckets full, tag 0
-- A state Redis lost is not nil but meter_lost_group / meter_lost_tenant (_metered.lua).

local METER_TICKS = 60000

-- An integer ceiling of a / b for integers a >= 0, b > 0, exact whatever the rounding of a / b.
local function meter_ceil_div(a, b)
  local q = math.floor(a / b)
  while q * b < a do q = q + 1 end
  while q > 0 and (q - 1) * b >= a do q = q - 1 end
  return q
end

-- The integer floor of a / b for an integer a of any sign and b > 0, exact likewise.
local function meter_floor_div(a, b)
  local q = math.floor(a / b)
  while q * b > a do q = q - 1 end
  while (q + 1) * b <= a do q = q + 1 end
  return q
end

local function meter_refill(level, stamp, now, rate, cap)
  if now <= stamp or rate == 0 then return math.min(level, cap) end
  return math.min(cap, level + rate * (now - stamp))
end

local function meter_group_at(meter, state, now)
  if state == nil then return {level = meter.cap, stamp = now} end
  return {level = meter_refill(state.level, state.stamp, now, meter.rate, meter.cap),
          stamp = math.max(state.stamp, now)}
end

local function meter_tenant_at(share, state, now)
  if state == nil then return {own = share.cap, ceil = share.ccap, stamp = now, tag = 0} end
  return {own = meter_refill(state.own, state.stamp, now, share.rate, share.cap),
          ceil = meter_refill(state.ceil, state.stamp, now, share.ceil, share.ccap),
          stamp = math.max(state.stamp, now), tag = state.tag}
end

-- Ms until the group's bucket and both of the tenant's are full again from the debt floor
-- (buckets that never refill have size 0 and are never charged).
local function meter_horizon(meter, share)
  local longest = 0
  if meter.rate > 0 then longest = meter_ceil_div(meter.cap - meter.floor, meter.rate) end
  if share.rate > 0 then
    longest = math.max(longest, meter_ceil_div(share.cap - meter.floor, share.rate))
  end
  if share.ceil > 0 then
    longest = math.max(longest, meter_ceil_div(share.ccap - meter.floor, share.ceil))
  end
  return longest
end

-- The buckets of a state Redis lost, the loss noticed at `since`: at the debt floor then.
local function meter_lost_group(meter, since)
  return {level = meter.floor, stamp = since}
end

local function meter_lost_tenant(meter, share, since)
  local own, ceil = share.cap, share.ccap
  if share.rate > 0 then own = meter.floor end
  if share.ceil > 0 then ceil = meter.floor end
  return {own = own, ceil = ceil, stamp = since, tag = 0}
end

-- Whole ms until a bucket at level refilling at rate holds target; nil: never.
local function meter_ms_until(level, target, rate)
  if level >= target then return 0 end
  if rate <= 0 then return nil end
  return meter_ceil_div(target - level, rate)
end

local function meter_later(a, b)
  if a == nil or b == nil then return nil end
  return math.max(a, b)
end

local function meter_sooner(a, b)
  if a == nil then return b end
  if b == nil then return a end
  return math.min(a, b)
end

local function meter_done(meter, share, g, t, admitted, reason, path, retry, contending)
  local on_borrow = math.min(t.ceil, g.level - meter.reserve)
  local best = math.max(math.min(t.own, t.ceil), on_borrow)
  local remaining = math.max(0, meter_floor_div(best, METER_TICKS))
  local reset = meter_ms_until(t.ceil, share.ccap, share.ceil) or 0
  return {admitted = admitted, reason = reason, path = path, retry = retry,
          remaining = remaining, reset = reset, contending = contending, group = g, tenant = t}
end

-- One meter's decision for `amount` tokens at `now`; floor is the smallest tag of the
-- contending borrowers, this tenant included if it contends (nil: none); contends says
-- whether it does. Returns the table built by meter_done.
local function meter_decide(meter, share, group, tenant, amount, now, floor, contends)
  local g = meter_group_at(meter, group, now)
  local t = meter_tenant_at(share, tenant, now)
  local need = amount * METER_TICKS
  if need == 0 then return meter_done(meter, share, g, t, true, 'admitted', nil, nil, false) end
  local on_rate = need <= share.cap
  local on_borrow = need <= meter.cap - meter.reserve
  if need > share.ccap or not (on_rate or on_borrow) then
    return meter_done(meter, share, g, t, false, 'too_large', nil, nil, false)
  end
  if t.ceil >= need and t.own >= need then
    g = {level = g.level - need, stamp = g.stamp}
    t = {own = t.own - need, ceil = t.ceil - need, stamp = t.stamp, tag = t.tag}
    return meter_done(meter, share, g, t, true, 'admitted', 'rate', nil, false)
  end
  local start = 0
  if contends then
    start = t.tag
  elseif floor ~= nil then
    start = floor
  end
  local lead = 0
  if floor ~= nil then lead = share.weight * (start - floor) end
  local ceil_wait = meter_ms_until(t.ceil, need, share.ceil)
  local rate_wait = nil
  if on_rate then rate_wait = meter_later(meter_ms_until(t.own, need, share.rate), ceil_wait) end
  local fair = lead <= meter.quantum
  local behind = 0
  if not fair then behind = math.ceil((lead - meter.quantum) * METER_TICKS) end
  local borrow_wait = nil
  if on_borrow then
    local group_wait = meter_ms_until(g.level - behind, meter.reserve + need, meter.rate)
    borrow_wait = meter_later(ceil_wait, group_wait)
  end
  if t.ceil < need then
    return meter_done(meter, share, g, t, false, 'ceil', nil,
                      meter_sooner(rate_wait, borrow_wait), false)
  end
  if not on_borrow then
    return meter_done(meter, share, g, t, false, 'rate', nil, rate_wait, false)
  end
  local contended = {own = t.own, ceil = t.ceil, stamp = t.stamp, tag = start}
  if not fair then
    return meter_done(meter, share, g, contended, false, 'share', nil,
                      meter_sooner(rate_wait, borrow_wait), true)
  end
  if g.level - need < meter.reserve then
    return meter_done(meter, share, g, contended, false, 'group', nil,
                      meter_sooner(rate_wait, borrow_wait), true)
  end
  g = {level = g.level - need, stamp = g.stamp}
  t = {own = t.own, ceil = t.ceil - need, stamp = t.stamp, tag = start + amount / share.weight}
  return meter_done(meter, share, g, t, true, 'admitted', 'borrow', nil, true)
end

-- level charged delta ticks (negative: a refund), stopping at floor (debt) or cap (refund);
-- returns the new level and the clipped ticks (> 0 forgiven, < 0 overflowed).
local function meter_charge(level, delta, floor, cap)
  local wanted = level - delta
  local new
  if delta >= 0 then
    new = math.max(wanted, math.min(level, floor))
  else
    new = math.min(wanted, math.max(level, cap))
  end
  return new, new - wanted
end

-- Charges delta tokens (actual - estimate) to the buckets `path` charged; returns the group
-- state, the tenant state and the clipped ticks {own, ceil, group}.
local function meter_settle(meter, share, group, tenant, path, delta, now)
  local g = meter_group_at(meter, group, now)
  local t = meter_tenant_at(share, tenant, now)
  local ticks = delta * METER_TICKS
  local level, clip_g = meter_charge(g.level, ticks, meter.floor, meter.cap)
  local ceil, clip_c = meter_charge(t.ceil, ticks, meter.floor, share.ccap)
  local own, clip_o = t.own, 0
  local tag = t.tag
  if path == 'rate' then
    own, clip_o = meter_charge(t.own, ticks, meter.floor, share.cap)
  else
    tag = t.tag + delta / share.weight
  end
  return {level = level, stamp = g.stamp}, {own = own, ceil = ceil, stamp = t.stamp, tag = tag},
         {clip_o, clip_c, clip_g}
end

-- A lease's reservation on one meter: {lease_id, token, tenant, estimate, path, final|nil}.
-- Returns the new record, the delta to charge (nil: none) and the outcome.
local function meter_settle_reservation(record, lease_id, token, actual)
  if record.lease_id ~= lease_id or record.token ~= token then
    return record, nil, 'mismatch'
  end
  if record.final ~= nil then
    if record.final == actual then return record, nil, 'replay' end
    return record, nil, 'conflict'
  end
  local new = {lease_id = record.lease_id, token = record.token, tenant = record.tenant,
               estimate = record.estimate, path = record.path, final = actual}
  return new, actual - record.estimate, 'settled'
end

local function meter_close_reservation(record)
  if record.final ~= nil then return record end
  return {lease_id = record.lease_id, token = record.token, tenant = record.tenant,
          estimate = record.estimate, path = record.path, final = record.estimate}
end
