"""Failure policy (§8): circuit breaker state machine, settings validation, fail-open/local modes.

The breaker and the failure state are pure (injected clock), so most of this
runs without Redis; the fallback modes are exercised against a port nothing
listens on, where every call fails at once with "connection refused".
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

from ratequota.clients.failure import Breakers, CircuitBreaker
from ratequota.clients.settings import Settings
from ratequota.errors import BackendUnavailable, ConfigError
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock, fake_client
from tests.conftest import MakeClient
from tests.servers import RedisServer, free_port


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state, read fresh (mypy would keep a narrowed literal otherwise)."""
    return breaker.state


class FakeTime:
    """A hand-moved clock for the breaker."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_fails_fast() -> None:
    """Consecutive failures open the breaker; while open no call is allowed."""
    clock = FakeTime()
    breaker = CircuitBreaker(failures=3, reset=1.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert state(breaker) == "closed"
    breaker.failure()
    assert state(breaker) == "open"
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(1.0)


def test_breaker_success_resets_the_count() -> None:
    """Failures must be consecutive: one success in between starts the count again."""
    breaker = CircuitBreaker(failures=2, reset=1.0, clock=FakeTime())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert state(breaker) == "closed"


def test_breaker_half_open_lets_exactly_one_probe() -> None:
    """After ``reset`` one probe goes through; others still fail fast until it reports."""
    clock = FakeTime()
    breaker = CircuitBreaker(failures=1, reset=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    assert state(breaker) == "half_open"
    assert not breaker.allow()
    breaker.success()
    assert state(breaker) == "closed"
    assert breaker.allow()


def test_breaker_failed_probe_reopens_and_lost_probe_is_forgotten() -> None:
    """A failed probe reopens at once; a probe that never reports lets another go after reset."""
    clock = FakeTime()
    breaker = CircuitBreaker(failures=1, reset=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) == "open"
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()  # probe sent, never reports (its task was cancelled)
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 0.6
    assert breaker.allow()


def test_breakers_are_per_shard() -> None:
    """One shard's outage does not stop calls to another shard."""
    breakers = Breakers(failures=1, reset=1.0, clock=FakeTime())
    breakers.record("a", ok=False)
    assert isinstance(breakers.refuse("a", "shard a"), BackendUnavailable)
    assert breakers.refuse("b", "shard b") is None
    assert breakers.states() == {"a": "open", "b": "closed"}
    assert breakers.fast_failures == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_mode", "sometimes"),
        ("local_allowance", -1),
        ("local_allowance", 1.5),
        ("breaker_failures", 0),
        ("breaker_reset", 0),
        ("breaker_reset", math.inf),
        ("auto_renew", 1),
        ("renew_fraction", 1.0),
        ("renew_fraction", 0.0),
        ("batch_size", 0),
        ("batch_in_flight", True),
    ],
)
def test_settings_errors_name_the_field(field: str, value: object) -> None:
    """Every failure-policy, renewal and batching setting is validated and named in the error."""
    with pytest.raises(ConfigError, match=field) as info:
        Settings(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_local_mode_needs_an_allowance() -> None:
    """``failure_mode="local"`` with no allowance would be fail-closed in disguise: refused."""
    with pytest.raises(ConfigError, match="local_allowance"):
        Settings(failure_mode="local")


def dead_url() -> str:
    """A loopback URL nothing listens on: connections are refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


def test_fail_closed_raises_backend_unavailable_then_fails_fast(make_kind: MakeClient) -> None:
    """Default policy: a clear error; once the breaker opens, calls stop touching the network
    (the fast failure is counted: it never reached a socket). Both clients."""
    quota = make_kind.at(dead_url(), socket_timeout=0.2, breaker_failures=2, breaker_reset=5.0)
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match="unavailable"):
            quota.try_acquire("a", 1, group="g")
    with pytest.raises(BackendUnavailable, match="circuit open"):
        quota.try_acquire("a", 1, group="g")
    assert quota.stats().fast_failures == 1
    assert quota.stats().fallback_refusals == 3


def test_fail_open_admits_with_a_marked_synthetic_lease(make_kind: MakeClient) -> None:
    """fail_open admits, counts it, and the lease says it is synthetic (token 0, no Redis)."""
    quota = make_kind.at(dead_url(), socket_timeout=0.2, failure_mode="open")
    decision = quota.try_acquire("a", 3, group="g")
    assert decision.admitted and decision.reason == "backend_unavailable"
    assert decision.lease is not None and decision.lease.synthetic
    assert decision.lease.token == 0
    with quota.acquire("a", 2, group="g", timeout=1) as lease:
        assert lease.synthetic
        assert lease.renew().renewed
    assert quota.release(decision.lease).was_live
    assert quota.stats().fail_open_admits == 2


def test_local_allowance_is_bounded_per_tenant_and_given_back(make_kind: MakeClient) -> None:
    """Local mode admits up to N units per tenant at once while Redis is down, then refuses."""
    quota = make_kind.at(dead_url(), socket_timeout=0.2, failure_mode="local", local_allowance=4)
    first = quota.try_acquire("a", 3, group="g")
    assert first.admitted and first.lease is not None and first.lease.synthetic
    with pytest.raises(BackendUnavailable):
        quota.try_acquire("a", 2, group="g")
    other = quota.try_acquire("b", 4, group="g")  # per tenant: b has its own allowance
    assert other.admitted
    quota.release(first.lease)
    again = quota.try_acquire("a", 4, group="g")
    assert again.admitted
    stats = quota.stats()
    assert stats.local_admits == 3 and stats.local_units_held == 8
    assert stats.fallback_refusals == 1


# -- leaving acquire when the release fails; synthetic leases on epoch time (issue 9, item 8) --


@pytest.mark.real_redis
def test_leaving_acquire_when_redis_refuses_the_release_keeps_the_handlers_outcome(
    real_redis: RedisServer, make_kind: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis answers the release with an error (here NOPERM: the pod's user lost EVALSHA and
    FCALL while the handler ran; out of memory answers the same way): the handler's result and
    its own exception still reach the caller, on both clients; the failure is counted and
    logged; the lease expires alone. (Releasing only frees memory, so Redis no longer refuses
    it for OOM.)"""
    policy = Policy([GroupPolicy("g", 10, [TenantPolicy("a")])])
    admin: Any = real_redis.client()
    admin.execute_command("ACL", "SETUSER", "pod", "on", ">pw", "~*", "&*", "+@all")
    url = f"redis://pod:pw@127.0.0.1:{real_redis.port}/0"

    def refuse(on: bool) -> None:
        rights = ("-evalsha", "-fcall") if on else ("+evalsha", "+fcall")
        admin.execute_command("ACL", "SETUSER", "pod", *rights)

    quota = make_kind.at(url, auto_renew=False, socket_timeout=2.0)
    try:
        with caplog.at_level(logging.WARNING, logger="ratequota"):
            quota.apply_policy(policy)
            with quota.acquire("a", 3, ttl=30) as lease:
                refuse(True)
                result = "handled"
            assert result == "handled" and not lease.released
            refuse(False)
            with pytest.raises(KeyError, match="the handler's own"), quota.acquire("a", 2, ttl=30):
                refuse(True)
                raise KeyError("the handler's own")
            refuse(False)
            assert quota.stats().release_failures == 2
            assert quota.snapshot("g").used == 5  # both leases still held: they expire alone
    finally:
        refuse(False)
        admin.execute_command("ACL", "DELUSER", "pod")
        admin.close()
    failures = [r for r in caplog.records if "ends by itself" in r.getMessage()]
    assert len(failures) == 2


def test_a_synthetic_lease_expires_on_epoch_time_like_a_real_one(make_kind: MakeClient) -> None:
    """``expires_at`` of a fail-open lease is epoch seconds (Redis time), not the pod's
    monotonic clock: with a pinned clock it equals a real lease's expiry exactly. Both clients."""
    clock = ManualClock()
    policy = Policy([GroupPolicy("g", 10, [TenantPolicy("a")])])
    real = fake_client(policy, clock=clock)
    down = make_kind.at(dead_url(), socket_timeout=0.2, failure_mode="open", clock=clock)
    wall = make_kind.at(dead_url(), socket_timeout=0.2, failure_mode="open")
    try:
        granted = real.try_acquire("a", 1, ttl=30).lease
        synthetic = down.try_acquire("a", 1, group="g", ttl=30).lease
        assert granted is not None and synthetic is not None and synthetic.synthetic
        assert synthetic.expires_at == granted.expires_at == clock.redis_ms() / 1000 + 30
        unpinned = wall.try_acquire("a", 1, group="g", ttl=30).lease
        assert unpinned is not None and unpinned.expires_at > 1.6e9  # after 2020: epoch time
        with down.acquire("a", 2, group="g", ttl=5, timeout=0) as lease:
            assert lease.expires_at == clock.redis_ms() / 1000 + 5
    finally:
        real.close()
