"""The group keys' expiry is refreshed when it runs short, not on every call (issue 11).

demand, exp, info and fair always get their expiry together (``flush`` in
``lua/_state.lua``). A call that saw them whole reads one PTTL and refreshes the
four only when the expiry left no longer covers the longest lease plus half the
grace; otherwise it leaves them alone (four PEXPIRE fewer per decision). What must
never change: every key written has an expiry, and keys outlive every lease.
"""

from __future__ import annotations

from ratequota import GroupPolicy, Policy, TenantPolicy
from ratequota.engine.keys import KeySpace
from ratequota.testing import ManualClock
from tests.bridge import raw_connection
from tests.conftest import MakeClient

TTL_S = 300
GRACE_MS = 120_000
FULL_MS = TTL_S * 1000 + GRACE_MS
POLICY = Policy(
    [
        GroupPolicy(
            "g",
            capacity=100,
            tenants=[TenantPolicy("a", weight=1.0), TenantPolicy("b", weight=2.0)],
            max_lease_ttl=TTL_S,
        )
    ]
)
KEYS = KeySpace().group("g")
FOUR = (KEYS.demand, KEYS.exp, KEYS.info, KEYS.fair)


def test_expiry_is_refreshed_only_when_short(make_quota: MakeClient) -> None:
    """A fresh group gets the full expiry; a later call leaves a still-long one alone and
    refreshes all four keys once the demand hash's runs short."""
    quota = make_quota(POLICY, clock=ManualClock())
    conn = raw_connection(quota)
    assert quota.try_acquire("a", 1).admitted
    for key in FOUR:
        assert FULL_MS - 5_000 < conn.pttl(key) <= FULL_MS, key

    # Still long enough (above the full expiry less half the grace): not rewritten.
    marker = FULL_MS - GRACE_MS // 4
    for key in FOUR:
        conn.pexpire(key, marker)
    assert quota.try_acquire("b", 1).admitted
    for key in FOUR:
        assert conn.pttl(key) <= marker, key

    # Short: all four get the full expiry again.
    conn.pexpire(KEYS.demand, 1_000)
    assert quota.try_acquire("a", 1).admitted
    for key in FOUR:
        assert conn.pttl(key) > marker, key


def test_release_that_recreates_a_lost_key_gives_it_an_expiry(make_quota: MakeClient) -> None:
    """A release that writes into a key lost meanwhile (the fair zset, recreated without its
    sentinel) refreshes every expiry instead of trusting the demand hash's."""
    quota = make_quota(POLICY, clock=ManualClock())
    conn = raw_connection(quota)
    assert quota.try_acquire("a", 3).admitted
    lease = quota.try_acquire("a", 1).lease
    assert lease is not None
    conn.delete(KEYS.fair)
    quota.release(lease)  # a's demand 4 -> 3: its breakpoints are rewritten into a new key
    assert conn.exists(KEYS.fair)
    assert conn.pttl(KEYS.fair) > 0
