-- _fair.lua: the admission rule of DESIGN §3, pure (no redis.call); prepended to every group
-- script before _codec.lua, _state.lua and _lib.lua.
--
-- Mirrors ratequota/fairness.py function by function:
--   claim_bounds          Claim.lo and Claim.up, from a spec's fields
--   water_level           fairness._water_level (the from-scratch walk, used by snapshot and
--                         by apply_policy's rebuild)
--   clamp_limit           the L_j = clamp(level * w_j, lo_j, up_j) of fairness.solve
--   target_of             the target min(C, Σup + idle) - idle of fairness.solve
-- Plus the pieces the incremental engine (_state.lua) needs to walk breakpoints:
--   side_of               which side of its breakpoints a tenant is on at a level
--   exact_add / exact_value   exact fixed-point sums (no drift, see docs/design.md)

local EPSILON = 1e-9
-- Not math.huge: loaded as a Redis function library, this code may read no global.
local INF = 1 / 0

-- A tenant's bounds at demand d, from its spec's never-lent part `keep` = G(1-l), guarantee
-- `g` and ceiling `ceil` = G + B (fields, not a spec table: the fast paths build none): what
-- it keeps whatever the others do, lo = max(G(1-l), min(d, G)), and what it could use,
-- up = min(G + B, max(d, lo)).
-- Comparisons rather than math.max and math.min, each written as Lua's own: max(a, b) is b
-- when b > a, else a; min(a, b) is b when b < a, else a. A math call costs a script inside
-- Redis as much as a dozen comparisons, and the fast paths make these on every call.
local function claim_bounds(keep, g, ceil, d)
  local m = d
  if g < d then m = g end  -- min(d, g)
  local lo = keep
  if m > keep then lo = m end  -- max(keep, min(d, g))
  local x = d
  if lo > d then x = lo end  -- max(d, lo)
  local up = ceil
  if x < ceil then up = x end  -- min(ceil, max(d, lo))
  return lo, up
end

-- L = clamp(level * w, lo, up); level may be INF (every tenant at its ceiling).
local function clamp_limit(level, w, lo, up)
  local x = level * w
  if lo > x then x = lo end  -- max(level * w, lo)
  if up < x then x = up end  -- min(that, up)
  return x
end

-- The units the active tenants share: min(C, Σup + idle) - idle, idle = idle tenants' reserve.
local function target_of(capacity, reserve_total, active_reserve, sum_up)
  local idle = 0
  if reserve_total - active_reserve > 0 then idle = reserve_total - active_reserve end
  local top = capacity
  if sum_up + idle < capacity then top = sum_up + idle end  -- min(C, Σup + idle)
  return top - idle
end

-- Smallest level with Σ clamp(level*w, lo, up) = target, from scratch over `rows`
-- ({lo, up, w} each); the same walk as fairness._water_level.
local function water_level(target, sum_lo, sum_up, rows)
  if target <= sum_lo then return 0 end
  -- Breakpoints: the slope grows by w at lo/w and shrinks by w at up/w. Deltas of equal
  -- breakpoints are merged, so a plain numeric sort does (a Lua comparator is several times
  -- slower), and an uncontended group (target >= sum_up) needs no sort at all.
  local delta, xs, top = {}, {}, nil
  for _, r in ipairs(rows) do
    if r.up > r.lo then
      local from, to = r.lo / r.w, r.up / r.w
      if delta[from] then delta[from] = delta[from] + r.w else xs[#xs + 1], delta[from] = from, r.w end
      if delta[to] then delta[to] = delta[to] - r.w else xs[#xs + 1], delta[to] = to, -r.w end
      if not top or to > top then top = to end
    end
  end
  if not top then return 0 end
  if target >= sum_up then return top end
  table.sort(xs)
  local value, slope, previous = sum_lo, 0, 0
  for _, x in ipairs(xs) do
    local reached = value + slope * (x - previous)
    if reached >= target and slope > 0 then
      return previous + (target - value) / slope
    end
    value, previous, slope = reached, x, slope + delta[x]
  end
  return previous
end

-- Where a tenant with breakpoints a = lo/w <= b = up/w stands at `level`, approached from
-- below (side -1), at it (0) or from above (+1): 0 at its floor (contributes lo), 1 on the
-- slope (contributes level*w), 2 at its ceiling (contributes up). At level == a == b the
-- tenant is at its floor, and past it at its ceiling: a step, never on the slope.
local function side_of(a, b, level, side)
  if level < a or (level == a and side <= 0) then return 0 end
  if level > b or (level == b and side >= 0) then return 2 end
  return 1
end

-- Exact sums of non-negative doubles: a value x counts as floor(x * 2^52) units of 2^-52,
-- held in two integer-valued doubles h (whole units) and l (units of 2^-52, 0 <= l < 2^52),
-- so every partial sum is exact while it stays below 2^53 whole units (8 x the 2^50 bound
-- on units and capacity), and a sum never depends on the order of the updates that built it.
-- Only digits below 2^-52 of a term are dropped (weights, G(1-l)), the same way every time.
local P52 = 4503599627370496

-- floor(y) for a finite y >= 0 is y - y % 1, exactly (y % 1 is y - floor(y), exact for
-- doubles), without math.floor's call.
local function exact_add(h, l, x, sign)
  local xh = x - x % 1
  local xl = 0
  if xh ~= x then  -- whole terms (most) have no fraction
    xl = (x - xh) * P52
    xl = xl - xl % 1
  end
  if sign > 0 then
    h, l = h + xh, l + xl
    if l >= P52 then h, l = h + 1, l - P52 end
  else
    h, l = h - xh, l - xl
    if l < 0 then h, l = h - 1, l + P52 end
  end
  return h, l
end

local function exact_value(h, l)
  return h + l / P52
end
