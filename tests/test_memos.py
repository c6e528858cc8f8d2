"""The scripts' memos answer exactly what parsing answers, and stay bounded (lua/_codec.lua).

A function library's top-level tables outlive the call, so the scripts remember
the texts they parse: policy headers, tenants' specs, fair states and ledger
hours. These tests run the library's own definitions (linked as an entry script
links them) through ``EVAL`` on fakeredis and on a real redis-server: a memo
never holds more than ``MEMO_ENTRIES`` texts and answers after being emptied as
before; the fair state a fast path remembers for the text it writes is the
text's own parse, and a step from a remembered state decides as the same step
from a parsed one. On a real server, a history long enough to fill and empty
every memo answers by ``FCALL`` (memos kept from call to call) exactly as by
``EVALSHA`` (memos made afresh each call) and leaves the same keys.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratequota.clients.backends import PackedScripts, url_backend
from ratequota.engine import protocol, scripts
from ratequota.engine.keys import KeySpace
from ratequota.engine.ops import ScriptCall
from ratequota.engine.scripts import function_library, load_scripts
from ratequota.policy import GroupPolicy, TenantPolicy
from tests.redis_state import dump_keys
from tests.servers import RedisServer

#: lua/_codec.lua's MEMO_ENTRIES, read from the text so the tests follow it.
MEMO_ENTRIES = int(
    next(
        line.split("=")[1]
        for line in (scripts._lua_dir() / "_codec.lua").read_text().splitlines()
        if line.startswith("local MEMO_ENTRIES")
    )
)


def linked(body: str) -> str:
    """``body`` after the library definitions it reaches, with their memos kept as the function
    library keeps them (by ``EVAL`` they last for the call: the harness runs in one)."""
    folder = scripts._lua_dir()
    parts = scripts.library_parts(
        "\n".join((folder / f"{n}.lua").read_text(encoding="utf-8") for n in scripts.LIBRARY)
    )
    return f"{scripts.keeping_memos(scripts.link(parts, body))}\n{body}"


def test_only_the_function_library_keeps_memos() -> None:
    """The scripts sent by EVALSHA carry the memos switched off, the library switched on."""
    for spec in load_scripts().values():
        assert scripts.MEMOS_ON not in spec.source
        assert spec.source.count(scripts.MEMOS_OFF) == 1, spec.name
    assert function_library().source.count(scripts.MEMOS_ON) == 1
    assert scripts.MEMOS_OFF not in function_library().source
    assert scripts.keeping_memos("local x = 1") == "local x = 1"
    with pytest.raises(ValueError, match="MEMOS_KEPT"):
        scripts.keeping_memos(f"{scripts.MEMOS_OFF}\n{scripts.MEMOS_OFF}")


#: The keys a harness names: the fast paths read KEYS[2], the group's demand key, as STATES'
#: key (nothing is read from or written to them).
KEYS = ("{m}:policy", "{m}:demand")


def run_lua(conn: Any, body: str, *args: object) -> list[Any]:
    reply = conn.eval(linked(body), len(KEYS), *KEYS, *args)
    return [v.decode() if isinstance(v, bytes) else v for v in reply]


def held_after(texts: list[str]) -> int:
    """How many texts a memo holds after looking up ``texts`` in order, remembering each it
    misses: the rule of lua/_codec.lua's remember, as a model."""
    held: set[str] = set()
    for text in texts:
        if text not in held:
            if len(held) >= MEMO_ENTRIES:
                held.clear()
            held.add(text)
    return len(held)


# A memo's keys, counted, when its own count (field [0]) agrees; nil otherwise.
HELD = """
local function held(memo)
  local n = 0
  for k in pairs(memo) do
    if k ~= 0 then n = n + 1 end
  end
  if memo[0] ~= n then return nil end
  return n
end
"""

# Parses `count` distinct specs and headers, twice each, checking every answer against the
# values their texts were built from; then counts what each memo holds.
BOUNDED = (
    HELD
    + """
local count = tonumber(ARGV[1])
for pass = 1, 2 do
  for i = 1, count do
    local g, l, ceil, w, m, keep = spec_fields(i .. '|0.5|3|2|' .. (i + 7))
    if g ~= i or l ~= 0.5 or ceil ~= i + 3 or w ~= 2 or m ~= i + 7 or keep ~= i / 2 then
      return {'spec', i, pass}
    end
    local v, c, ttl, unknown, reserve, default =
      header_fields('2|' .. i .. '|' .. (i * 10) .. '|60000|refuse|' .. i .. '|1|0|||')
    if v ~= i or c ~= i * 10 or ttl ~= 60000 or unknown ~= 'refuse' or reserve ~= i or
        default ~= '1|0|||' then
      return {'header', i, pass}
    end
  end
end
local specs, headers = held(SPECS), held(HEADERS)
if not specs or not headers then return {'miscounted'} end
local last = tostring(count) .. '|0.5|3|2|' .. (count + 7)
return {'ok', specs, headers, SPECS[last] and 1 or 0, MEMO_ENTRIES}
"""
)


@pytest.mark.parametrize("count", [10, MEMO_ENTRIES, MEMO_ENTRIES + 1, 3 * MEMO_ENTRIES + 5])
def test_a_memo_holds_at_most_its_entries_and_answers_as_a_parse(
    redis_conn: Any, count: int
) -> None:
    """Up to MEMO_ENTRIES texts a memo keeps them all; past it, emptied and filled again, it
    holds what came since, the last text among them, and every answer is the parse's."""
    status, specs, headers, last_kept, entries = run_lua(redis_conn, BOUNDED, count)
    assert status == "ok" and entries == MEMO_ENTRIES
    assert specs == headers == held_after([str(i) for i in range(1, count + 1)] * 2)
    assert specs <= MEMO_ENTRIES
    assert last_kept == 1


# Runs ended_state (lua/_fast.lua) along a chain of demand changes in one group: after each
# step it checks that the state remembered for the new text is that text's parse, and that
# the same step from the same text, with the memo emptied (a parse), answers the same. A step
# not written (a refusal writes no state) leaves the group's text as it was, and the memo
# holding one the group does not have.
CHAIN = """
local capacity, reserve, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local specs, demand, text, hits, applied = {}, {}, false, 0, 0
for t = 1, n do specs[t], demand[t] = ARGV[3 + t], 0 end
local FULL = '^([^|]+)|' .. string.rep('([^|]+)|', 10) .. '([^|]+)$'
local function same(a, b)
  for i = 1, 7 do
    if a[i] ~= b[i] then return false end
  end
  return true
end
for s = 4 + n, #ARGV, 3 do
  local t, d1, written = tonumber(ARGV[s]), tonumber(ARGV[s + 1]), ARGV[s + 2] == '1'
  local g, _, ceil, _, _, keep = spec_fields(specs[t])
  local d0 = demand[t]
  if text and STATES[KEYS[2]] and STATES[KEYS[2]][16] == text then hits = hits + 1 end
  local first = {ended_state(text, capacity, reserve, keep, g, ceil, d0, d1, d1 - d0)}
  for k in pairs(STATES) do STATES[k] = nil end
  STATES[0] = 0
  local parsed = {ended_state(text, capacity, reserve, keep, g, ceil, d0, d1, d1 - d0)}
  if not same(first, parsed) then return {'hit and parse differ', s} end
  local level, out = first[1], first[2]
  if level then
    if out then
      local m = STATES[KEYS[2]]
      if m[16] ~= out then return {'not remembered', s} end
      local f = {string.match(out, FULL)}
      local lam = f[1] - 0
      if lam < 0 then lam = math.huge end
      for i = 1, 7 do
        if m[i] ~= f[5 + i] or m[7 + i] ~= f[5 + i] - 0 then return {'field', s, i} end
      end
      if m[15] ~= lam then return {'level', s} end
    end
    if written then text, demand[t], applied = out, d1, applied + 1 end
  end
end
return {'ok', applied, hits}
"""


@st.composite
def chains(draw: st.DrawFn) -> list[object]:
    """A group's capacity and reserve, its tenants' specs, and demand changes of them."""
    n = draw(st.integers(1, 5))
    specs = []
    for _ in range(n):
        g = draw(st.integers(0, 20))
        lendable = draw(st.sampled_from(["0", "0.5", "1", "0.25"]))
        borrow = draw(st.sampled_from(["", "0", "3", "40"]))
        weight = draw(st.sampled_from(["1", "2", "0.5"]))
        specs.append(f"{g}|{lendable}|{borrow}|{weight}|")
    steps: list[object] = []
    for t, d, written in draw(
        st.lists(
            st.tuples(st.integers(1, n), st.integers(0, 60), st.sampled_from([1, 1, 1, 0])),
            min_size=1,
            max_size=40,
        )
    ):
        steps += [t, d, written]
    return [draw(st.integers(1, 120)), draw(st.integers(0, 30)), n, *specs, *steps]


@given(chain=chains())
def test_a_remembered_state_is_its_texts_parse_and_decides_as_one(
    redis_conn: Any, chain: list[object]
) -> None:
    status, *rest = run_lua(redis_conn, CHAIN, *chain)
    assert status == "ok", rest


def test_steps_within_one_level_hit_the_memo(redis_conn: Any) -> None:
    """A chain of demand changes that needs no walk finds each state it wrote remembered."""
    chain = [1000, 0, 2, "10|0||1|", "10|0.5|5|1|"]
    chain += [1, 3, 1, 2, 4, 1, 1, 5, 1, 2, 1, 1, 1, 0, 1, 2, 0, 1]
    status, applied, hits = run_lua(redis_conn, CHAIN, *chain)
    assert status == "ok" and applied == 6 and hits == 5


# Steps of `per_group` demand changes in each of `groups` groups, taken in turn, never
# emptying the memo: how many states it holds at the end, and how many steps found theirs.
PER_GROUP = (
    HELD
    + """
local groups, steps = tonumber(ARGV[1]), tonumber(ARGV[2])
local texts, hits = {}, 0
local g, _, ceil, _, _, keep = spec_fields('10|0||1|')
for s = 1, steps do
  for k = 1, groups do
    KEYS[2] = 'demand-' .. k
    local text = texts[k] or false
    local m = STATES[KEYS[2]]
    if text and m and m[16] == text then hits = hits + 1 end
    local d0 = (s - 1) % 5
    local _, out = ended_state(text, 1000, 0, keep, g, ceil, d0, d0 + 1, 1)
    texts[k] = out
  end
end
return {held(STATES) or -1, hits}
"""
)


@pytest.mark.parametrize("groups", [1, 3, MEMO_ENTRIES + 1])
def test_the_state_memo_keeps_one_state_per_group(redis_conn: Any, groups: int) -> None:
    """A group's older states leave the memo as its new ones come: it holds a state per
    group, and while the groups fit, every decision after a group's first finds its own."""
    steps = 4
    held, hits = run_lua(redis_conn, PER_GROUP, groups, steps)
    assert held == held_after([str(k) for k in range(groups)] * steps)
    if groups <= MEMO_ENTRIES:
        assert hits == groups * (steps - 1)
    else:
        assert hits < groups * (steps - 1)


# -- on a real server: FCALL (memos kept) against EVALSHA (memos made afresh) -----------------

NOW = 1_800_000_000_000
HOUR_MS = 3_600_000


def _history(prefix: str, tenants: int) -> list[tuple[str, Any]]:
    """Calls of a group whose every tenant has a spec of its own, two policy versions, and a
    clock that crosses many ledger hours: more texts than any memo holds."""
    ks = KeySpace(prefix=prefix)
    calls: list[tuple[str, Any]] = []
    for version in range(2):
        group = GroupPolicy(
            "g",
            capacity=5 * tenants + version,
            tenants=[TenantPolicy(f"t{i}", guarantee=1, borrow_limit=i) for i in range(tenants)],
        )
        calls.append(("call", protocol.apply_policy_call(ks, group, now_ms=NOW)))
        for i in range(tenants):
            now = NOW + (version * tenants + i) * HOUR_MS // 2
            lease_id = f"v{version}-{i}"
            calls.append(
                (
                    "call",
                    protocol.acquire_call(
                        ks,
                        "g",
                        f"t{i}",
                        1 + i % 4,
                        lease_id,
                        HOUR_MS,
                        wait=False,
                        pending_ms=1000,
                        purge=8,
                        now_ms=now,
                    ),
                )
            )
            if i % 3 == 0:
                calls.append(("release", (ks, lease_id, f"t{i}", now + 1)))
    return calls


def _run(send: PackedScripts, calls: list[tuple[str, Any]]) -> list[Any]:
    """Every call's reply; a release takes the token its lease's acquire answered."""
    tokens: dict[str, int] = {}
    replies = []
    for kind, what in calls:
        call: ScriptCall
        if kind == "release":
            ks, lease_id, tenant, now = what
            call = protocol.release_call(
                ks,
                "g",
                lease_id,
                tenant=tenant,
                token=tokens.get(lease_id, 0),
                purge=8,
                now_ms=now,
            )
        else:
            call = what
        reply = send(call)
        if call.script.name == "acquire" and reply[0] == 1:
            tokens[call.args[4]] = int(reply[3])
        replies.append(reply)
    return replies


def _without_prefix(keys: dict[bytes, Any], prefix: str) -> dict[bytes, Any]:
    return {
        k.replace(prefix.encode(), b"", 1): v
        for k, v in keys.items()
        if k.startswith(prefix.encode())
    }


@pytest.mark.real_redis
def test_fcall_with_memos_answers_a_long_history_as_evalsha(real_redis: RedisServer) -> None:
    tenants = MEMO_ENTRIES + 40
    client = url_backend(real_redis.url, socket_timeout=5.0).connection("g")
    for spec in load_scripts().values():
        client.script_load(spec.source)
    fcall, evalsha = PackedScripts(client), PackedScripts(client, functions=False)
    by_fcall = _run(fcall, _history("fc", tenants))
    by_evalsha = _run(evalsha, _history("ev", tenants))
    assert by_fcall == by_evalsha
    assert (
        sum(1 for r in by_fcall if isinstance(r, list) and r[:2] == [1, b"admitted"]) == 2 * tenants
    )
    keys = dump_keys(client, expiry=True)
    assert _without_prefix(keys, "fc") == _without_prefix(keys, "ev")
    fcall.close()
    evalsha.close()
    client.close()
