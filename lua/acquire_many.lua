-- acquire_many.lua: decide several acquire requests of one group in one call, in order.
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- KEYS[7] ledger, KEYS[8] ledger_alt  the usage ledger's hour keys (see _ledger.lua)
-- KEYS[9] contend1, KEYS[10] contend2, KEYS[11] contend3, KEYS[12] contend4
--   (passed only when a request names meters, see acquire.lua)
-- ARGV[1] now_ms      pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema      key schema of the caller
-- ARGV[3] pending_ms  lifetime of a waiting registration unless refreshed by a retry
-- ARGV[4] purge       most expired entries to drop in this call
-- ARGV[5..] requests, seven values each: tenant, units, lease_id, ttl_ms, wait ("1" or "0"),
--           shadow ("1" or "0": acquire.lua's shadow argument), meters (acquire.lua's)
--
-- reply: one acquire.lua reply per request, in order (see acquire.lua's header). Each
--   request is decided as if it had been sent alone right after the ones before it: on
--   acquire's fast path while it answers them, then together, the fixed work (clock,
--   policy, purge, tenant specs, demand) done once for the rest.
--   When the policy is missing or of a newer schema, every request gets that error reply.

local now = now_ms(ARGV[1])
local count = (#ARGV - 4) / 7
local replies = {}
local pending_ms = tonumber(ARGV[3])

-- Request `i` decided on acquire's fast paths from its reads (acquire_reads'), or nil: the
-- admission (fast_acquire; `gate`: fast_meters, without which a request naming meters is
-- not answered), then the refusals (fast_refused, fast_waiting), which never answer a
-- request naming meters (the general path checks its meters' names before any refusal).
local function fast_one(i, gate, head, dem, ent, present, due, exp_first)
  local base = 4 + (i - 1) * 7
  local tenant, units, id = ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 3]
  local ttl, meters = tonumber(ARGV[base + 4]), ARGV[base + 7]
  local reply, limit, group_used, version, capacity = fast_acquire(now, head, dem, ent, present,
    due, tenant, units, id, ttl, meters, gate, ARGV[base + 6] == '1')
  if reply or meters ~= '' then
    return reply
  elseif limit then
    return fast_refused(now, head, dem, exp_first, tenant, units, ARGV[base + 5] == '1',
      ARGV[base + 6] == '1', pending_ms, limit, group_used, version, capacity)
  elseif ent[2] then
    return fast_waiting(now, head, dem, ent, present, due, exp_first, tenant, units, id, ttl,
      meters, ARGV[base + 5] == '1', ARGV[base + 6] == '1', pending_ms)
  end
  return nil
end

-- The requests in order, each on acquire's fast paths while they take them: a request they
-- answer is decided and written exactly as acquire.lua alone would, right after the ones
-- before it. The first they do not answer, and every one after, go to the general path
-- below, which reads the state those left.
local first = 1
local head, dem, ent, present, due, exp_first
while first <= count and count <= FAST_BATCH do
  local base = 4 + (first - 1) * 7
  head, dem, ent, present, due, exp_first = acquire_reads(now, ARGV[base + 1], ARGV[base + 3])
  replies[first] = fast_one(first, nil, head, dem, ent, present, due, exp_first)
  if not replies[first] then break end
  first = first + 1
end
if first > count then
  return replies
end
-- end of the fast path

-- A small batch stopped at a request naming meters goes on with acquire's fast path for
-- meters (linked here: a batch without meters never creates its closures), from that
-- request's reads.
if count <= FAST_METER_BATCH and ARGV[4 + (first - 1) * 7 + 7] ~= '' then
  while true do
    replies[first] = fast_one(first, fast_meters, head, dem, ent, present, due, exp_first)
    if not replies[first] then break end
    first = first + 1
    if first > count then break end
    local base = 4 + (first - 1) * 7
    head, dem, ent, present, due, exp_first = acquire_reads(now, ARGV[base + 1], ARGV[base + 3])
  end
end
if first > count then
  return replies
end
-- end of the fast path

local names, ids, fields = {}, {}, {'g'}
for i = first, count do
  local base = 4 + (i - 1) * 7
  names[#names + 1], ids[#ids + 1] = ARGV[base + 1], ARGV[base + 3]
  fields[#fields + 1] = 'u:' .. ARGV[base + 1]
  fields[#fields + 1] = 'p:' .. ARGV[base + 1]
end
local ctx, err = open_group(now, ARGV[2], names, read_header(names))
if not ctx then
  for i = first, count do replies[i] = err end
  return replies
end
check_state(ctx)
purge(ctx, tonumber(ARGV[4]))
prefetch_entries(ctx, ids)
load_fields(ctx, fields)
for i = first, count do
  local base = 4 + (i - 1) * 7
  replies[i] = ledger_acquire(ctx, ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 3],
                              tonumber(ARGV[base + 4]), ARGV[base + 5] == '1', pending_ms,
                              ARGV[base + 6] == '1', meter_amounts(ARGV[base + 7]))
end
flush(ctx, KEY_GRACE_MS)
return replies
