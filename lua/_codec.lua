-- _codec.lua: how values are written in a group's keys, in one place (no redis.call).
--
-- policy hash  hdr        "schema|version|C|ttl_ms|unknown|reserve|<default spec>"
--              t:<tenant> spec "G|lendable|B|weight|max_units" (B, max_units may be empty)
--              busy, recover, fence  integers (ms, ms, counter), written by the decisions
--              wide       WIDE (below), so that field lookups do not scan
-- demand hash  u:<t>, p:<t> units held / waiting; g  the group's fair state (pack_state);
--              s: sentinel (see _lib.lua, "State loss"), its value WIDE; rw  the end of the
--              recovery window check_state opened (apply_policy.lua reads it on a restore)
-- info hash    L<id> "units:token:tenant", P<id> "units:seq:tenant"     (entry)
-- queue zset   "<len>:<tenant>|<seq, 16 digits>|<units>|<id>"           (queue_member)
-- fair zset    "l|lo|up|w|tenant" at lo/w, "u|lo|up|w|tenant" at up/w  (point_member);
--              "~" at -1: sentinel; WIDE_MEMBER at -1 (below)
-- exp zset / info hash  also hold the sentinel "s:" (info's with the value WIDE); exp also
--              WIDE_MEMBER, at the sentinel's score

-- The value of the "s:" sentinels of demand and info, and of the policy hash's field "wide":
-- longer than Redis's hash-max-listpack-value (64 bytes by default), so Redis keeps these
-- hashes in its hashtable encoding from their first write. Small hashes (up to
-- hash-max-listpack-entries fields, 128 or 512) are otherwise kept as a listpack, where every
-- field lookup is a linear scan: the info hash of a group with a hundred live leases cost
-- about 100k instructions per acquire and release in scans alone (docs/benchmarks.md). Only
-- the fields' presence is ever read; a value written by an earlier release ("0") is replaced
-- by the next acquire (acquire_reads).
local WIDE = 'kept in hashtable encoding on purpose: longer than hash-max-listpack-value'

-- The same for the zsets exp and fair: a member longer than zset-max-listpack-value (64
-- bytes by default) makes Redis keep the zset in its skiplist encoding. A listpack zset
-- (up to zset-max-listpack-entries members, 128) moves and reallocates its whole blob on every
-- ZADD and ZREM: an acquire's writes to fair and exp cost about 30k instructions more that
-- way, a tenth of the call (docs/benchmarks.md, "Skiplist zsets"). It sits beside each
-- zset's sentinel, with the same score, where no walk, purge or listing reads: those read
-- breakpoints from 0 up, expiries up to now, and "L" members. Nothing depends on its
-- presence: a group whose zsets were created by an earlier release (without it) is served
-- the same, and apply_policy.lua adds it.
local WIDE_MEMBER = 'w:kept in skiplist encoding on purpose: longer than zset-max-listpack-value'

-- Numbers read back: `text - 0` where a script reads a number it wrote itself (or one of
-- Redis's replies). It is Lua's own conversion, the one tonumber makes, with the same result
-- for every text that reads as a number (x - 0 is x, -0 included), but made once: Lua 5.1's
-- tonumber converts the text twice (to test it, then to read it) behind a function call,
-- and those conversions were the largest part of a fast acquire's parsing. Arguments
-- (ARGV) keep tonumber: a malformed one fails as it always did.

-- Constant numbers passed to redis.call are written as text ('0', '1'): Redis formats a
-- number argument with '%.17g' on every call (a few thousand instructions each), which
-- gives the very same text.

-- Numbers written back: %.17g reads back to the same double and never uses an exponent for
-- an integer below 2^53. Most values written are whole (units, the exact sums' parts, most
-- weights), and '%d' prints those with the very same digits at a fraction of the cost of
-- '%.17g' (libc's exact decimal conversion dominates a script's own time otherwise); a
-- negative zero keeps the '%.17g' path ("-0").
local function fmt(x)
  if x == math.floor(x) and x < 2^53 and x > -2^53 and (x ~= 0 or 1 / x > 0) then
    return string.format('%d', x)
  end
  return string.format('%.17g', x)
end

-- An integer as exact decimal text: Redis's Lua prints 10^14 as "1e+14", which no reader
-- parses back. Units and capacity are bounded by 2^50 (ratequota.policy.MAX_UNITS), so every
-- sum the scripts form stays an exact double.
local function int(x)
  return string.format('%d', x)
end

-- Texts parsed before, remembered (docs/design.md, "Remembered parses"). A function
-- library's top-level definitions run once, at FUNCTION LOAD, so a table made here outlives
-- the call: a group's policy header, its tenants' specs, its fair state and its ledger keys'
-- hours are read from the same texts call after call, and parsing them again (a string.match,
-- then each number from its text) was about a fifteenth of an acquire inside Redis. A memo
-- maps a text to what its parse returns, and a parse depends on the text alone, so a hit
-- answers exactly what parsing would, whichever call, group or pod put it there. Headers and
-- specs are kept by their text; a group's state and ledger hours by the group, with the
-- texts they were parsed from, and a hit only when those are the texts read (a group's older
-- states and hours would only fill the memo). Callers get the values, never the stored
-- table. A memo holds at most MEMO_ENTRIES keys, and counts them in its field [0] (no key of
-- a memo is a number): full, it is emptied before it takes another.
--
-- Only the function library keeps them: ratequota/engine/scripts.py turns MEMOS_KEPT on in
-- the library's text alone. By EVALSHA a script's whole text runs on every call, so memos
-- would start empty each time, and making and filling them cost an acquire 13 % more than
-- they saved. There the memos and remember are false, made by no call: the lookups are
-- skipped, and nothing is remembered.
local MEMOS_KEPT = false

local MEMO_ENTRIES = 512

-- Remembers `value` under `key` in memo `t`, emptying `t` first when a new key finds it full.
local remember = MEMOS_KEPT and function(t, key, value)
  if t[key] == nil then
    local n = t[0]
    if n >= MEMO_ENTRIES then
      for k in pairs(t) do t[k] = nil end  -- clearing fields while traversing is allowed
      n = 0
    end
    t[0] = n + 1
  end
  t[key] = value
end

-- spec_fields' answers, by spec text.
local SPECS = MEMOS_KEPT and {[0] = 0}

-- Tenant spec "G|lendable|B|weight|max_units" as numbers: G, lendable, the ceiling G + B,
-- weight, max_units, and keep, the never-lent part G(1-l). Fields rather than a table, for
-- the fast paths (a table costs them more than the arithmetic); parse_spec gathers them.
local function spec_fields(spec)
  local f = SPECS and SPECS[spec]
  if f then return f[1], f[2], f[3], f[4], f[5], f[6] end
  local g, l, b, w, m = string.match(spec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  local guarantee, lendable, weight = g - 0, l - 0, w - 0
  local ceiling = math.huge
  if b ~= '' then ceiling = guarantee + b end
  local max_units = math.huge
  if m ~= '' then max_units = m - 0 end
  local keep = guarantee * (1 - lendable)
  if SPECS then remember(SPECS, spec, {guarantee, lendable, ceiling, weight, max_units, keep}) end
  return guarantee, lendable, ceiling, weight, max_units, keep
end

local function parse_spec(spec)
  local g, l, ceil, w, max_units, keep = spec_fields(spec)
  return {g = g, l = l, ceil = ceil, w = w, max = max_units, keep = keep}
end

-- header_fields' answers, by header text.
local HEADERS = MEMOS_KEPT and {[0] = 0}

-- The policy header's fields after its schema (which the hash's own schema field gives, read
-- before it): version, capacity, max_lease_ttl (ms), unknown, reserve (numbers but unknown)
-- and the default tenant's spec (text). As spec_fields: parse_header gathers them.
local function header_fields(hdr)
  local f = HEADERS and HEADERS[hdr]
  if f then return f[1], f[2], f[3], f[4], f[5], f[6] end
  local version, c, ttl, unknown, reserve, default =
    string.match(hdr, '^%d+|(%d+)|(%d+)|(%d+)|(%a+)|([^|]+)|(.*)$')
  version, c, ttl, reserve = version - 0, c - 0, ttl - 0, reserve - 0
  if HEADERS then remember(HEADERS, hdr, {version, c, ttl, unknown, reserve, default}) end
  return version, c, ttl, unknown, reserve, default
end

-- The policy header, one field so that it and a tenant's spec are one HMGET, with the fields
-- the decisions write that are read beside it (text, or false when absent: busy, recover and
-- fence then read 0), in one table built whole rather than grown.
local function parse_header(hdr, busy, recover, fence, led_ok)
  local version, c, ttl, unknown, reserve, default = header_fields(hdr)
  return {version = version, capacity = c, ttl = ttl,
          unknown = unknown, reserve = reserve, default = default,
          busy = busy and busy - 0 or 0, recover = recover and recover - 0 or 0,
          fence = fence and fence - 0 or 0, led_ok = led_ok}
end

-- A lease ("units:token:tenant") or waiting ("units:seq:tenant") entry.
local function parse_entry(info)
  local u, n, tenant = string.match(info, '^(%d+):(%d+):(.*)$')
  return u - 0, n, tenant
end

local function entry(units, n, tenant)
  return string.format('%d:%d:', units, n) .. tenant  -- int() of both, in one format
end

-- A waiting request's place in its tenant's queue; the length prefix makes the
-- tenant part unambiguous whatever characters the name holds.
local function queue_member(tenant, seq, units, id)
  return string.len(tenant) .. ':' .. tenant .. '|' .. string.format('%016d', tonumber(seq)) ..
    '|' .. int(tonumber(units)) .. '|' .. id
end

-- A breakpoint of the fair zset; both of a tenant's points carry lo, up and w, so a walk
-- that crosses one needs no other read.
local function point_member(kind, lo, up, w, tenant)
  return kind .. '|' .. fmt(lo) .. '|' .. fmt(up) .. '|' .. fmt(w) .. '|' .. tenant
end

-- Both members of one tenant's points ("l|..." and "u|..."), the shared tail built once, from
-- lo, up and w as fmt writes them (write_points formats a number the calls share once).
local function point_members(lo, up, w, tenant)
  local tail = '|' .. lo .. '|' .. up .. '|' .. w .. '|' .. tenant
  return 'l' .. tail, 'u' .. tail
end

local function parse_point(member)
  local kind, lo, up, w, tenant = string.match(member, '^(.)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return kind, tonumber(lo), tonumber(up), tonumber(w), tenant
end

-- The group's fair state (see _state.lua): level, then the exact sums as (h, l) pairs —
-- base, slope, Σlo, Σup, active reserve — then units held by the group.
-- A level of INF (every tenant at its ceiling) is written as -1: Lua 5.3+ cannot read 'inf'.
local function pack_state(st)
  local lam = st.lam
  if lam == math.huge then lam = -1 end
  -- Every field but the level is a whole number below 2^53 (exact_add keeps both halves
  -- whole; units are whole): one '%d' format writes them with fmt's very digits.
  return fmt(lam) .. string.format('|%d|%d|%d|%d|%d|%d|%d|%d|%d|%d|%d', st.bh, st.bl, st.wh,
    st.wl, st.loh, st.lol, st.uph, st.upl, st.kh, st.kl, st.used)
end

-- The sums of a packed state alone, its last seven fields as text (Σlo, Σup, Σ G(1-l) as
-- (h, l) pairs, then units held): what a decision whose level needs no walk reads (_fast.lua,
-- ended_state). EMPTY_STATE is the text of the all-zero state a missing field stands for.
local STATE_SUMS =
  '^[^|]+|[^|]+|[^|]+|[^|]+|[^|]+|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)$'
local EMPTY_STATE = '0|0|0|0|0|0|0|0|0|0|0|0'

-- The last fair state a fast path wrote in each group, by the group's demand key (_fast.lua,
-- ended_state and stored_level): the seven sums' texts, their numbers, the level (INF as
-- math.huge), then the text itself. The group's next decision reads that text, and finds it
-- here; it parses any other (one the general path wrote, pack_state). By the group rather
-- than by the text: a text is written once, so the group's older ones would only fill the
-- memo.
local STATES = MEMOS_KEPT and {[0] = 0}

local function unpack_state(text)
  if not text then
    return {lam = 0, bh = 0, bl = 0, wh = 0, wl = 0, loh = 0, lol = 0, uph = 0, upl = 0,
            kh = 0, kl = 0, used = 0}
  end
  local lam, bh, bl, wh, wl, loh, lol, uph, upl, kh, kl, used = string.match(text,
    '^([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|' ..
    '([^|]+)|([^|]+)$')
  lam = lam - 0
  if lam < 0 then lam = math.huge end
  return {lam = lam, bh = bh - 0, bl = bl - 0, wh = wh - 0, wl = wl - 0, loh = loh - 0,
          lol = lol - 0, uph = uph - 0, upl = upl - 0, kh = kh - 0, kl = kl - 0,
          used = used - 0}
end
