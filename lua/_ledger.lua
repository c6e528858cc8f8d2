-- _ledger.lua: the usage ledger (docs/usage.md), per group, hour and tenant: what its leases
-- held and what was refused. Prepended after _codec.lua and before _state.lua (whose purge
-- and flush call it; ledger_acquire, which wraps acquire_one, ends _lib.lua). No
-- KEYS/ARGV/reply header of its own.
--
-- The ledger keys are always the LAST TWO KEYS of a script that ends or refuses leases
-- (acquire, acquire_many, release, release_many, renew): the hour of the caller's clock and
-- the hour next to it that is nearest that clock. The script files under the hour of its own
-- time (Redis TIME, or the pinned clock), so a caller whose clock is less than half an hour
-- off still names the right key at every hour boundary; beyond that, the nearest named hour.
--
-- hash {g}:led:<hour>  (hour = floor(ms / 3,600,000)), fields "<tenant>|<counter>" (the
--   counter never holds '|', so the last '|' splits a field whatever the tenant's name):
--     us           unit·ms held by the leases that ended in this hour (released, expired)
--     rq           leases that ended in this hour
--     tr, ts       tokens reserved / settled (written by the meters through ledger_add)
--     rf:<reason>  refusals (acquire's reasons); a registered waiting request is counted once
--     sh:<reason>  would-be refusals admitted in shadow mode
--   Expiry: the end of its hour plus the group's retention (policy hash field led_ttl, ms;
--   default 7 days), set by the write that creates a field.
-- info hash  S<id>  the lease's admission time (ms), written beside L<id> and dropped with it.

-- Fewer, larger functions on purpose: Redis creates every function of a script as a closure
-- on each call, so the ledger adds five to release and acquire (hour constants inlined).

-- Adds `amount` to a counter of `tenant`, written once at the end of the call (ledger_flush).
local function ledger_note(ctx, tenant, counter, amount)
  if amount == 0 then return end
  local led = ctx.led
  if not led then
    led = {}
    ctx.led = led
  end
  local field = tenant .. '|' .. counter
  led[field] = (led[field] or 0) + amount
end

-- A lease of `units` admitted at `start` (nil: unknown, e.g. admitted by an older release)
-- and living until `expiry` ended at `now`: one lease, min(now, expiry) - start unit·ms.
local function ledger_ended(ctx, tenant, units, start, expiry)
  ledger_note(ctx, tenant, 'rq', 1)
  if start then
    local held = math.min(ctx.now, expiry) - start
    if held > 0 then ledger_note(ctx, tenant, 'us', units * held) end
  end
end

-- Lease `id` of `tenant` ended by release (expiry: its score in exp). Its admission time
-- was read with its entry (prefetch_entries); the caller drops S<id> with L<id>.
local function ledger_released(ctx, id, tenant, units, expiry)
  local start = ctx.entries['S' .. id]
  if start == nil then start = redis.call('HGET', KEYS[4], 'S' .. id) end
  ctx.entries['S' .. id] = false
  ledger_ended(ctx, tenant, units, start and tonumber(start) or nil, expiry)
end

-- Expired leases `dead` (exp members, some "P" waiting registrations) whose info entries are
-- `infos`, about to be dropped by purge: each lease ended at its expiry.
local function ledger_purged(ctx, dead, infos)
  local fields, leases = {}, {}
  for i, member in ipairs(dead) do
    if infos[i] and string.sub(member, 1, 1) == 'L' then
      fields[#fields + 1] = 'S' .. string.sub(member, 2)
      leases[#leases + 1] = i
    end
  end
  if #fields == 0 then return end
  local starts = redis.call('HMGET', KEYS[4], unpack(fields))
  for j, i in ipairs(leases) do
    local units, _, tenant = parse_entry(infos[i])
    local expiry = tonumber(redis.call('ZSCORE', KEYS[3], dead[i]))
    ledger_ended(ctx, tenant, units, tonumber(starts[j]), expiry)
  end
  redis.call('HDEL', KEYS[4], unpack(fields))
end

-- Writes the call's notes to the declared ledger key of its hour (see above), and sets the
-- key's expiry — the end of the hour plus the group's retention (led_ttl, default 7 days) —
-- when a write created a field (HINCRBY answered the amount: every amount is positive), so
-- always when the key is created, not on every write. Relative (PEXPIRE), like every expiry
-- the scripts set: a pinned clock is not the server's.
local function ledger_flush(ctx)
  local led = ctx.led
  if not led then return end
  ctx.led = nil
  local now, key, hour = ctx.now, KEYS[#KEYS - 1], 0
  local want = math.floor(now / 3600000)
  local ha = tonumber(string.match(key, ':led:(%d+)$'))
  local hb = tonumber(string.match(KEYS[#KEYS], ':led:(%d+)$'))
  hour = ha
  if want ~= ha and (want == hb or math.abs(want - hb) < math.abs(want - ha)) then
    key, hour = KEYS[#KEYS], hb
  end
  local created = false
  for field, amount in pairs(led) do
    if redis.call('HINCRBY', key, field, int(amount)) == amount then created = true end
  end
  if created then
    local retention = tonumber(redis.call('HGET', KEYS[1], 'led_ttl')) or 604800000
    redis.call('PEXPIRE', key, int(math.max(1, (hour + 1) * 3600000 + retention - now)))
  end
end

-- Adds `amount` (> 0) to counter `counter` of `tenant` at time `now`, written at once (for
-- callers without a ctx; with one, ledger_note batches the call's counts into one write).
local function ledger_add(now, tenant, counter, amount)
  ledger_flush({now = now, led = {[tenant .. '|' .. counter] = amount}})
end
