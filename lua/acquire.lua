-- acquire.lua: admit or refuse a request for units under the group's fair limits (§3, §5).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- KEYS[7] ledger, KEYS[8] ledger_alt  the usage ledger's hour keys (see _ledger.lua)
-- KEYS[9] contend1, KEYS[10] contend2, KEYS[11] contend3, KEYS[12] contend4
--   (rate meters' contention sets, one per meter slot: _metered.lua), passed only when
--   ARGV[11] names meters: a call without meters names exactly the eight keys above
-- ARGV[1] now_ms      pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema      key schema of the caller
-- ARGV[3] tenant      tenant name
-- ARGV[4] units       integer >= 1
-- ARGV[5] lease_id    request id, the tenant's: a retry with the same id, tenant and units
--                     returns the same lease (or keeps the same waiting registration)
-- ARGV[6] ttl_ms      lease lifetime, <= the policy's max_lease_ttl
-- ARGV[7] wait        "1": on refusal, register the units as pending demand
-- ARGV[8] pending_ms  lifetime of that registration unless refreshed by a retry
-- ARGV[9] purge       most expired entries to drop in this call
-- ARGV[10] shadow     "1": shadow mode for this request. A refusal for "tenant_limit" or
--                     "group_full" admits instead, exactly like an admission (lease, token,
--                     units charged), and the reply is status 1 with that refusal's reason.
--                     Nothing else changes: too_large, unknown_tenant, id_mismatch and
--                     recovering still refuse. "0" (or absent): enforce. A refusal by a
--                     rate meter ("meter") admits likewise, its meter charged as a borrow
--                     down to the debt bound (_metered.lua, meter_gate).
-- ARGV[11] meters     rate-meter amounts "name=amount,..." (docs/rates.md), or "": the lease
--                     and every named meter are decided together, all or nothing
--
-- reply: {status, reason, expiry_ms, token, tenant_used, limit, group_used, capacity,
--         retry_ms, version, replay[, meters]}
--   status 1 admitted (reason "admitted", or in shadow mode the would-be refusal's reason),
--   0 refused (reason "too_large" | "tenant_limit" |
--   "group_full" | "unknown_tenant" | "id_mismatch" | "recovering"), -1 error (reason
--   "no_policy" | "schema" | "bad_ttl").
--   limit is a string (%.17g); tenant_used/group_used are after the call; replay is 1 when an
--   earlier attempt with the same lease_id had already been admitted. retry_ms is a hint; for
--   the first QUEUE_PACED waiting requests of the tenant it grows with their place in line.
--   token: fencing token, above every token of the group handed out before (even across a
--   loss of Redis data: at least now_ms x 1000).
--   "meter": the lease fits but a rate meter refused; retry_ms is the longest wait of the
--   refusing meters from their buckets (-1: one can never pass). "bad_meter" (status -1):
--   ARGV[11] names a meter the policy does not have (replay holds its name).
--   meters, when ARGV[11] names any and the lease was decided (admitted, or refused by a
--   meter): nine values per meter in ARGV[11]'s order: name, admitted (1/0), reason
--   ("admitted" | "too_large" | "ceil" | "rate" | "group" | "share"), retry_ms (-1: none),
--   remaining (tokens), reset_ms, path ("rate" | "borrow" | ""), limit (the tenant's ceil
--   in tokens per window), window (s: 1 or 60).
--   "id_mismatch": lease_id names a lease or waiting request of another tenant or another
--   number of units; nothing is charged or registered. "recovering": the group's state was
--   lost while leases may still be live; new work is refused until the recovery window ends
--   (retry_ms is the time left) while holders re-assert their leases (renew.lua).
--
-- Waiting requests of one tenant are served in arrival order: any other request of that tenant
-- must leave room (in the tenant limit and in the group) for the tenant's oldest waiting
-- request, so a large batch is not starved by a stream of small ones.


local now = now_ms(ARGV[1])
local units, ttl = ARGV[4] - 0, ARGV[6] - 0
local head, dem, ent, present, due, first = acquire_reads(now, ARGV[3], ARGV[5])
local fast, limit, group_used, version, capacity = fast_acquire(now, head, dem, ent, present,
  due, ARGV[3], units, ARGV[5], ttl, ARGV[11])
if fast then
  return fast
end
-- end of the fast path
if limit then
  fast = fast_refused(now, head, dem, first, ARGV[3], units, ARGV[7] == '1',
    ARGV[10] == '1', tonumber(ARGV[8]), limit, group_used, version, capacity)
elseif ent[2] then
  fast = fast_waiting(now, head, dem, ent, present, due, first, ARGV[3], units,
    ARGV[5], ttl, ARGV[11], ARGV[7] == '1', ARGV[10] == '1', tonumber(ARGV[8]))
end
if fast then
  return fast
end
-- end of the fast path
if ARGV[11] ~= '' then
  fast = fast_acquire(now, head, dem, ent, present, due, ARGV[3], units, ARGV[5],
    ttl, ARGV[11], fast_meters, ARGV[10] == '1')
end
if fast then
  return fast
end
-- end of the fast path

local ctx, err = open_group(now, ARGV[2], {ARGV[3]}, head)
if not ctx then return err end
ctx.cache, ctx.entries = acquire_cache(ARGV[3], ARGV[5], dem, ent)
ctx.present, ctx.due = present, due

-- Prepared even for a ttl that acquire_one refuses: one request alone and the same request
-- inside acquire_many leave the same state.
check_state(ctx)
purge(ctx, tonumber(ARGV[9]))
local reply = ledger_acquire(ctx, ARGV[3], units, ARGV[5], ttl,
                             ARGV[7] == '1', tonumber(ARGV[8]), ARGV[10] == '1',
                             meter_amounts(ARGV[11]))
flush(ctx, KEY_GRACE_MS)
return reply
