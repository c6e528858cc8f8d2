-- apply_policy.lua: publish one group's policy atomically, keeping its fencing counter.
--
-- KEYS[1] policy  the group's policy hash (no expiry)
-- ARGV[1] schema      key schema of the writer
-- ARGV[2] capacity    integer units
-- ARGV[3] reserve     sum of G*(1-lendable) over listed tenants (%.17g)
-- ARGV[4] unknown     "refuse" | "default"
-- ARGV[5] default     spec "G|lendable|B|weight|max_units" for unknown tenants
-- ARGV[6] ttl_ms      the group's max_lease_ttl in ms
-- ARGV[7] digest      content digest of the group policy (unchanged content: no new version)
-- ARGV[8..] tenant name, spec pairs
--
-- reply: {status, version}
--   status 1 written (version is the new one), 0 unchanged (same digest; current version),
--   -1 the hash was written by a newer schema (version is that schema).

local schema = tonumber(ARGV[1])
local old = redis.call('HMGET', KEYS[1], 'schema', 'version', 'fence', 'digest')
if old[1] and tonumber(old[1]) > schema then return {-1, tonumber(old[1])} end
if old[4] == ARGV[7] then return {0, tonumber(old[2])} end

local version = (tonumber(old[2]) or 0) + 1
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'schema', schema, 'version', version, 'fence', old[3] or 0,
  'digest', ARGV[7], 'C', ARGV[2], 'reserve', ARGV[3], 'unknown', ARGV[4],
  'default', ARGV[5], 'ttl', ARGV[6])
-- HSET in chunks: unpack() of a very long list overflows Lua's C stack.
local batch = {}
for i = 8, #ARGV, 2 do
  batch[#batch + 1] = 't:' .. ARGV[i]
  batch[#batch + 1] = ARGV[i + 1]
  if #batch >= 1000 then
    redis.call('HSET', KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('HSET', KEYS[1], unpack(batch)) end
return {1, version}
