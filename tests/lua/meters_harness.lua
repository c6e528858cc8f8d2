-- meters_harness.lua (tests only): runs one function of lua/_meters.lua on states given as ARGV.
--
-- tests/test_rates_differential.py sends the text of lua/_meters.lua followed by this file
-- to EVAL with no keys. Every number travels as a decimal string both ways ('%d' for
-- integers, '%.17g' for doubles), because Redis truncates a Lua number in a reply.
--
-- ARGV[1] op: "decide" | "settle" | "reserve" | "lost"
-- decide:  ARGV[2..6] meter rate, cap, reserve, floor, quantum; ARGV[7..11] share rate,
--          ceil, cap, ccap, weight; ARGV[12] group "level:stamp" or ""; ARGV[13] tenant
--          "own:ceil:stamp:tag" or ""; ARGV[14] amount; ARGV[15] now; ARGV[16] floor or "";
--          ARGV[17] contends "1" | "0"
--   reply: {admitted 0|1, reason, path or "", retry or "", remaining, reset, contending 0|1,
--           level, stamp, own, ceil, tstamp, tag}
-- settle:  ARGV[2..16] as decide, with ARGV[14] path ("rate" | "borrow") and ARGV[15] delta,
--          ARGV[16] now
--   reply: {level, stamp, own, ceil, tstamp, tag, clip_own, clip_ceil, clip_group}
-- lost:    ARGV[2..13] as decide (no states: ARGV[12] and ARGV[13] ""), ARGV[14] since
--   reply: {level, stamp, own, ceil, tstamp, tag, horizon}: meter_lost_group/_tenant at
--          since, and meter_horizon
-- reserve: ARGV[2] record "lease_id|token|estimate|path|final or ''", ARGV[3] action
--          ("settle" | "close"), ARGV[4] lease_id, ARGV[5] token, ARGV[6] actual
--   reply: {record, delta or "", outcome}

local function i(x) return string.format('%d', x) end
local function f(x) return string.format('%.17g', x) end

local function limits()
  local meter = {rate = tonumber(ARGV[2]), cap = tonumber(ARGV[3]), reserve = tonumber(ARGV[4]),
                 floor = tonumber(ARGV[5]), quantum = tonumber(ARGV[6])}
  local share = {rate = tonumber(ARGV[7]), ceil = tonumber(ARGV[8]), cap = tonumber(ARGV[9]),
                 ccap = tonumber(ARGV[10]), weight = tonumber(ARGV[11])}
  local group = nil
  if ARGV[12] ~= '' then
    local level, stamp = string.match(ARGV[12], '^([^:]+):([^:]+)$')
    group = {level = tonumber(level), stamp = tonumber(stamp)}
  end
  local tenant = nil
  if ARGV[13] ~= '' then
    local own, ceil, stamp, tag = string.match(ARGV[13], '^([^:]+):([^:]+):([^:]+):([^:]+)$')
    tenant = {own = tonumber(own), ceil = tonumber(ceil), stamp = tonumber(stamp),
              tag = tonumber(tag)}
  end
  return meter, share, group, tenant
end

local function states(g, t)
  return {i(g.level), i(g.stamp), i(t.own), i(t.ceil), i(t.stamp), f(t.tag)}
end

local op = ARGV[1]
if op == 'decide' then
  local meter, share, group, tenant = limits()
  local floor = nil
  if ARGV[16] ~= '' then floor = tonumber(ARGV[16]) end
  local d = meter_decide(meter, share, group, tenant, tonumber(ARGV[14]), tonumber(ARGV[15]),
                         floor, ARGV[17] == '1')
  local reply = {d.admitted and '1' or '0', d.reason, d.path or '',
                 d.retry and i(d.retry) or '', i(d.remaining), i(d.reset),
                 d.contending and '1' or '0'}
  for _, v in ipairs(states(d.group, d.tenant)) do reply[#reply + 1] = v end
  return reply
elseif op == 'settle' then
  local meter, share, group, tenant = limits()
  local g, t, clipped = meter_settle(meter, share, group, tenant, ARGV[14], tonumber(ARGV[15]),
                                     tonumber(ARGV[16]))
  local reply = states(g, t)
  for _, v in ipairs(clipped) do reply[#reply + 1] = i(v) end
  return reply
elseif op == 'lost' then
  local meter, share = limits()
  local since = tonumber(ARGV[14])
  local reply = states(meter_lost_group(meter, since), meter_lost_tenant(meter, share, since))
  reply[#reply + 1] = i(meter_horizon(meter, share))
  return reply
elseif op == 'reserve' then
  local id, token, estimate, path, final = string.match(ARGV[2],
    '^(.-)|([^|]+)|([^|]+)|([^|]+)|([^|]*)$')
  local record = {lease_id = id, token = tonumber(token), tenant = '', estimate = tonumber(estimate),
                  path = path, final = (final ~= '' and tonumber(final)) or nil}
  local new, delta, outcome
  if ARGV[3] == 'close' then
    new, outcome = meter_close_reservation(record), 'closed'
  else
    new, delta, outcome = meter_settle_reservation(record, ARGV[4], tonumber(ARGV[5]),
                                                   tonumber(ARGV[6]))
  end
  local text = new.lease_id .. '|' .. i(new.token) .. '|' .. i(new.estimate) .. '|' ..
    new.path .. '|' .. (new.final and i(new.final) or '')
  return {text, delta and i(delta) or '', outcome}
end
return redis.error_reply('unknown op ' .. tostring(op))
