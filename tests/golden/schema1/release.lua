-- release.lua: end a lease and credit its units back; idempotent (§5).
--
-- KEYS[1] policy, KEYS[2] demand, KEYS[3] exp, KEYS[4] info, KEYS[5] queue   (one group, one slot)
-- ARGV[1] now_ms    pinned clock in ms, or "" for Redis TIME
-- ARGV[2] schema    key schema of the caller
-- ARGV[3] lease_id  the lease to end (also withdraws a waiting request of that id)
-- ARGV[4] purge     most expired entries to drop in this call
--
-- reply: {state, units}
--   state "released": the lease was live and its units are free again;
--         "expired":  the lease had outlived its expiry (the holder overran its TTL);
--         "unknown":  no such lease (released before, or expired and already purged).
--   units: units freed by this call (0 for "unknown").

local now = now_ms(ARGV[1])
local reply = release_one(now, ARGV[3])
purge(now, tonumber(ARGV[4]))
return reply
