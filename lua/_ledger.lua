-- _ledger.lua: the usage ledger (docs/usage.md), per group, hour and tenant: what its leases
-- held and what was refused. Prepended after _codec.lua and before _state.lua (whose purge
-- and flush call it; ledger_acquire, which wraps acquire_one, ends _lib.lua). No
-- KEYS/ARGV/reply header of its own.
--
-- The ledger keys are KEYS[7] and KEYS[8] of every script that ends, refuses or settles leases
-- (acquire, acquire_many, release, release_many, renew, settle): the hour of the caller's clock and
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
--     ~            a placeholder: both declared keys always exist (see ledger_flush)
--   Expiry: the end of its hour plus the group's retention (policy hash field led_ttl, ms;
--   default 7 days), set by the write that creates a field.

-- Fewer, larger functions on purpose: Redis creates every function of a script as a closure
-- on each call; the ledger adds six to release and acquire (hour constants inlined).

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

-- A lease of `units` whose fencing token is `token` (text or number) and that lived until
-- `expiry` ended at ctx.now: one lease, and min(now, expiry) - admitted unit·ms. The token
-- gives the admission time: it is max(previous token + 1, admission ms x 1000) (next_fence),
-- so floor(token / 1000) is the admission ms unless the group handed out more than 1000
-- tokens in one ms or Redis time went back; then it is later, and the lease is counted short
-- by that much (docs/usage.md). No admission time is stored: nothing to write, to drop with
-- the entry, or to lose, and leases admitted by older releases carry it too.
local function ledger_ended(ctx, tenant, units, token, expiry)
  ledger_note(ctx, tenant, 'rq', 1)
  local held = math.min(ctx.now, expiry) - math.floor(token / 1000)
  if held > 0 then ledger_note(ctx, tenant, 'us', units * held) end
end

-- Expired leases among `dead` (exp members, some "P" waiting registrations) whose info
-- entries are `infos`, about to be dropped by purge: each lease ended at its expiry.
local function ledger_purged(ctx, dead, infos)
  for i, member in ipairs(dead) do
    if infos[i] and string.sub(member, 1, 1) == 'L' then
      local units, token, tenant = parse_entry(infos[i])
      ledger_ended(ctx, tenant, units, token, tonumber(redis.call('ZSCORE', KEYS[3], member)))
    end
  end
end

-- Each group's last pair of ledger keys with their hours, by the group's policy key
-- (_codec.lua, "Texts parsed before, remembered"): {KEYS[7], KEYS[8], hour, hour}.
local HOURS = MEMOS_KEPT and {[0] = 0}

-- The hours of the two declared ledger keys, KEYS[7] and KEYS[8], as their names write them.
local function ledger_hours()
  local a, b = KEYS[7], KEYS[8]
  local m = HOURS and HOURS[KEYS[1]]
  if m and m[1] == a and m[2] == b then return m[3], m[4] end
  local ha, hb = string.match(a, ':led:(%d+)$'), string.match(b, ':led:(%d+)$')
  if HOURS then remember(HOURS, KEYS[1], {a, b, ha, hb}) end
  return ha, hb
end

-- The expiry a declared ledger key takes at time `now`: the end of its hour plus the group's
-- retention (led_ttl, default 7 days). Relative (PEXPIRE), like every expiry the scripts set:
-- a pinned clock is not the server's.
local function ledger_ttl(key, now)
  local hour = tonumber(string.match(key, ':led:(%d+)$'))
  local retention = tonumber(redis.call('HGET', KEYS[1], 'led_ttl')) or 604800000
  return int(math.max(1, (hour + 1) * 3600000 + retention - now))
end

-- Adds the counts `led` (field -> amount > 0) to the declared ledger key of the hour of `now`
-- (see above), setting the key's expiry when a write created a field (HINCRBY answered the
-- amount), so always when the key is created, not on every write. `ha`, `hb`: the keys'
-- hours (ledger_hours), when the caller has them already.
local function ledger_write(now, led, ha, hb)
  if not ha then ha, hb = ledger_hours() end
  local key = KEYS[7]
  local want = math.floor(now / 3600000)
  ha, hb = tonumber(ha), tonumber(hb)
  if want ~= ha and (want == hb or math.abs(want - hb) < math.abs(want - ha)) then
    key = KEYS[8]
  end
  local created = false
  for field, amount in pairs(led) do
    if redis.call('HINCRBY', key, field, int(amount)) == amount then created = true end
  end
  if created then redis.call('PEXPIRE', key, ledger_ttl(key, now)) end
end

-- Adds `amount` (> 0) to counter `counter` of `tenant` at time `now`, written at once (for
-- callers without a ctx; with one, ledger_note batches the call's counts into one write).
local function ledger_add(now, tenant, counter, amount)
  ledger_write(now, {[tenant .. '|' .. counter] = amount})
end

-- Writes the call's notes, then makes sure both declared ledger keys exist (a field "~"):
-- while a Redis Cluster slot migrates, a script whose declared keys exist only in part is
-- refused (TRYAGAIN) for as long as the migration lasts, and the neighbouring hour's key
-- usually holds no data. The pair last made sure of is remembered in the policy hash
-- (led_ok, read with the header), so this costs nothing until the pair changes, twice an
-- hour. Called by flush, at the end of every script that takes the ledger keys.
local function ledger_flush(ctx)
  local ha, hb = ledger_hours()
  if ctx.led then
    ledger_write(ctx.now, ctx.led, ha, hb)
    ctx.led = nil
  end
  local pair = ha .. ':' .. hb  -- the pair of keys this call declares, as led_ok records it
  local policy = ctx.policy
  if policy and policy.led_ok == pair then return end
  for _, key in ipairs({KEYS[7], KEYS[8]}) do
    -- HINCRBY (not HSETNX, which the documented minimal ACL does not grant): 1 when created.
    if redis.call('HINCRBY', key, '~', '1') == 1 then
      redis.call('PEXPIRE', key, ledger_ttl(key, ctx.now))
    end
  end
  if policy then
    redis.call('HSET', KEYS[1], 'led_ok', pair)
    policy.led_ok = pair
  end
end
