-- _state.lua: the group's incremental fair state and the reads and writes around it.
--
-- Every group script receives the same six keys (see ratequota/keys.py):
--   KEYS[1] policy  hash  hdr, schema, version, digest, fence, t:<tenant> (see _codec.lua)
--   KEYS[2] demand  hash  u:<tenant> units held, p:<tenant> units waiting, g the fair state
--                         (and the rate meters' buckets: _metered.lua)
--   KEYS[3] exp     zset  L<lease id> / P<request id> -> expiry, ms of Redis time
--   KEYS[4] info    hash  L<id> -> "units:token:tenant", P<id> -> "units:seq:tenant"
--   KEYS[5] queue   zset  waiting requests in arrival order per tenant (lex members)
--   KEYS[6] fair    zset  breakpoints lo/w and up/w of every active tenant with up > lo
--
-- The fair state `st` (field g) holds, for the committed demand of the group: the level
-- `lam` (0: every tenant at its floor; INF: every tenant at its ceiling), the exact sums
-- Σlo, Σup and Σ G(1-l) over the active tenants, and at `lam` the split of the sum of limits
-- into base (floors of tenants below lam, ceilings of tenants above it) and slope (weights
-- of tenants whose limit is lam*w), so that Σ clamp(x*w, lo, up) = base + x*slope between
-- `lam` and its neighbouring breakpoints. A change of one tenant's demand moves its own
-- terms in O(1) and its two points in the zset; the new level is found by walking only the
-- breakpoints between the old level and the new one (walk below). docs/design.md argues
-- exactness and the worst case.

local PAGE = 64
-- The first page of a walk: most walks stop before the first score they meet.
local FIRST_PAGE = 4
-- The fair zset's sentinel (score -1, below every breakpoint, never walked): like the "s:"
-- members of demand, exp and info it is there while the group is in use, so a lost key is
-- seen (_lib.lua, check_state), and in a Redis Cluster no script meets a partly missing
-- group (answered TRYAGAIN for as long as a slot migration lasts).
local FAIR_ANCHOR = '~'

-- A call's view of the group: the policy, the clock, and a write-back cache of the demand
-- hash, so that a batch of decisions reads each field once and writes it once.
local function open_ctx(now, policy)
  return {now = now, policy = policy, cache = {}, dirty = {}, specs = {}, entries = {},
          moved = {}, st = nil, st_dirty = false, touch = false,
          touch_queue = false, whole = false}
end

-- Loads the demand-hash fields not cached yet, in one HMGET.
local function load_fields(ctx, fields)
  local missing = {}
  for _, f in ipairs(fields) do
    if ctx.cache[f] == nil then missing[#missing + 1] = f end
  end
  if #missing == 0 then return end
  local values = redis.call('HMGET', KEYS[2], unpack(missing))
  for i, f in ipairs(missing) do ctx.cache[f] = values[i] or false end
end

local function units_of(ctx, field)
  local v = ctx.cache[field]
  if v == nil then
    load_fields(ctx, {field})
    v = ctx.cache[field]
  end
  return v and v - 0 or 0
end

local function set_units(ctx, field, units)
  if units > 0 then ctx.cache[field] = int(units) else ctx.cache[field] = false end
  ctx.dirty[field] = true
end

-- The fair state, read once per call.
local function fair_state(ctx)
  if not ctx.st then
    load_fields(ctx, {'g'})
    ctx.st = unpack_state(ctx.cache['g'] or nil)
  end
  return ctx.st
end

-- Parsed specs of `names` (false: unknown and refused), the missing ones in one HMGET.
local function load_specs(ctx, names)
  if not ctx.policy then
    for _, name in ipairs(names) do ctx.specs[name] = false end
    return
  end
  local missing = {}
  for _, name in ipairs(names) do
    if ctx.specs[name] == nil then missing[#missing + 1] = 't:' .. name end
  end
  for first = 1, #missing, 1000 do  -- unpack() of a very long list overflows Lua's C stack
    local part = {}
    for i = first, math.min(first + 999, #missing) do part[#part + 1] = missing[i] end
    local values = redis.call('HMGET', KEYS[1], unpack(part))
    for i, field in ipairs(part) do
      local spec = values[i]
      if not spec and ctx.policy.unknown == 'default' then spec = ctx.policy.default end
      ctx.specs[string.sub(field, 3)] = spec and parse_spec(spec) or false
    end
  end
end

local function spec_of(ctx, name)
  if not ctx.policy then return false end  -- release without a policy: apply_policy rebuilds
  if ctx.specs[name] == nil then load_specs(ctx, {name}) end
  return ctx.specs[name]
end

-- Loads, in one HMGET, the info entries of the given ids not seen yet.
local function prefetch_entries(ctx, ids)
  local fields = {}
  for _, id in ipairs(ids) do
    if ctx.entries['L' .. id] == nil then
      fields[#fields + 1] = 'L' .. id
      fields[#fields + 1] = 'P' .. id
    end
  end
  if #fields == 0 then return end
  local values = redis.call('HMGET', KEYS[4], unpack(fields))
  for i, field in ipairs(fields) do ctx.entries[field] = values[i] or false end
end

-- Adds (sign 1) or removes (-1) one tenant's terms at the state's level; a tenant on its
-- floor counts lo, on the slope w, at its ceiling up.
local function contribute(st, where, lo, up, w, sign)
  if where == 0 then st.bh, st.bl = exact_add(st.bh, st.bl, lo, sign)
  elseif where == 1 then st.wh, st.wl = exact_add(st.wh, st.wl, w, sign)
  else st.bh, st.bl = exact_add(st.bh, st.bl, up, sign) end
end

local function tenant_terms(st, lo, up, w, keep, sign)
  st.loh, st.lol = exact_add(st.loh, st.lol, lo, sign)
  st.uph, st.upl = exact_add(st.uph, st.upl, up, sign)
  st.kh, st.kl = exact_add(st.kh, st.kl, keep, sign)
  local where = 0
  if up > lo then where = side_of(lo / w, up / w, st.lam, 0) end
  contribute(st, where, lo, up, w, sign)
end

-- Moves a tenant from demand d0 to d1 in `st` (0: idle, no terms at all). Returns its
-- bounds before and after (nil when idle).
local function change_demand(st, spec, d0, d1)
  local before, after
  if d0 > 0 then
    local lo, up = claim_bounds(spec.keep, spec.g, spec.ceil, d0)
    before = {lo = lo, up = up}
    tenant_terms(st, before.lo, before.up, spec.w, spec.keep, -1)
  end
  if d1 > 0 then
    local lo, up = claim_bounds(spec.keep, spec.g, spec.ceil, d1)
    after = {lo = lo, up = up}
    tenant_terms(st, after.lo, after.up, spec.w, spec.keep, 1)
  end
  return before, after
end

-- The breakpoints of a tenant with bounds `b` (none when up == lo: a constant).
local function points_of(tenant, w, b)
  if not b or b.up <= b.lo then return {} end
  return {{score = b.lo / w, lo = b.lo, up = b.up, w = w, tenant = tenant, kind = 'l'},
          {score = b.up / w, lo = b.lo, up = b.up, w = w, tenant = tenant, kind = 'u'}}
end

-- Records that a tenant's points move from bounds `before` to `after` (nil: no points). The
-- zset is written by write_points, once per tenant and call, before a walk reads it and at
-- flush: a batch that moves one tenant many times writes its points once.
local function move_points(ctx, tenant, w, before, after)
  local moved = ctx.moved[tenant]
  if moved then
    moved.last = after or false
  else
    ctx.moved[tenant] = {w = w, first = before or false, last = after or false}
  end
end

-- Writes one tenant's points as a call found them (bounds lo0, up0; nil: none) and leaves
-- them (lo1, up1; nil: none), at weight `w`. Bounds as numbers, not tables: the fast paths
-- build none. The members' numbers are formatted once each: w, and a bound that did not
-- move, serve both. The scores go as numbers: redis.call sends a number as '%.17g', the text
-- fmt writes, and a score is stored as the double it reads anyway.
local function write_tenant_points(tenant, w, lo0, up0, lo1, up1)
  if lo0 and lo1 and lo0 == lo1 and up0 == up1 then return end
  local tw, tlo, tup = fmt(w), nil, nil
  if lo0 and up0 > lo0 then
    tlo, tup = fmt(lo0), fmt(up0)
    redis.call('ZREM', KEYS[6], point_members(tlo, tup, tw, tenant))
  end
  if lo1 and up1 > lo1 then
    if not (tlo and lo0 == lo1) then tlo = fmt(lo1) end
    if not (tup and up0 == up1) then tup = fmt(up1) end
    local l, u = point_members(tlo, tup, tw, tenant)
    if w == 1 then  -- the scores are the bounds, whose text is at hand
      redis.call('ZADD', KEYS[6], tlo, l, tup, u)
    else
      redis.call('ZADD', KEYS[6], lo1 / w, l, up1 / w, u)
    end
  end
end

-- Writes the recorded moves, once per tenant (the policy, and so w, is the same throughout a
-- call).
local function write_points(ctx)
  for tenant, m in pairs(ctx.moved) do
    local first, last = m.first, m.last
    write_tenant_points(tenant, m.w, first and first.lo, first and first.up, last and last.lo,
      last and last.up)
  end
  ctx.moved = {}
end

-- Breakpoints from `pos` (inclusive) upwards (dir 1) or downwards (-1): the zset's, except
-- those of the tenant `ov` overrides, merged with `ov`'s own points (a decision not written).
-- Lazy: members are fetched in pages (a small first one: most walks stop at the first score)
-- and parsed one at a time as the walk reaches them, so a level that stays below a score
-- shared by many tenants reads one member of it, not all of them. peek() returns the next
-- point without consuming it, pop() consumes it.
local function point_stream(pos, dir, ov)
  local raw, ri, offset, exhausted, limit = {}, 1, 0, false, FIRST_PAGE
  local head = nil  -- the next stored point, parsed (false: none left)
  local vp, vi = {}, 1
  if ov then
    for _, p in ipairs(ov.pts) do
      if (dir > 0 and p.score >= pos) or (dir < 0 and p.score <= pos) then vp[#vp + 1] = p end
    end
    if dir < 0 and #vp == 2 then vp[1], vp[2] = vp[2], vp[1] end
  end
  local from = '+inf'
  if pos ~= INF then from = fmt(pos) end
  local function stored()
    while true do
      if ri > #raw then
        if exhausted then return false end
        if dir > 0 then
          raw = redis.call('ZRANGEBYSCORE', KEYS[6], from, '+inf', 'LIMIT', offset, limit)
        else
          raw = redis.call('ZREVRANGEBYSCORE', KEYS[6], from, '0', 'LIMIT', offset, limit)
        end
        offset, ri = offset + #raw, 1
        exhausted, limit = #raw < limit, PAGE
      else
        local kind, lo, up, w, tenant = parse_point(raw[ri])
        ri = ri + 1
        if not (ov and tenant == ov.tenant) then
          local score = up / w
          if kind == 'l' then score = lo / w end
          return {score = score, lo = lo, up = up, w = w, tenant = tenant}
        end
      end
    end
  end
  local stream = {}
  function stream.peek()
    if head == nil then head = stored() end
    local r, v = head or nil, vp[vi]
    if v and (not r or (dir > 0 and v.score < r.score) or (dir < 0 and v.score > r.score)) then
      return v, true
    end
    return r, false
  end
  function stream.pop()
    local p, virtual = stream.peek()
    if virtual then vi = vi + 1 elseif p then head = nil end
    return p
  end
  return stream
end

-- The score of the next breakpoints (nil when none are left), without reading past the first.
local function next_score(stream)
  local p = stream.peek()
  return p and p.score
end

-- Consumes the next breakpoints sharing one score.
local function take_group(stream)
  local first = stream.pop()
  local group = {first}
  while true do
    local p = stream.peek()
    if not p or p.score ~= first.score then return group end
    group[#group + 1] = stream.pop()
  end
end

-- Moves the tenants of one breakpoint group at `x` from one side of x to another.
local function reclass(st, group, x, from_side, to_side)
  local seen = {}
  for _, p in ipairs(group) do
    if not seen[p.tenant] then
      seen[p.tenant] = true
      local a, b = p.lo / p.w, p.up / p.w
      local c0, c1 = side_of(a, b, x, from_side), side_of(a, b, x, to_side)
      if c0 ~= c1 then
        contribute(st, c0, p.lo, p.up, p.w, -1)
        contribute(st, c1, p.lo, p.up, p.w, 1)
      end
    end
  end
end

-- From the state at its level, finds the smallest level whose sum of limits reaches
-- `target`, crossing only the breakpoints in between, and leaves the state there. A group of
-- breakpoints is read only when the level reaches it (crossed, or stopped at its score).
local function walk(st, target, ov)
  local lam = st.lam
  local base = exact_value(st.bh, st.bl)
  if lam ~= INF and base + lam * exact_value(st.wh, st.wl) < target then
    local s, pos, at_pos = point_stream(lam, 1, ov), lam, nil
    while true do
      local x = next_score(s)
      if x ~= nil and x == pos then
        local group = take_group(s)
        reclass(st, group, pos, 0, 1)
        at_pos = group
      else
        local w, b = exact_value(st.wh, st.wl), exact_value(st.bh, st.bl)
        if x == nil or (w > 0 and b + x * w >= target) then
          local level = pos
          if w > 0 then level = (target - b) / w end
          if level <= pos then
            level = pos
            if at_pos then reclass(st, at_pos, pos, 1, 0) end
          elseif x ~= nil and level >= x then
            level = x
            reclass(st, take_group(s), x, -1, 0)
          end
          st.lam = level
          return
        end
        local group = take_group(s)
        reclass(st, group, x, -1, 1)
        pos, at_pos = x, group
      end
    end
  end
  local s, pos, at_pos = point_stream(lam, -1, ov), lam, nil
  while true do
    local x = next_score(s)
    if x ~= nil and x == pos then
      local group = take_group(s)
      reclass(st, group, pos, 0, -1)
      at_pos = group
    else
      local w, b = exact_value(st.wh, st.wl), exact_value(st.bh, st.bl)
      local low = x or 0
      if b + low * w < target then
        local level = pos
        if w > 0 then level = (target - b) / w end
        if level >= pos then
          level = pos
          if at_pos then reclass(st, at_pos, pos, -1, 0) end
        elseif level <= low then
          level = low
          if x ~= nil then reclass(st, take_group(s), x, 1, 0) end
        end
        st.lam = level
        return
      end
      if x == nil then  -- reached at 0: every tenant at its floor
        st.lam, st.bh, st.bl, st.wh, st.wl = 0, st.loh, st.lol, 0, 0
        return
      end
      local group = take_group(s)
      reclass(st, group, x, 1, -1)
      pos, at_pos = x, group
    end
  end
end

-- The level that the sums Σlo, Σup and Σ G(1-l) (as exact pairs) give with no walk: 0 when
-- the floors already take the target, INF when every ceiling fits; nil and the target
-- otherwise.
local function ended_level(capacity, reserve, loh, lol, uph, upl, kh, kl)
  local sum_lo, sum_up = exact_value(loh, lol), exact_value(uph, upl)
  local target = target_of(capacity, reserve, exact_value(kh, kl), sum_up)
  if target <= sum_lo then return 0 end
  if target >= sum_up then return INF end
  return nil, target
end

-- Sets the level of `st` when its sums alone give it (ended_level), the base and slope with
-- it. Returns false and the target otherwise.
local function level_ends(st, policy)
  local level, target = ended_level(policy.capacity, policy.reserve, st.loh, st.lol, st.uph,
    st.upl, st.kh, st.kl)
  if level == 0 then
    st.lam, st.bh, st.bl, st.wh, st.wl = 0, st.loh, st.lol, 0, 0
  elseif level then
    st.lam, st.bh, st.bl, st.wh, st.wl = INF, st.uph, st.upl, 0, 0
  else
    return false, target
  end
  return true
end

-- Brings the level of `st` (ctx's, or a trial of it) to the one its sums call for:
-- level_ends, else a walk over the zset, the call's moves written first (ov: a tenant's
-- points not recorded yet).
local function settle(ctx, st, ov)
  if not ctx.policy then return end
  local ended, target = level_ends(st, ctx.policy)
  if not ended then
    write_points(ctx)
    walk(st, target, ov)
  end
end

local function copy_state(st)
  return {lam = st.lam, bh = st.bh, bl = st.bl, wh = st.wh, wl = st.wl, loh = st.loh,
          lol = st.lol, uph = st.uph, upl = st.upl, kh = st.kh, kl = st.kl, used = st.used}
end

-- Applies units held (du) and waiting (dp) to a tenant and to the fair state, committed.
-- The caller settles the level once after all its changes.
local function add_demand(ctx, tenant, du, dp)
  local uf, pf = 'u:' .. tenant, 'p:' .. tenant
  load_fields(ctx, {uf, pf})
  local used, waiting = units_of(ctx, uf), units_of(ctx, pf)
  local st = fair_state(ctx)
  if du ~= 0 then
    set_units(ctx, uf, used + du)
    st.used = st.used + du
  end
  if dp ~= 0 then set_units(ctx, pf, waiting + dp) end
  ctx.st_dirty = true
  local spec = spec_of(ctx, tenant)
  if not spec then return end  -- a tenant the policy no longer knows takes no part
  local before, after = change_demand(st, spec, used + waiting, used + du + waiting + dp)
  move_points(ctx, tenant, spec.w, before, after)
end

-- Drops up to `limit` expired entries, credits their units back and settles the level.
-- Schedules entry `member` of exp to expire at `expiry` (ms).
local function schedule(ctx, member, expiry)
  redis.call('ZADD', KEYS[3], int(expiry), member)
  if expiry <= ctx.now then ctx.due = nil end  -- due at once: the next purge must look
end

-- ctx.due false: the call has already seen that nothing is due (the fast path's read, or a
-- purge that found fewer than it may drop); the clock stands still within a call, so nothing
-- becomes due unless scheduled so (schedule), and release_many's purge after each release
-- reads exp once.
local function purge(ctx, limit)
  if ctx.due == false then return 0 end
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ctx.now, 'LIMIT', '0', limit)
  if #dead < limit then ctx.due = false end
  if #dead == 0 then return 0 end
  local infos = redis.call('HMGET', KEYS[4], unpack(dead))
  local tenants, names = {}, {}
  for i, member in ipairs(dead) do
    local info = infos[i]
    if info then
      local units, seq, tenant = parse_entry(info)
      if not tenants[tenant] then
        tenants[tenant] = {0, 0}
        names[#names + 1] = tenant
      end
      if string.sub(member, 1, 1) == 'L' then
        tenants[tenant][1] = tenants[tenant][1] - units
      else
        tenants[tenant][2] = tenants[tenant][2] - units
        redis.call('ZREM', KEYS[5], queue_member(tenant, seq, units, string.sub(member, 2)))
      end
    end
    ctx.entries[member] = false
  end
  ledger_purged(ctx, dead, infos)
  redis.call('ZREM', KEYS[3], unpack(dead))
  -- A lease's meter reservations (R<id>, _metered.lua) go with it, in the same HDEL.
  local gone = {}
  for _, member in ipairs(dead) do
    gone[#gone + 1] = member
    if string.sub(member, 1, 1) == 'L' then gone[#gone + 1] = 'R' .. string.sub(member, 2) end
  end
  redis.call('HDEL', KEYS[4], unpack(gone))
  load_specs(ctx, names)
  local fields = {'g'}
  for _, name in ipairs(names) do
    fields[#fields + 1] = 'u:' .. name
    fields[#fields + 1] = 'p:' .. name
  end
  load_fields(ctx, fields)
  for _, name in ipairs(names) do add_demand(ctx, name, tenants[name][1], tenants[name][2]) end
  settle(ctx, fair_state(ctx))
  return #dead
end

-- Gives demand, exp, info and fair the expiry `ttl` (ms) unless the call saw all four whole
-- (`whole`, check_state) and demand's still covers `ttl` but for a slack of half the grace:
-- the keys then still outlive every lease by that much, and a busy group refreshes them
-- about once per half grace instead of on every call (the four always get their expiry
-- together, so one PTTL tells). Returns the expiry's text when it wrote one, else nil.
local function keep_keys(ttl, whole, key_grace_ms)
  if whole and redis.call('PTTL', KEYS[2]) >= ttl - key_grace_ms / 2 then return nil end
  local ms = int(ttl)
  redis.call('PEXPIRE', KEYS[2], ms)
  redis.call('PEXPIRE', KEYS[3], ms)
  redis.call('PEXPIRE', KEYS[4], ms)
  redis.call('PEXPIRE', KEYS[6], ms)
  return ms
end

-- Writes back the cached demand fields and the fair state, and refreshes the expiry of
-- every key this call wrote: longer than any lease, so a group that goes idle leaves nothing.
local function flush(ctx, key_grace_ms)
  write_points(ctx)
  ledger_flush(ctx)
  local policy = ctx.policy
  if policy and (policy.fence_dirty or policy.busy_dirty) then  -- next_fence, mark_busy
    if not policy.busy_dirty then
      redis.call('HSET', KEYS[1], 'fence', int(policy.fence))
    elseif not policy.fence_dirty then
      redis.call('HSET', KEYS[1], 'busy', int(policy.busy))
    else
      redis.call('HSET', KEYS[1], 'fence', int(policy.fence), 'busy', int(policy.busy))
    end
    policy.fence_dirty, policy.busy_dirty = false, false
  end
  if ctx.st_dirty then
    -- An all-zero state is the one a missing field reads as: no field for it.
    local st = ctx.st
    if st.used == 0 and st.lam == 0 and st.bh == 0 and st.bl == 0 and st.wh == 0 and
        st.wl == 0 and st.loh == 0 and st.lol == 0 and st.uph == 0 and st.upl == 0 and
        st.kh == 0 and st.kl == 0 then
      ctx.cache['g'] = false
    else
      ctx.cache['g'] = pack_state(st)
    end
    ctx.dirty['g'] = true
  end
  local set, del = {}, {}
  for field, _ in pairs(ctx.dirty) do
    local v = ctx.cache[field]
    if v then
      set[#set + 1] = field
      set[#set + 1] = v
    else
      del[#del + 1] = field
    end
  end
  if #set > 0 then redis.call('HSET', KEYS[2], unpack(set)) end
  if #del > 0 then redis.call('HDEL', KEYS[2], unpack(del)) end
  ctx.dirty = {}
  if ctx.policy and (ctx.touch or #set > 0) then
    -- Leases granted under a longer max_lease_ttl (lowered since) are covered through busy,
    -- meter buckets not yet full again through mfull (_metered.lua) when this call read it.
    local ttl = math.max(ctx.policy.ttl, ctx.policy.busy - ctx.now, (ctx.mfull or 0) - ctx.now) +
      key_grace_ms
    if not ctx.whole and ctx.cache['s:'] and redis.call('ZSCORE', KEYS[6], FAIR_ANCHOR) then
      -- A release saw demand's sentinel before writing, and fair's is still there: both keys
      -- existed (sentinels are written only with a refresh of all four), and exp and info,
      -- which a release only shrinks, either still exist with that expiry or are gone.
      ctx.whole = true
    end
    local ms = keep_keys(ttl, ctx.whole, key_grace_ms)
    if ctx.touch_queue then redis.call('PEXPIRE', KEYS[5], ms or int(ttl)) end
  end
end
