-- apply_policy.lua: publish one group's policy atomically, keeping its fencing counter and
-- its record of live leases (busy, recover: see _lib.lua).
--
-- KEYS[1] policy  the group's policy hash (no expiry)
-- ARGV[1] schema      key schema of the writer
-- ARGV[2] capacity    integer units
-- ARGV[3] reserve     sum of G*(1-lendable) over listed tenants (%.17g)
-- ARGV[4] unknown     "refuse" | "default"
-- ARGV[5] default     spec "G|lendable|B|weight|max_units" for unknown tenants
-- ARGV[6] ttl_ms      the group's max_lease_ttl in ms
-- ARGV[7] digest      content digest of the group policy (unchanged content: no new version)
-- ARGV[8] now_ms      pinned clock in ms, or "" for Redis TIME
-- ARGV[9] recover_ms  restoring a lost policy: leases granted before the loss may live this
--                     long from now (busy >= now + recover_ms, so the group recovers, see
--                     acquire.lua); "0" when publishing
-- ARGV[10..] tenant name, spec pairs
--
-- reply: {status, version}
--   status 1 written (version is the new one), 0 unchanged (same digest; current version),
--   -1 the hash was written by a newer schema (version is that schema).

local schema = tonumber(ARGV[1])
local old = redis.call('HMGET', KEYS[1], 'schema', 'version', 'fence', 'digest', 'busy', 'recover')
if old[1] and tonumber(old[1]) > schema then return {-1, tonumber(old[1])} end
if old[4] == ARGV[7] then return {0, tonumber(old[2])} end

local version = (tonumber(old[2]) or 0) + 1
local busy = tonumber(old[5]) or 0
local recover_ms = tonumber(ARGV[9])
if recover_ms > 0 then
  local now = tonumber(ARGV[8])
  if ARGV[8] == '' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  busy = math.max(busy, now + recover_ms)
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'schema', schema, 'version', version, 'fence', old[3] or 0,
  'digest', ARGV[7], 'C', ARGV[2], 'reserve', ARGV[3], 'unknown', ARGV[4],
  'default', ARGV[5], 'ttl', ARGV[6], 'busy', string.format('%d', busy),
  'recover', old[6] or 0)
-- HSET in chunks: unpack() of a very long list overflows Lua's C stack.
local batch = {}
for i = 10, #ARGV, 2 do
  batch[#batch + 1] = 't:' .. ARGV[i]
  batch[#batch + 1] = ARGV[i + 1]
  if #batch >= 1000 then
    redis.call('HSET', KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('HSET', KEYS[1], unpack(batch)) end
return {1, version}
