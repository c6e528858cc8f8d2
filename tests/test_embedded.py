"""The embedded store compiles each script once, with replies unchanged.

``ratequota.clients.embedded`` wraps a fakeredis server's Lua runtime so a
script's source is compiled on its first call only (fakeredis compiles it on
every call, which is what made the embedded simulation's round trip ~30 ms and
every embedded decision about twice as slow). Every embedded backend's server
is primed so. These tests check that the cache is really used with the
fakeredis this package pins, that decisions, limits and errors are exactly
those of an unwrapped server, and that an unknown server is left alone.
"""

from __future__ import annotations

import fakeredis
import pytest

from ratequota.clients.backends import embedded_backend
from ratequota.clients.embedded import _CompiledChunks, compile_once
from ratequota.clients.sync import QuotaClient
from ratequota.errors import RateQuotaError
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock

POLICY = Policy(
    (
        GroupPolicy(
            "g",
            capacity=6,
            tenants=(TenantPolicy("a", guarantee=4), TenantPolicy("b", guarantee=0)),
        ),
    )
)


def _client(server: fakeredis.FakeServer, clock: ManualClock) -> QuotaClient:
    client = QuotaClient(backend=embedded_backend(server=server), clock=clock, auto_renew=False)
    client.apply_policy(POLICY)
    return client


def _history(client: QuotaClient, clock: ManualClock) -> list[object]:
    """A fixed sequence of tries, waits, releases and expiry; what each returned."""
    seen: list[object] = []
    leases = []
    for tenant, units in [("b", 2), ("b", 2), ("b", 2), ("a", 4), ("a", 2), ("b", 1)]:
        decision = client.try_acquire(tenant, units, ttl=3.0)
        seen.append((decision.admitted, decision.reason, round(decision.limit, 6)))
        if decision.admitted:
            leases.append(decision.lease)
    clock.advance(1.0)
    for lease in leases[:2]:
        seen.append(client.release(lease).state)
    clock.advance(5.0)  # everything else expires
    seen.append(client.snapshot("g").used)
    return seen


def test_each_script_is_compiled_once() -> None:
    """After the first call of each script, further calls compile nothing."""
    server = fakeredis.FakeServer()
    clock = ManualClock()
    client = _client(server, clock)
    assert compile_once(server)
    assert compile_once(server)  # a second call keeps the same wrapper
    runtime = server._lua_runtime
    _history(client, clock)
    compiled = runtime.compiled
    assert compiled > 0
    _history(client, clock)
    assert runtime.compiled == compiled


def test_replies_are_those_of_an_unwrapped_server() -> None:
    """The same history gives the same decisions, limits, releases and state with and
    without the cache."""
    plain, cached = fakeredis.FakeServer(), fakeredis.FakeServer()
    clock_p, clock_c = ManualClock(), ManualClock()
    client_p, client_c = _client(plain, clock_p), _client(cached, clock_c)
    assert compile_once(cached)
    assert _history(client_p, clock_p) == _history(client_c, clock_c)


def test_script_errors_are_unchanged() -> None:
    """A script that raises gives the same error through the cache as without it."""
    messages = []
    for wrap in (False, True):
        server = fakeredis.FakeServer()
        conn = fakeredis.FakeRedis(server=server)
        conn.eval("return 1", 0)
        if wrap:
            assert compile_once(server)
        with pytest.raises(Exception) as info:  # noqa: PT011 - the message is compared below
            conn.eval("return redis.call('INCR', KEYS[1], 'extra')", 1, "k")
        messages.append(str(info.value))
        with pytest.raises(Exception) as syntax:  # noqa: PT011
            conn.eval("return (", 0)
        messages.append(type(syntax.value).__name__)
    assert messages[:2] == messages[2:]


def test_unknown_servers_are_left_alone() -> None:
    """No runtime yet, or one of another shape: nothing changes and False says so."""
    assert not compile_once(fakeredis.FakeServer())  # no script has run yet
    assert not compile_once(object())


def test_every_embedded_backend_compiles_each_script_once() -> None:
    """The library's embedded backends (shared, private, or on a given server) come primed:
    no caller has to ask, and a server primed twice keeps its one cache."""
    server = fakeredis.FakeServer()
    for backend in (embedded_backend(server=server), embedded_backend(server=server)):
        assert backend.connections()
    runtime = server._lua_runtime
    assert isinstance(runtime, _CompiledChunks)
    assert isinstance(embedded_backend(shared=False).connections()[0], fakeredis.FakeRedis)
    client = QuotaClient(backend=embedded_backend(server=server), auto_renew=False)
    client.apply_policy(POLICY)
    client.try_acquire("a", 1)
    compiled = runtime.compiled
    client.try_acquire("a", 1)
    assert runtime.compiled == compiled and server._lua_runtime is runtime
    client.close()


def test_errors_raised_by_the_library_still_surface() -> None:
    """A client error (a tenant the policy does not know) is raised through the cache."""
    server = fakeredis.FakeServer()
    client = _client(server, ManualClock())
    assert compile_once(server)
    with pytest.raises(RateQuotaError):
        client.try_acquire("stranger", 1)
