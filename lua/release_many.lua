-- release_many.lua: end several leases of one group in one call, in order.
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- KEYS[7] ledger, KEYS[8] ledger_alt  the usage ledger's hour keys (see _ledger.lua)
-- ARGV[1] now_ms    pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema    key schema of the caller
-- ARGV[3] purge     most expired entries to drop after each release (as release.lua does)
-- ARGV[4..] leases    three values per release: lease_id, tenant, token
--
-- reply: one release.lua reply per release, in order (see release.lua's header); each release
--   behaves exactly as if it had been sent alone right after the ones before it (on
--   release's fast path while it answers them, then together).


local now = now_ms(ARGV[1])
local replies = {}
-- The releases in order, each on release's fast path while it takes it (fast_release), as
-- release.lua alone would decide and write it; the first it does not answer, and every one
-- after, go to the general path below.
local first = 4
while first <= #ARGV and #ARGV - 3 <= 3 * FAST_BATCH do
  local reply = fast_release(now, ARGV[first], ARGV[first + 1], ARGV[first + 2])
  if not reply then break end
  replies[#replies + 1] = reply
  first = first + 3
end
if first > #ARGV then
  return replies
end
-- end of the fast path

local ctx = release_ctx(now, ARGV[2])
local purge_limit = tonumber(ARGV[3])
local ids = {}
for i = first, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
prefetch_entries(ctx, ids)
for i = first, #ARGV, 3 do
  replies[#replies + 1] = release_one(ctx, ARGV[i], ARGV[i + 1], ARGV[i + 2])
  purge(ctx, purge_limit)
end
flush(ctx, KEY_GRACE_MS)
return replies
