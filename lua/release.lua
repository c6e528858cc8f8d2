-- release.lua: end a lease and credit its units back; idempotent and fenced (§5).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- KEYS[7] ledger, KEYS[8] ledger_alt  the usage ledger's hour keys (see _ledger.lua)
-- ARGV[1] now_ms    pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema    key schema of the caller
-- ARGV[3] lease_id  the lease to end (also withdraws a waiting request of that id)
-- ARGV[4] purge     most expired entries to drop in this call
-- ARGV[5] tenant    the lease's tenant (the owner of the waiting request)
-- ARGV[6] token     the lease's fencing token, decimal ("0" to withdraw a waiting request)
--
-- reply: {state, units}
--   state "released": the lease was live and its units are free again;
--         "expired":  the lease had outlived its expiry (the holder overran its TTL);
--         "unknown":  no such lease (released before, or expired and already purged);
--         "fenced":   lease_id names a lease of another tenant or with another token (or a
--                     waiting request of another tenant): nothing was changed.
--   units: units freed by this call (0 for "unknown" and "fenced").


local now = now_ms(ARGV[1])
local fast, head, ent, dem = fast_release(now, ARGV[3], ARGV[5], ARGV[6])
if fast then
  return fast
end
-- end of the fast path

local ctx = release_ctx(now, ARGV[2], ARGV[5], head)
if ctx.policy then  -- what the fast path read, as ctx holds it (built whole, not grown)
  local id, tenant = ARGV[3], ARGV[5]
  if ent then ctx.entries = {['L' .. id] = ent[1], ['P' .. id] = ent[2]} end
  if dem then
    ctx.cache = {g = dem[1], ['u:' .. tenant] = dem[2], ['p:' .. tenant] = dem[3],
                 ['s:'] = dem[4]}
  end
end
local reply = release_one(ctx, ARGV[3], ARGV[5], ARGV[6])
purge(ctx, tonumber(ARGV[4]))
flush(ctx, KEY_GRACE_MS)
return reply
