"""lua/_meters.lua against ratequota/rates.py: the same decisions, states and settlements.

Random groups with a meter (per second or per minute, bursts from 1 token,
tenants with and without a guaranteed rate, weights 1e-3..1e3, debts from 0)
and random histories — requests of random size at random times (clock steps
of 0 ms up to far beyond a full refill, and backwards), settlements above and
below the estimate, lease reservations settled, replayed, conflicted, closed,
or named with a wrong id or token — are replayed through the Python reference
and, call by call, through the Lua library on fakeredis and on a real
redis-server (``tests/lua/meters_harness.lua`` loads the library and runs one
function with the states given as ARGV). Every field of every reply must be
equal: integers exactly, tags to the last bit.

Steps per backend: ``RATEQUOTA_RATE_STEPS``, else 2,000 (20,000 with
``RATEQUOTA_HYPOTHESIS_PROFILE=nightly``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis

from ratequota.policy import GroupPolicy, MeterPolicy, TenantMeter, TenantPolicy
from ratequota.rates import (
    CONTEND_MS,
    GroupBucket,
    MeterDecision,
    MeterLimits,
    ShareLimits,
    TenantBuckets,
    decide,
    horizon,
    lost_group,
    lost_tenant,
)
from ratequota.settlement import (
    MeterBook,
    Reservation,
    Settlement,
    close_reservation,
    settle,
    settle_reservation,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (ROOT / "lua" / "_meters.lua").read_text(encoding="utf-8") + (
    Path(__file__).parent / "lua" / "meters_harness.lua"
).read_text(encoding="utf-8")
SEEDS = 8


def total_steps() -> int:
    """Steps per backend for this run."""
    explicit = os.environ.get("RATEQUOTA_RATE_STEPS")
    if explicit:
        return int(explicit)
    nightly = os.environ.get("RATEQUOTA_HYPOTHESIS_PROFILE") == "nightly"
    return 20_000 if nightly else 2_000


def random_group(rnd: random.Random) -> GroupPolicy:
    """A valid group with one ``tokens`` meter, on the corners of the HTB constraints."""
    rate = rnd.choice([1, 2, 7, 60, 1_000, rnd.randint(1, 100_000), 2**30])
    burst = rnd.choice([1, 2, 10, rnd.randint(1, 5_000), 2**34])
    per = rnd.choice(["second", "minute"])
    debt = rnd.choice([None, 0, rnd.randint(0, 2 * burst)])
    count = rnd.randint(1, 4)
    rate_left = rate if rnd.random() < 0.5 else rnd.randint(0, rate)
    burst_left = burst if rnd.random() < 0.3 else rnd.randint(0, burst)
    tenants = []
    for index in range(count):
        own = rnd.randint(0, rate_left) if rnd.random() < 0.7 else 0
        rate_left -= own
        share_burst = rnd.choice([None, rnd.randint(0, burst_left)]) if own else 0
        if share_burst is None:
            share_burst = burst * own // rate
            if share_burst > burst_left:
                share_burst = burst_left
        burst_left -= share_burst
        ceil = rnd.choice([None, own, rnd.randint(own, rate)])
        resolved_ceil = rate if ceil is None else ceil
        low = share_burst
        cburst = rnd.choice([None, low, rnd.randint(low, burst)]) if resolved_ceil else 0
        if cburst is None and max(low, burst * resolved_ceil // rate) > burst:
            cburst = burst
        weight = rnd.choice([1.0, 2.0, 3.0, 1e-3, 1e3, rnd.uniform(0.01, 100.0)])
        share = TenantMeter(
            "tokens", rate=own, ceil=ceil, weight=weight, burst=share_burst, cburst=cburst
        )
        tenants.append(TenantPolicy(f"t{index}", meters=(share,)))
    meter = MeterPolicy("tokens", rate=rate, burst=burst, per=per, debt=debt)
    return GroupPolicy("g", capacity=1, tenants=tuple(tenants), meters=(meter,))


def _num(x: float) -> str:
    return repr(float(x))


def _limits_argv(meter: MeterLimits, share: ShareLimits) -> list[str]:
    return [
        str(meter.rate),
        str(meter.cap),
        str(meter.reserve),
        str(meter.floor),
        _num(meter.quantum),
        str(share.rate),
        str(share.ceil),
        str(share.cap),
        str(share.ccap),
        _num(share.weight),
    ]


def _states_argv(group: GroupBucket | None, tenant: TenantBuckets | None) -> list[str]:
    g = "" if group is None else f"{group.level}:{group.stamp}"
    t = "" if tenant is None else f"{tenant.own}:{tenant.ceil}:{tenant.stamp}:{_num(tenant.tag)}"
    return [g, t]


def _states_from(reply: list[str]) -> tuple[GroupBucket, TenantBuckets]:
    level, stamp, own, ceil, tstamp, tag = reply
    return GroupBucket(int(level), int(stamp)), TenantBuckets(
        int(own), int(ceil), int(tstamp), float(tag)
    )


class LuaMeters:
    """The Lua library behind the reference's function signatures, one EVALSHA per call."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sha = client.script_load(SCRIPT)

    def _call(self, *argv: object) -> list[str]:
        reply = self.client.evalsha(self.sha, 0, *argv)
        return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]

    def decide(
        self,
        meter: MeterLimits,
        share: ShareLimits,
        group: GroupBucket | None,
        tenant: TenantBuckets | None,
        amount: int,
        now: int,
        floor: float | None,
        contends: bool,
    ) -> MeterDecision:
        """``ratequota.rates.decide``, computed by Lua."""
        reply = self._call(
            "decide",
            *_limits_argv(meter, share),
            *_states_argv(group, tenant),
            amount,
            now,
            "" if floor is None else _num(floor),
            "1" if contends else "0",
        )
        admitted, reason, path, retry, remaining, reset, contending = reply[:7]
        g, t = _states_from(reply[7:])
        return MeterDecision(
            admitted=admitted == "1",
            reason=reason,  # type: ignore[arg-type]
            path=path or None,  # type: ignore[arg-type]
            retry_ms=int(retry) if retry else None,
            remaining=int(remaining),
            reset_ms=int(reset),
            contending=contending == "1",
            group=g,
            tenant=t,
        )

    def settle(
        self,
        meter: MeterLimits,
        share: ShareLimits,
        group: GroupBucket | None,
        tenant: TenantBuckets | None,
        path: str,
        delta: int,
        now: int,
    ) -> Settlement:
        """``ratequota.settlement.settle``, computed by Lua."""
        reply = self._call(
            "settle", *_limits_argv(meter, share), *_states_argv(group, tenant), path, delta, now
        )
        g, t = _states_from(reply[:6])
        clip = (int(reply[6]), int(reply[7]), int(reply[8]))
        return Settlement(g, t, clip)

    def lost(
        self, meter: MeterLimits, share: ShareLimits, since: int
    ) -> tuple[GroupBucket, TenantBuckets, int]:
        """``lost_group``, ``lost_tenant`` and ``horizon``, computed by Lua."""
        reply = self._call("lost", *_limits_argv(meter, share), "", "", since)
        g, t = _states_from(reply[:6])
        return g, t, int(reply[6])

    def reserve(
        self, record: Reservation, action: str, lease_id: str, token: int, actual: int
    ) -> tuple[Reservation, int | None, str]:
        """``settle_reservation``/``close_reservation``, computed by Lua."""
        final = "" if record.final is None else str(record.final)
        text = f"{record.lease_id}|{record.token}|{record.estimate}|{record.path}|{final}"
        new_text, delta, outcome = self._call("reserve", text, action, lease_id, token, actual)
        lease_id_out, token_out, estimate, path, final_out = new_text.rsplit("|", 4)
        new = Reservation(
            lease_id_out,
            int(token_out),
            record.tenant,
            int(estimate),
            path,  # type: ignore[arg-type]
            int(final_out) if final_out else None,
        )
        return new, int(delta) if delta else None, outcome


def run_history(lua: LuaMeters, rnd: random.Random, steps: int) -> int:
    """Replay ``steps`` random calls through both sides; returns how many were admissions."""
    policy = random_group(rnd)
    book = MeterBook.for_policy(policy, "tokens")
    names = [t.name for t in policy.tenants]
    now = rnd.randint(0, 10**12)
    leases: list[tuple[str, Reservation]] = []
    admitted = 0
    cap_tokens = book.meter.cap // 60_000
    for _ in range(steps):
        now += rnd.choice([0, 0, 1, 3, 17, 250, 1_000, CONTEND_MS, rnd.randint(0, 10**7), -5])
        kind = rnd.random()
        if kind < 0.6 or not leases:
            name = rnd.choice(names)
            amount = rnd.choice([0, 1, 1, 2, rnd.randint(1, max(1, cap_tokens)), cap_tokens + 1])
            floor = book.floor(now)
            contends = book.contends(name, now)
            share = book.shares[name]
            state = book.tenants.get(name)
            expected = decide(book.meter, share, book.group, state, amount, now, floor, contends)
            got = lua.decide(book.meter, share, book.group, state, amount, now, floor, contends)
            assert got == expected, (policy, name, amount, now, floor)
            book.ask(name, amount, now)
            if expected.admitted and expected.path is not None:
                admitted += 1
                record = Reservation(
                    f"L{rnd.getrandbits(40)}", rnd.randint(1, 10**9), name, amount, expected.path
                )
                leases.append((name, record))
        elif kind < 0.64:
            # Redis lost the meters' state, noticed now: every bucket restarts at its floor.
            share = book.shares[rnd.choice(names)]
            want_lost = (
                lost_group(book.meter, now),
                lost_tenant(book.meter, share, now),
                horizon(book.meter, share),
            )
            assert lua.lost(book.meter, share, now) == want_lost, (policy, share, now)
            book.group = want_lost[0]
            book.tenants = {name: lost_tenant(book.meter, book.shares[name], now) for name in names}
            book.contending = {}
        elif kind < 0.85:
            name, record = rnd.choice(leases)
            actual = max(0, record.estimate + rnd.randint(-record.estimate - 2, 2 * cap_tokens + 2))
            delta = actual - record.estimate
            share = book.shares[name]
            state = book.tenants.get(name)
            expected_s = settle(book.meter, share, book.group, state, record.path, delta, now)
            got_s = lua.settle(book.meter, share, book.group, state, record.path, delta, now)
            assert got_s == expected_s, (policy, name, delta, now)
            book.settle(name, record.path, delta, now)
        else:
            index = rnd.randrange(len(leases))
            name, record = leases[index]
            action = rnd.choice(["settle", "settle", "close"])
            lease_id = record.lease_id if rnd.random() < 0.8 else record.lease_id + "x"
            token = record.token if rnd.random() < 0.8 else record.token + 1
            actual = rnd.choice([record.estimate, record.final or 0, rnd.randint(0, 50)])
            if action == "close":
                want: tuple[Reservation, int | None, str] = (
                    close_reservation(record),
                    None,
                    "closed",
                )
            else:
                want = settle_reservation(record, lease_id, token, actual)
            assert lua.reserve(record, action, lease_id, token, actual) == want
            leases[index] = (name, want[0])
    return admitted


@pytest.fixture
def meters_lua(redis_conn: Any) -> LuaMeters:
    """The Lua library on fakeredis or on the session's real redis-server."""
    return LuaMeters(redis_conn)


def test_lua_meters_equal_the_reference(meters_lua: LuaMeters) -> None:
    """Every decision, settlement and reservation step of Lua equals rates.py, field by field."""
    steps = total_steps()
    per_seed = steps // SEEDS
    admitted = 0
    for seed in range(SEEDS):
        admitted += run_history(meters_lua, random.Random(seed), per_seed)
    # The histories must exercise admissions, not only refusals.
    assert admitted > steps // 10


def test_harness_reports_exact_integers_and_tags(meters_lua: LuaMeters) -> None:
    """Near 2**53 and with awkward weights the Lua side still returns the exact values."""
    big = 2**36
    policy = GroupPolicy(
        "g",
        capacity=1,
        tenants=(
            TenantPolicy("a", meters=(TenantMeter("tokens", rate=0, weight=3.0),)),
            TenantPolicy("b", meters=(TenantMeter("tokens", rate=0, weight=7e-3),)),
        ),
        meters=(MeterPolicy("tokens", rate=big, burst=big),),
    )
    book = MeterBook.for_policy(policy, "tokens")
    for name, amount, now, floor in [("a", big - 1, 10**12, None), ("b", 1, 10**12 + 1, 1e10 / 3)]:
        args = (book.meter, book.shares[name], book.group, book.tenants.get(name), amount, now)
        want = decide(*args, floor, False)
        got = meters_lua.decide(*args, floor, False)
        assert got == want
        book.group, book.tenants[name] = want.group, want.tenant
    assert attrs.asdict(book.tenants["b"])["tag"] == 1e10 / 3 + 1 / 7e-3
