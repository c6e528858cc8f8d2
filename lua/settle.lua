-- settle.lua: charge a lease's rate meters the actual amounts it used (reserve, then settle).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue, KEYS[6] fair
-- KEYS[7] ledger, KEYS[8] ledger_alt  the usage ledger's hour keys (see _ledger.lua)
-- KEYS[9] contend1, KEYS[10] contend2, KEYS[11] contend3, KEYS[12] contend4
-- ARGV[1] now_ms    pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema    key schema of the caller
-- ARGV[3] tenant    the lease's tenant
-- ARGV[4] lease_id  the lease
-- ARGV[5] token     the lease's fencing token, decimal
-- ARGV[6] actuals   "name=amount,..." the amounts used, per meter reserved at admission
--
-- reply: {status, reason, rows}
--   status 1 (reason "ok"); -1 error: reason "no_policy" | "schema".
--   rows: six values per meter of ARGV[6], in order: name, outcome, delta, clipped_own,
--   clipped_ceil, clipped_group (ticks, see ratequota.rates.charge). outcome:
--     "settled"    the first settlement: delta = actual - estimate was charged (once) to the
--                  buckets the admission charged, at their levels now;
--     "replay"     settled before at this amount: nothing charged;
--     "conflict"   settled before at another amount: nothing charged;
--     "closed"     the lease ended (released, expired, purged): it keeps its estimate;
--     "mismatch"   the lease is another tenant's or has another token: nothing charged;
--     "unreserved" the lease reserved nothing on that meter: nothing charged.
--   A settlement is idempotent: the reservation's final amount lives in the info hash next
--   to the lease (R<id>) and is deleted with it.

local ctx, err = open_group(now_ms(ARGV[1]), ARGV[2], {}, read_header({}))
if not ctx then return {-1, err[2], err[10]} end
local rows = meter_settle_lease(ctx, ARGV[3], ARGV[4], ARGV[5], meter_amounts(ARGV[6]))
flush(ctx, KEY_GRACE_MS)
return {1, 'ok', rows}
