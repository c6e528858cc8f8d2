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
local member = 'L' .. ARGV[3]
local state, units = 'unknown', 0
local info = redis.call('HGET', KEYS[4], member)
if info then
  local u, _, tenant = string.match(info, '^(%d+):(%d+):(.*)$')
  units = tonumber(u)
  local expiry = tonumber(redis.call('ZSCORE', KEYS[3], member))
  state = 'released'
  if expiry <= now then state = 'expired' end
  if redis.call('HINCRBY', KEYS[2], 'u:' .. tenant, -units) <= 0 then
    redis.call('HDEL', KEYS[2], 'u:' .. tenant)
  end
  redis.call('ZREM', KEYS[3], member)
  redis.call('HDEL', KEYS[4], member)
end
-- A caller giving up on a waiting request releases its id: drop the registration.
local wait_info = redis.call('HGET', KEYS[4], 'P' .. ARGV[3])
if wait_info then drop_waiting(ARGV[3], wait_info) end
purge(now, tonumber(ARGV[4]))
return {state, units}
