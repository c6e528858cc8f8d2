"""Smoke test of the backend fixture: one acquire/release on each backend."""

from ratequota import GroupPolicy, Policy, TenantPolicy


def test_acquire_release_roundtrip(make_quota) -> None:  # type: ignore[no-untyped-def]
    """A lease can be taken and given back on every backend."""
    client = make_quota(Policy([GroupPolicy("g", capacity=4, tenants=[TenantPolicy("a")])]))
    with client.acquire("a", 3) as lease:
        assert lease.units == 3
        assert client.snapshot("g").used == 3
    assert client.snapshot("g").used == 0
