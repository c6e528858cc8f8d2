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


local ctx = release_ctx(now_ms(ARGV[1]), ARGV[2], ARGV[5])
local reply, settled = fast_release(ctx, ARGV[3], ARGV[5], ARGV[6])
if settled and #redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ctx.now, 'LIMIT', '0', '1') == 0 then
  flush(ctx, KEY_GRACE_MS)
  return reply
end
-- end of the fast path

if not reply then
  reply = release_one(ctx, ARGV[3], ARGV[5], ARGV[6])
elseif not settled then
  add_demand(ctx, ARGV[5], -reply[2], 0)  -- the lease's units, which fast_release left
  settle(ctx, fair_state(ctx))
end
purge(ctx, tonumber(ARGV[4]))
flush(ctx, KEY_GRACE_MS)
return reply
