-- _fast.lua: the decisions that need no water-level walk, answered before the general path
-- (docs/design.md, "Fast paths"). Prepended last (see ratequota/engine/scripts.py).
--
-- Redis runs a script's whole text on every call, and every function definition it executes
-- allocates a closure: the general path's library definitions cost as much as a dozen cheap
-- commands. An entry script is therefore linked in two parts: the definitions its fast path
-- reaches, the fast path, then the definitions only the general path needs and the general
-- path. A call the fast path answers returns before the second part runs.
--
-- A fast path decides only what it can decide exactly as the general path would, from the
-- same reads; anything else (a retry, a waiting request, a refusal, a walk, lost state,
-- expired entries to purge, meters) falls through to the general path,
-- which starts from the reads already made. tests/test_fast_paths.py holds the two equal:
-- the same calls with the fast paths switched off (FAST_PATHS, set false only by that test's
-- copy of the scripts) leave the same keys and answer the same replies.

local FAST_PATHS = true

-- acquire_many and release_many try the fast path request by request only in batches of at
-- most this many: a fast request costs about the same whatever the batch (5 reads and 6
-- writes of its own), while the general path reads the policy, the state and what is due
-- once for the whole batch, and so costs less per request from about 10 requests on
-- (docs/benchmarks.md, "Batches on the fast paths").
local FAST_BATCH = 8

-- acquire_many's requests that name meters take the fast path for meters only in batches of
-- at most this many: its reads and parses of the policy's meters and the buckets, request by
-- request, cost as much as the general path's shared ones at 4 requests, and more beyond
-- (instructions per metered request with its release, general and fast: 1 request 1161k,
-- 859k; 2: 901k, 782k; 3: 814k, 780k; 4: 760k, 769k; 8: 683k, 733k; docs/benchmarks.md,
-- "Metered acquires on a fast path").
local FAST_METER_BATCH = 3

-- Everything an acquire of `tenant` with request id `id` reads before deciding, in five
-- commands: the policy header with the tenant's spec (read_header's reply, for open_group),
-- the tenant's demand fields with the fair state and demand's sentinel, the id's entries
-- with info's sentinel, exp's first member (its sentinel and whether any entry is due for
-- purging) and fair's sentinel. Returns them as read (the fast path builds no table from
-- them: acquire_cache does, for the general path), how many sentinels are present, whether
-- anything is due and the first member's score (text; nil when exp is empty), so the
-- general path reads none of them again.
local function acquire_reads(now, tenant, id)
  local head = redis.call('HMGET', KEYS[1], 'schema', 'hdr', 'busy', 'recover', 'fence', 'led_ok',
    't:' .. tenant)
  local dem = redis.call('HMGET', KEYS[2], 'g', 'u:' .. tenant, 'p:' .. tenant, 's:')
  local ent = redis.call('HMGET', KEYS[4], 'L' .. id, 'P' .. id, 's:')
  local present = 0
  if dem[4] then present = present + 1 end
  if ent[3] then present = present + 1 end
  -- Sentinels an earlier release wrote ("0"), upgraded to their hashtable-keeping value.
  if dem[4] == '0' then redis.call('HSET', KEYS[2], 's:', WIDE) end
  if ent[3] == '0' then redis.call('HSET', KEYS[4], 's:', WIDE) end
  -- exp's member of the lowest score: the key exists only with its sentinel (every script
  -- that adds to exp runs check_state first, or found the four sentinels like this one, and
  -- whatever loses keys loses them whole), and no expiry scores as high as the sentinel, so
  -- the first member is an entry due for purging exactly when some entry is due.
  local first = redis.call('ZRANGE', KEYS[3], '0', '0', 'WITHSCORES')
  if first[1] then present = present + 1 end
  if redis.call('ZSCORE', KEYS[6], FAIR_ANCHOR) then present = present + 1 end
  return head, dem, ent, present, first[2] ~= nil and first[2] - 0 <= now, first[2]
end

-- acquire_reads' demand and entries as ctx holds them (its cache and its entries, built
-- whole, not grown), for the general path.
local function acquire_cache(tenant, id, dem, ent)
  return {g = dem[1], ['u:' .. tenant] = dem[2], ['p:' .. tenant] = dem[3], ['s:'] = dem[4]},
    {['L' .. id] = ent[1], ['P' .. id] = ent[2]}
end

-- A decision's new fair state when its level needs no walk, from the stored text alone
-- (`text`, demand's field g; false when absent), under a policy of `capacity` and `reserve`:
-- a tenant (its spec's fields keep, g, ceil; g nil: not in the policy, no terms) goes from
-- demand d0 to d1, and the group's units held change by du. The sums move by the tenant's
-- terms as change_demand moves them; the level and its base/slope split are neither read nor
-- moved, since the level the sums give (ended_level) sets them all, as level_ends would. The
-- text is the one flush would write for that state (pack_state; false: all zero, no field),
-- each field that did not change keeping the text it was read from: pack_state wrote it,
-- with the '%d' digits it would write now. Returns the level (nil, and nothing else, when it
-- needs a walk), the text, the tenant's bounds before (lo0, up0) and after (lo1, up1; nil
-- where change_demand's would be) and the units held before. Numbers, not tables: a table
-- costs a fast path more than all this arithmetic. The group's last text and its parse are
-- remembered (STATES, _codec.lua): the next decision reads that text without parsing it.
local function ended_state(text, capacity, reserve, keep, g, ceil, d0, d1, du)
  local t_loh, t_lol, t_uph, t_upl, t_kh, t_kl, t_used, loh, lol, uph, upl, kh, kl, used
  local m = STATES and text and STATES[KEYS[2]]
  if m and m[16] == text then
    t_loh, t_lol, t_uph, t_upl, t_kh, t_kl, t_used = m[1], m[2], m[3], m[4], m[5], m[6], m[7]
    loh, lol, uph, upl, kh, kl, used = m[8], m[9], m[10], m[11], m[12], m[13], m[14]
  else
    t_loh, t_lol, t_uph, t_upl, t_kh, t_kl, t_used = string.match(text or EMPTY_STATE, STATE_SUMS)
    loh, lol, uph, upl, kh, kl = t_loh - 0, t_lol - 0, t_uph - 0, t_upl - 0, t_kh - 0, t_kl - 0
    used = t_used - 0
  end
  local nloh, nlol, nuph, nupl, nkh, nkl = loh, lol, uph, upl, kh, kl
  local lo0, up0, lo1, up1
  if g and d0 > 0 then
    lo0, up0 = claim_bounds(keep, g, ceil, d0)
    nloh, nlol = exact_add(nloh, nlol, lo0, -1)
    nuph, nupl = exact_add(nuph, nupl, up0, -1)
    nkh, nkl = exact_add(nkh, nkl, keep, -1)
  end
  if g and d1 > 0 then
    lo1, up1 = claim_bounds(keep, g, ceil, d1)
    nloh, nlol = exact_add(nloh, nlol, lo1, 1)
    nuph, nupl = exact_add(nuph, nupl, up1, 1)
    nkh, nkl = exact_add(nkh, nkl, keep, 1)
  end
  local level = ended_level(capacity, reserve, nloh, nlol, nuph, nupl, nkh, nkl)
  if not level then return nil end
  local nused = used + du
  if level == 0 and nloh == 0 and nlol == 0 and nuph == 0 and nupl == 0 and nkh == 0 and
      nkl == 0 and nused == 0 then
    return level, false, lo0, up0, lo1, up1, used
  end
  if nloh ~= loh then t_loh = int(nloh) end
  if nlol ~= lol then t_lol = int(nlol) end
  if nuph ~= uph then t_uph = int(nuph) end
  if nupl ~= upl then t_upl = int(nupl) end
  if nkh ~= kh then t_kh = int(nkh) end
  if nkl ~= kl then t_kl = int(nkl) end
  if nused ~= used then t_used = int(nused) end
  -- pack_state's layout: level (INF as -1), base (the floors' sum at 0, the ceilings' at
  -- INF), slope 0, then the sums.
  local head = '0|' .. t_loh .. '|' .. t_lol
  if level ~= 0 then head = '-1|' .. t_uph .. '|' .. t_upl end
  local out = head .. '|0|0|' .. t_loh .. '|' .. t_lol .. '|' .. t_uph .. '|' .. t_upl ..
    '|' .. t_kh .. '|' .. t_kl .. '|' .. t_used
  if STATES then
    remember(STATES, KEYS[2], {t_loh, t_lol, t_uph, t_upl, t_kh, t_kl, t_used, nloh, nlol,
      nuph, nupl, nkh, nkl, nused, level, out})
  end
  return level, out, lo0, up0, lo1, up1, used
end

-- The stored fair state's level (INF as -1 in the text) and units held: unpack_state's
-- first and last fields, without the rest (0, 0 for an absent state, as unpack_state's).
local function stored_level(text)
  if not text then return 0, 0 end
  local m = STATES and STATES[KEYS[2]]
  if m and m[16] == text then return m[15], m[14] end
  local lam, used = string.match(text, '^([^|]+)|.*|([^|]+)$')
  local level = lam - 0
  if level < 0 then level = INF end
  return level, used - 0
end

-- What a request of `units` for `ttl` ms is decided under, from acquire_reads' header
-- (`head`: the policy's header with the tenant's spec): the policy's version, capacity,
-- max_lease_ttl and reserve, and the tenant's guarantee, ceiling, weight and kept part (its
-- spec, or the policy's default one for an unknown tenant), and how the policy treats
-- unknown tenants. nil when the general path must answer: an unknown tenant the policy
-- refuses, a ttl above max_lease_ttl, or more units than the capacity, the ceiling or
-- max_units allow (too large).
local function request_terms(head, units, ttl)
  local version, capacity, max_ttl, unknown, reserve, default = header_fields(head[2])
  local text = head[7]
  if not text and unknown == 'default' then text = default end
  if not text then return nil end
  local g, _, ceil, w, max_units, keep = spec_fields(text)
  if ttl > max_ttl or units > math.min(capacity, ceil, max_units) then return nil end
  return version, capacity, max_ttl, reserve, g, ceil, w, keep, unknown
end

-- Admits a lease that needs no walk from acquire_reads' replies, or returns nil for the
-- general path (which parses the policy again, into the tables it works with): a policy of
-- this schema, no meters (unless with `gate`, below), the group's state whole and nothing
-- due, no recovery, a new id, a known tenant with nothing waiting, the ledger's hour keys
-- already marked, and a request that fits its tenant limit and the group at a level of 0 or
-- INF. Writes what the general path's hold_trial and flush would, with no ctx: the lease's
-- expiry and entry, the tenant's points, the fencing counter (and busy, as next_fence
-- would), the tenant's units with the state's text (ended_state), and the keys' expiry. The
-- policy and the spec are read into locals (header_fields, spec_fields), not tables. The
-- request is acquire.lua's ARGV[3..6] and ARGV[11] (tenant, units, lease_id, ttl_ms,
-- meters), passed in: acquire_many.lua decides its requests here one by one while they take
-- this path (ARGV[2] is the schema in both). wait changes only the lease's refusals, which
-- this path never answers: when the request does not fit, it returns nil with what a
-- refusal replies (the tenant's limit, the units held in the group, the policy's version
-- and capacity) for fast_refused.
-- A request that names meters is decided only with `gate` (fast_meters, linked in a later
-- part than this): called once the lease fits, it answers nil (the general path), or
-- commits the meters and returns what the lease's writes and reply carry with them, or
-- refuses the request for a meter (then only the meters' contention marks are written, and
-- the refusal's count in the ledger, as acquire_one and ledger_acquire would). `shadow`
-- (acquire.lua's ARGV[10]) matters only there: a refusal in shadow mode admits, which the
-- general path answers.
local function fast_acquire(now, head, dem, ent, present, due, tenant, units, id, ttl, meters,
                            gate, shadow)
  if not FAST_PATHS or (meters ~= '' and not gate) or present ~= 4 or due or ent[1] or ent[2] or
      (dem[3] and dem[3] - 0 > 0) or not head[1] or not head[2] or
      head[1] - 0 > ARGV[2] - 0 or (head[4] and head[4] - 0 > now) then
    return nil
  end
  local version, capacity, max_ttl, reserve, g, ceil, w, keep, unknown =
    request_terms(head, units, ttl)
  if not version then return nil end
  local used = dem[2] and dem[2] - 0 or 0
  local level, state, lo0, up0, lo1, up1, group_used =
    ended_state(dem[1], capacity, reserve, keep, g, ceil, used, used + units, units)
  if not level then return nil end
  local limit = clamp_limit(level, w, lo1, up1)
  if used + units > limit + EPSILON or group_used + units > capacity then
    return nil, limit, group_used, version, capacity
  end
  -- The ledger's hour keys not yet marked for this pair (ledger_flush): twice an hour.
  local ha, hb = ledger_hours()
  if head[6] ~= ha .. ':' .. hb then return nil end
  local lease = 'L' .. id
  local busy = head[3] and head[3] - 0 or 0
  local metered, rows, record, mfull, retry
  if meters ~= '' then
    metered, rows, record, mfull, retry = gate(now, unknown, tenant, meters, ha, hb, shadow)
    if not metered then return nil end
    if retry then  -- refused by a meter
      if metered[1] then
        redis.call('HSET', KEYS[2], unpack(metered))
        keep_keys(math.max(max_ttl, busy - now, mfull - now) + KEY_GRACE_MS, true, KEY_GRACE_MS)
      end
      return {0, 'meter', 0, 0, used, fmt(limit), group_used, capacity, retry, version, 0, rows}
    end
  end
  local expiry = now + ttl
  local token = token_after(head[5] and head[5] - 0 or 0, now)  -- as next_fence
  local t_expiry = int(expiry)
  redis.call('ZADD', KEYS[3], t_expiry, lease)
  if record then
    redis.call('HSET', KEYS[4], lease, entry(units, token, tenant), 'R' .. id, record)
  else
    redis.call('HSET', KEYS[4], lease, entry(units, token, tenant))
  end
  write_tenant_points(tenant, w, lo0, up0, lo1, up1)
  if expiry > busy then
    busy = expiry
    redis.call('HSET', KEYS[1], 'fence', int(token), 'busy', t_expiry)
  else
    redis.call('HSET', KEYS[1], 'fence', int(token))
  end
  if metered then
    redis.call('HSET', KEYS[2], 'u:' .. tenant, int(used + units), 'g', state, unpack(metered))
    keep_keys(math.max(max_ttl, busy - now, mfull - now) + KEY_GRACE_MS, true, KEY_GRACE_MS)
    return {1, 'admitted', expiry, token, used + units, fmt(limit), group_used + units, capacity,
            0, version, 0, rows}
  end
  redis.call('HSET', KEYS[2], 'u:' .. tenant, int(used + units), 'g', state)
  keep_keys(math.max(max_ttl, busy - now) + KEY_GRACE_MS, true, KEY_GRACE_MS)
  return {1, 'admitted', expiry, token, used + units, fmt(limit), group_used + units, capacity, 0,
          version, 0}
end

-- Refusals with no walk, acquire.lua's second fast path: linked after the first, so a call
-- that one answers never creates these closures. Each returns acquire.lua's reply, or nil
-- having written nothing. Not here: shadow mode (it admits), a new waiting request (it
-- registers), the ledger's hour keys not yet marked (ledger_flush marks them), and what
-- fast_acquire leaves to the general path.

-- The retry hint of a refusal, as acquire_one gives it: pending_ms, or less when exp's first
-- entry (`first`, its score as read) ends sooner, at least 1 ms.
local function retry_hint(first, now, pending_ms)
  if first then return math.max(1, math.min(pending_ms, first - now)) end
  return pending_ms
end

-- Refuses a new request that does not wait (try_acquire) where fast_acquire found that it
-- does not fit at a level of 0 or INF: `limit` is the tenant's with the request's units in
-- its demand, `group_used`, `version` and `capacity` as that reply gives them (fast_acquire's
-- second return values); `dem` and `first` are acquire_reads'. Writes only the refusal's
-- count in the ledger, as ledger_acquire would.
local function fast_refused(now, head, dem, first, tenant, units, wait, shadow, pending_ms,
                            limit, group_used, version, capacity)
  if not FAST_PATHS or wait or shadow then return nil end
  local ha, hb = ledger_hours()
  if head[6] ~= ha .. ':' .. hb then return nil end
  local used = dem[2] and dem[2] - 0 or 0
  local reason = 'group_full'
  if used + units > limit + EPSILON then reason = 'tenant_limit' end
  ledger_write(now, {[tenant .. '|rf:' .. reason] = 1}, ha, hb)
  return {0, reason, 0, 0, used, fmt(limit), group_used, capacity,
          retry_hint(first, now, pending_ms), version, 0}
end

-- Refuses a retry of a waiting request (same id, tenant and units, waiting again) that still
-- does not fit: a waiting acquire polls this way. Its units are in the demand already, so
-- the limit is the tenant's at the stored level (limit_at), whatever that level is, and
-- room is kept for the tenant's oldest waiting request when that is another one. Writes
-- what the general path does: the registration's new expiry, the keys' expiry (the queue's
-- too), and nothing in the ledger (the refusal was counted when it registered); the retry
-- hint is paced by its place in line. The same conditions as fast_acquire's first ones.
local function fast_waiting(now, head, dem, ent, present, due, first, tenant, units, id, ttl,
                            meters, wait, shadow, pending_ms)
  if not FAST_PATHS or not wait or shadow or meters ~= '' or present ~= 4 or due or ent[1] or
      not ent[2] or not head[1] or not head[2] or head[1] - 0 > ARGV[2] - 0 or
      (head[4] and head[4] - 0 > now) then
    return nil
  end
  local held, _, owner = parse_entry(ent[2])
  if owner ~= tenant or held ~= units then return nil end
  local ha, hb = ledger_hours()
  if head[6] ~= ha .. ':' .. hb then return nil end
  local version, capacity, max_ttl, _, g, ceil, w, keep = request_terms(head, units, ttl)
  if not version then return nil end
  local used = dem[2] and dem[2] - 0 or 0
  local waiting = dem[3] and dem[3] - 0 or 0
  local level, group_used = stored_level(dem[1])
  local lo, up = claim_bounds(keep, g, ceil, used + waiting)
  local limit = clamp_limit(level, w, lo, up)
  local front = queue_front(tenant, QUEUE_PACED)
  local kept = 0
  if waiting > 0 and front[1] and front[1][2] ~= id then kept = front[1][1] end
  local reason = 'tenant_limit'
  if used + units + kept <= limit + EPSILON then
    if group_used + units + kept <= capacity then return nil end  -- it fits: the general path
    reason = 'group_full'
  end
  local retry_ms = retry_hint(first, now, pending_ms)
  redis.call('ZADD', KEYS[3], int(now + pending_ms), 'P' .. id)
  for position, e in ipairs(front) do
    if e[2] == id then
      retry_ms = math.min(retry_ms, NEXT_IN_LINE_RETRY_MS * math.max(1, position - 1))
    end
  end
  local keys_ttl = math.max(max_ttl, (head[3] and head[3] - 0 or 0) - now) + KEY_GRACE_MS
  local ms = keep_keys(keys_ttl, true, KEY_GRACE_MS)
  redis.call('PEXPIRE', KEYS[5], ms or int(keys_ttl))
  return {0, reason, 0, 0, used, fmt(limit), group_used, capacity, retry_ms, version, 0}
end

-- Rate meters on acquire's fast path, the `gate` fast_acquire takes (linked in a part of
-- their own, after the refusals: a call without meters never creates these closures). It
-- decides the meters named in `text` (acquire.lua's ARGV[11]) of a request whose lease fits
-- (`unknown`: the policy's treatment of unknown tenants, request_terms'), with the general
-- path's own functions on a ctx of their own (the policy's meters and the tenant's shares,
-- the buckets, the lost mark, mfull and the contenders' floor: meter_policy, meter_items),
-- and answers nil when a meter is not the policy's (bad_meter) or, in shadow mode, refuses
-- (the request is then admitted). It has then written nothing but what the general path's
-- decision writes first too (meter_items). Otherwise it
-- commits them as the general path does (meter_gate: all of them, or a refusal's contention
-- marks; mfull; the ledger's tokens reserved, or the refusal's count) and returns the demand
-- fields to write (name, value, ...), the meters' reply rows, the lease's reservations (nil
-- on a refusal), mfull (the keys outlive it, as flush keeps them) and, on a refusal, its
-- retry hint.
local function fast_meters(now, unknown, tenant, text, ha, hb, shadow)
  local ctx = {now = now, policy = {unknown = unknown}, cache = {}, dirty = {}}
  local amounts = meter_amounts(text)
  if meter_unknown(ctx, tenant, amounts) then return nil end  -- bad_meter: the general path
  local items = meter_items(ctx, tenant, amounts)
  if shadow then
    for _, it in ipairs(items) do
      if not it.d.admitted then return nil end
    end
  end
  local ok, rows, record, retry = meter_gate(ctx, tenant, items, false)
  if not ok then ledger_note(ctx, tenant, 'rf:meter', 1) end  -- as ledger_acquire
  if ctx.led then ledger_write(now, ctx.led, ha, hb) end
  local fields = {}
  for field, _ in pairs(ctx.dirty) do
    fields[#fields + 1] = field
    fields[#fields + 1] = ctx.cache[field]
  end
  if ok then return fields, rows, record, ctx.mfull end
  return fields, rows, nil, ctx.mfull, retry
end

-- Extends a live lease from acquire_reads' replies (renew.lua's ARGV: id, ttl, tenant,
-- units, token), or returns nil, having written nothing, for the general path: a policy of
-- this schema, the group's state whole and nothing due, the lease's entry with that tenant,
-- token and units, an expiry still ahead, and the ledger's hour keys already marked. The
-- fair state does not move (a renewal changes no demand), so the limit in the reply is the
-- tenant's at the stored level, as limit_at gives it. Writes what renew.lua's schedule,
-- mark_busy and flush would: the new expiry, busy when it grows, and the keys' expiry.
local function fast_renew(now, head, dem, ent, present, due)
  if not FAST_PATHS or present ~= 4 or due or not ent[1] or not head[1] or not head[2] or
      head[1] - 0 > ARGV[2] - 0 then
    return nil
  end
  local tenant = ARGV[6]
  local held_units, held_token, owner = parse_entry(ent[1])
  if owner ~= tenant or held_token ~= ARGV[8] or held_units ~= tonumber(ARGV[7]) then
    return nil
  end
  local member = 'L' .. ARGV[3]
  local expiry = redis.call('ZSCORE', KEYS[3], member)
  if not expiry or expiry - 0 <= now then return nil end
  local ha, hb = ledger_hours()
  if head[6] ~= ha .. ':' .. hb then return nil end  -- ledger_flush would mark them
  local _, capacity, max_ttl, unknown, reserve, default = header_fields(head[2])
  local ttl = tonumber(ARGV[4])
  if max_ttl < ttl then ttl = max_ttl end  -- min(asked, max_lease_ttl)
  local new_expiry = now + ttl
  if expiry - 0 > new_expiry then new_expiry = expiry - 0 end  -- never shorter (renew.lua)
  redis.call('ZADD', KEYS[3], int(new_expiry), member)
  local busy = head[3] and head[3] - 0 or 0
  if new_expiry > busy then  -- mark_busy
    busy = new_expiry
    redis.call('HSET', KEYS[1], 'busy', int(busy))
  end
  local level, group_used = stored_level(dem[1])
  local tenant_used = dem[2] and dem[2] - 0 or 0
  local text = head[7]
  if not text and unknown == 'default' then text = default end
  local limit, over = 0, 0
  if text then
    local g, _, ceil, w, _, keep = spec_fields(text)
    local lo, up = claim_bounds(keep, g, ceil, tenant_used + (dem[3] and dem[3] - 0 or 0))
    limit = clamp_limit(level, w, lo, up)
    if tenant_used > limit + EPSILON then over = 1 end
  end
  keep_keys(math.max(max_ttl, busy - now) + KEY_GRACE_MS, true, KEY_GRACE_MS)
  return {1, 'renewed', new_expiry, over, tenant_used, fmt(limit), group_used, capacity, ttl}
end

-- Ends lease `id` of `tenant` when the call holds its fencing token `token`, as release_one
-- would, and returns its reply; or returns nil having written nothing, with what it read for
-- the general path (the policy header, the id's entries, the tenant's demand fields; nil
-- each when not read). It decides only a live lease whose level needs no walk after its
-- units are given back, with nothing else due for purging; anything else (no policy, no
-- such lease, another owner or token, an expired lease, a lost exp, a walk) falls through.
-- Writes what close_lease, add_demand and flush would, with no ctx but the ledger's.
local function fast_release(now, id, tenant, token)
  if not FAST_PATHS then return nil end
  local head = redis.call('HMGET', KEYS[1], 'schema', 'hdr', 'busy', 'recover', 'fence', 'led_ok',
    't:' .. tenant)
  if not head[1] or not head[2] or head[1] - 0 > ARGV[2] - 0 then return nil, head end
  local lease = 'L' .. id
  local ent = redis.call('HMGET', KEYS[4], lease, 'P' .. id)
  if not ent[1] then return nil, head, ent end
  local units, held_token, owner = parse_entry(ent[1])
  if owner ~= tenant or held_token ~= token then return nil, head, ent end
  local uf = 'u:' .. tenant
  local dem = redis.call('HMGET', KEYS[2], 'g', uf, 'p:' .. tenant, 's:')
  local expiry = redis.call('ZSCORE', KEYS[3], lease)
  if not expiry or expiry - 0 <= now then return nil, head, ent, dem end
  -- exp's first member: due for purging exactly when some entry is (acquire_reads; this
  -- lease's own expiry is later than now).
  local first = redis.call('ZRANGE', KEYS[3], '0', '0', 'WITHSCORES')
  if first[2] and first[2] - 0 <= now then return nil, head, ent, dem end
  local _, capacity, max_ttl, unknown, reserve, default = header_fields(head[2])
  local text = head[7]
  if not text and unknown == 'default' then text = default end
  local g, w, ceil, keep, _
  if text then g, _, ceil, w, _, keep = spec_fields(text) end
  local used = dem[2] and dem[2] - 0 or 0
  local pending = dem[3] and dem[3] - 0 or 0
  local level, state, lo0, up0, lo1, up1 = ended_state(dem[1], capacity, reserve, keep, g, ceil,
    used + pending, used - units + pending, -units)
  if not level then return nil, head, ent, dem end
  -- The ctx the ledger's functions take: its clock, and the policy's led_ok (ledger_flush).
  local led = {now = now, policy = {led_ok = head[6]}}
  ledger_ended(led, tenant, units, held_token, expiry - 0)
  redis.call('ZREM', KEYS[3], lease)
  redis.call('HDEL', KEYS[4], lease, 'R' .. id)  -- R: its meter reservations, if any
  if g then write_tenant_points(tenant, w, lo0, up0, lo1, up1) end
  ledger_flush(led)
  local set = false
  if used > units then
    set = true
    if state then
      redis.call('HSET', KEYS[2], uf, int(used - units), 'g', state)
    else
      redis.call('HSET', KEYS[2], uf, int(used - units))
      redis.call('HDEL', KEYS[2], 'g')
    end
  elseif state then
    set = true
    redis.call('HSET', KEYS[2], 'g', state)
    redis.call('HDEL', KEYS[2], uf)
  else
    redis.call('HDEL', KEYS[2], uf, 'g')
  end
  if set then
    -- flush's expiry: demand's sentinel read before writing and fair's still there tell
    -- that all four keys existed with the expiry they last got together.
    keep_keys(math.max(max_ttl, (head[3] and head[3] - 0 or 0) - now) + KEY_GRACE_MS,
      dem[4] and redis.call('ZSCORE', KEYS[6], FAIR_ANCHOR) ~= false, KEY_GRACE_MS)
  end
  return {'released', units}
end
