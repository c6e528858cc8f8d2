"""The sync client's pre-packed script calls answer exactly what redis-py's ``evalsha`` answers.

On the backends made from URLs a single script call is packed by
``ratequota.engine.resp`` and sent by ``backends.PackedScripts`` on the
client's own pool. These tests hold both halves to redis-py: the bytes are
redis-py's bytes (both of its packers), and the replies, the errors and what
happens to the connection and the pool are those of ``client.evalsha``, on a
real server that is healthy, flushed, paused and killed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Encoder, HiredisRespSerializer, PythonRespSerializer

from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy
from ratequota.clients import backends
from ratequota.clients.backends import PackedScripts, url_backend
from ratequota.decision import LeaseInfo
from ratequota.engine import ops, protocol, resp
from ratequota.engine.keys import KeySpace
from ratequota.engine.ops import ScriptCall
from ratequota.engine.replies import decode_acquire
from ratequota.engine.scripts import ScriptSpec, load_scripts
from ratequota.policy import MeterPolicy, TenantMeter
from tests.servers import RedisServer, redis_server_binary
from tests.strategies import wire_texts, wire_values

KS = KeySpace()
NOW = 1_800_000_000_000
_ENCODER = Encoder("utf-8", "strict", False)
PACKERS = {
    "python": PythonRespSerializer(6000, _ENCODER.encode),
    "hiredis": HiredisRespSerializer(encode=_ENCODER.encode),
}


def _redis_py_bytes(call: ScriptCall, packer: str) -> bytes:
    """The bytes redis-py sends for ``client.evalsha(*call.wire)``."""
    return b"".join(PACKERS[packer].pack("EVALSHA", *call.wire))


def _calls() -> list[ScriptCall]:
    """A call of every script the clients send alone, with ASCII and other names."""
    metered = GroupPolicy(
        "груп{1}",
        capacity=10,
        tenants=[TenantPolicy("ténant", guarantee=2, meters=[TenantMeter("tokens", rate=5)])],
        meters=[MeterPolicy("tokens", rate=10, burst=20)],
    )
    lease = LeaseInfo("id-1", "ténant", "груп{1}", 2, 7, 1_800_000_000.5)
    calls = [
        protocol.apply_policy_call(KS, metered, now_ms=NOW, recover_ms=5),
        protocol.snapshot_call(KS, "g", tenants=["a", "б"], now_ms=NOW),
        protocol.renew_call(KS, lease, 30_000, purge=8, now_ms=NOW),
        protocol.settle_call(KS, lease, {"tokens": 3}, now_ms=NOW),
    ]
    for group, tenant in (("g", "a"), ("груп{1}", "ténant"), ("g" * 300, "t" * 300)):
        calls.append(
            protocol.acquire_call(
                KS,
                group,
                tenant,
                3,
                "id",
                1000,
                wait=True,
                pending_ms=2000,
                purge=8,
                shadow=True,
                meters={"tokens": 5},
            )
        )
        calls.append(
            protocol.acquire_call(
                KS, group, tenant, 1, "x" * 32, 60_000, wait=False, pending_ms=2000, purge=64
            )
        )
        calls.append(protocol.release_call(KS, group, "id", tenant=tenant, token=2**60, purge=8))
    return calls


@pytest.mark.parametrize("packer", sorted(PACKERS))
def test_every_script_call_packs_to_redis_pys_bytes(packer: str) -> None:
    """Each call of every script (keys and arguments in and beyond ASCII, clock pinned or
    not, meters named or not) is byte for byte what redis-py would send, twice over (the
    second time from the packer's memory)."""
    for call in _calls():
        for _ in range(2):
            assert call.packed == _redis_py_bytes(call, packer)


@given(
    keys=st.lists(wire_texts, max_size=12).map(tuple),
    args=st.lists(wire_values, max_size=20).map(tuple),
)
def test_any_ints_and_text_pack_to_redis_pys_bytes(
    keys: tuple[str, ...], args: tuple[int | str, ...]
) -> None:
    """Any keys, and any int and text arguments (huge, negative, empty, long, any script)."""
    call = ScriptCall(load_scripts()["snapshot"], "g", keys, args)
    expected = _redis_py_bytes(call, "python")
    assert call.packed == expected and call.packed == _redis_py_bytes(call, "hiredis")


@pytest.mark.parametrize("odd", [True, False, 1.0, 1.5, None, b"1", bytearray(b"1")])
def test_anything_but_ints_and_text_is_left_to_redis_py(odd: object) -> None:
    """A bool (which redis-py refuses), a float (its text), bytes...: not packed here, even
    right after an equal int was remembered (``True == 1``, ``1.0 == 1``)."""
    assert ScriptCall(load_scripts()["release"], "g", ("k",), (1, 0)).packed is not None
    assert ScriptCall(load_scripts()["release"], "g", ("k",), (1, odd)).packed is None  # type: ignore[arg-type]


def test_text_that_utf8_cannot_encode_fails_as_redis_py_fails() -> None:
    """A lone surrogate: the same ``UnicodeEncodeError`` from both packers."""
    call = ScriptCall(load_scripts()["release"], "g", ("k",), ("\ud800",))
    with pytest.raises(UnicodeEncodeError) as ours:
        _ = call.packed
    with pytest.raises(UnicodeEncodeError) as theirs:
        _redis_py_bytes(call, "hiredis")
    assert str(ours.value) == str(theirs.value)


def test_the_packers_memory_is_bounded_and_forgetting_changes_nothing() -> None:
    """Past its size the memory starts again; what it packs is the same before and after."""
    call = _calls()[4]
    first = call.packed
    for i in range(resp._REMEMBERED + 10):
        ScriptCall(call.script, "g", (), (f"v{i}",)).packed  # noqa: B018
    assert len(resp._packed_arg.__self__) <= resp._REMEMBERED  # type: ignore[attr-defined]
    assert call.packed == first == _redis_py_bytes(call, "hiredis")


# -- who qualifies for the packed path ---------------------------------------------------------


def test_only_a_plain_pooled_utf8_client_is_sent_packed() -> None:
    """The clients ratequota makes from URLs qualify; fakeredis, a single-connection client,
    another encoding, redis-py's default retries, or an EVALSHA reply callback keep
    redis-py's own path."""
    url = "redis://127.0.0.1:1/0"  # never connected to
    assert PackedScripts.of(url_backend(url, socket_timeout=1.0).connection("g")) is not None
    callback = redis.Redis.from_url(url)
    callback.set_response_callback("EVALSHA", lambda reply, **_: reply)
    single = redis.Redis.from_url(url)  # as single_connection_client=True makes it, unconnected
    single.connection = single.connection_pool.make_connection()
    others = [
        redis.Redis.from_url(url),  # redis-py's own retry policy
        fakeredis.FakeRedis(server=fakeredis.FakeServer()),
        single,
        redis.Redis.from_url(url, encoding="latin-1"),
        redis.Redis.from_url(url, encoding_errors="replace"),
        callback,
        object(),
    ]
    for client in others:
        assert PackedScripts.of(client) is None


# -- the same answers from a real server -----------------------------------------------------


@pytest.fixture
def server(private_redis: RedisServer) -> RedisServer:
    """A private redis-server this test may flush, pause and kill."""
    return private_redis


Send = Callable[[ScriptCall], Any]


def _paths(client: Any) -> dict[str, Send]:
    """The packed path (``EVALSHA``, as redis-py's) and redis-py's own, on the same client
    (so the same pool). tests/test_functions.py holds ``FCALL`` to the same answers."""
    packed = PackedScripts.of(client, functions=False)
    assert packed is not None
    return {"packed": packed, "evalsha": lambda call: client.evalsha(*call.wire)}


def _outcome(send: Send, call: ScriptCall) -> tuple[str, Any]:
    """What a call answered: ("reply", the reply) or (the error's type, its message)."""
    try:
        return "reply", send(call)
    except Exception as exc:
        return type(exc).__name__, str(exc)


def _policy_call(prefix: str) -> ScriptCall:
    group = GroupPolicy("g", capacity=4, tenants=[TenantPolicy("a", guarantee=2)])
    return protocol.apply_policy_call(KeySpace(prefix=prefix), group, now_ms=NOW)


def _lease_calls(prefix: str) -> list[ScriptCall]:
    ks = KeySpace(prefix=prefix)
    acquire = [
        protocol.acquire_call(
            ks,
            "g",
            "a",
            units,
            f"id{i}",
            60_000,
            wait=False,
            pending_ms=1000,
            purge=8,
            now_ms=NOW + i,
        )
        for i, units in enumerate((1, 2, 9, 3))
    ]
    release = protocol.release_call(ks, "g", "id0", tenant="a", token=0, purge=8, now_ms=NOW + 9)
    unknown = protocol.acquire_call(
        ks, "g", "nobody", 1, "id9", 60_000, wait=False, pending_ms=1000, purge=8, now_ms=NOW + 10
    )
    return [
        *acquire,
        release,
        unknown,
        protocol.snapshot_call(ks, "g", tenants=["a"], now_ms=NOW + 11),
    ]


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_replies_and_error_replies_are_redis_pys(server: RedisServer) -> None:
    """The same history in two key spaces, one per path: the same replies, admitted, refused,
    too large, unknown tenant, snapshot; NOSCRIPT after a flush and a script's own error
    come back as the same exceptions, and the connection stays usable after each."""
    client = url_backend(server.url, socket_timeout=2.0).connection("g")
    outcomes: dict[str, list[tuple[str, Any]]] = {}
    source = "return redis.call('NO_SUCH_COMMAND')"
    broken = ScriptSpec("broken", source, redis_sha1(source), (), (), True)
    failing = ScriptCall(broken, "g", ("k",), ("a",))
    for name, send in _paths(client).items():
        for spec in [*load_scripts().values(), broken]:
            client.script_load(spec.source)
        seen = [_outcome(send, _policy_call(name))]
        seen += [_outcome(send, call) for call in _lease_calls(name)]
        seen.append(_outcome(send, failing))
        client.script_flush()
        seen.append(_outcome(send, _lease_calls(name)[0]))
        seen.append(_outcome(send, ScriptCall(failing.script, "g", (), (True,))))  # type: ignore[arg-type]
        outcomes[name] = seen
    packed, general = outcomes["packed"], outcomes["evalsha"]
    assert packed == general
    assert [kind for kind, _ in packed[-3:]] == ["ResponseError", "NoScriptError", "DataError"]


def redis_sha1(source: str) -> str:
    """The SHA Redis names a script by."""
    return hashlib.sha1(source.encode()).hexdigest()


def _pool_is_whole(client: Any, send: Send | None = None) -> bool:
    """Every connection is back in the pool, and in the packed sender's own stack when
    ``send`` is one (none leaked by a failed call)."""
    pool = client.connection_pool
    stack = getattr(send, "connections", None)
    return bool(pool.pool.qsize() == pool.max_connections) and (stack is None or stack.in_use == 0)


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
@pytest.mark.parametrize("path", ["packed", "evalsha"])
def test_a_paused_then_killed_server_fails_each_path_alike(server: RedisServer, path: str) -> None:
    """Paused: the call times out at the socket timeout, the connection is dropped, nothing
    leaks, and the next call after the resume is served. Killed: connection errors, no leak,
    served again after a restart. The messages are redis-py's (they name the server)."""
    client = url_backend(server.url, socket_timeout=0.3).connection("g")
    send = _paths(client)[path]
    client.script_load(load_scripts()["acquire"].source)
    client.script_load(load_scripts()["apply_policy"].source)
    assert _outcome(send, _policy_call("p"))[0] == "reply"
    call = _lease_calls("p")[0]
    assert _outcome(send, call)[0] == "reply"
    server.pause()
    try:
        started = time.monotonic()
        kind, message = _outcome(send, call)
        assert kind == "TimeoutError" and message == f"Timeout reading from 127.0.0.1:{server.port}"
        assert time.monotonic() - started < 2.0
        assert _pool_is_whole(client, send)
    finally:
        server.resume()
    assert _outcome(send, call)[0] == "reply"
    server.kill()
    failures = {_outcome(send, call)[0] for _ in range(3)}
    assert failures == {"ConnectionError"} and _pool_is_whole(client, send)
    server.start()
    client.script_load(load_scripts()["acquire"].source)
    assert _outcome(send, call)[0] == "reply" and _pool_is_whole(client, send)


# -- the sync client takes the packed path, and leaves it when it must ----------------------


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_the_sync_client_sends_single_calls_packed(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a URL, try_acquire and release never go through ``evalsha``; with redis-py's own
    metrics on they do (each command is then counted by redis-py, as before)."""
    quota = QuotaClient.from_url(server.url)
    try:
        quota.apply_policy(Policy([GroupPolicy("g", 4, [TenantPolicy("a", guarantee=2)])]))
        client = quota.backend.connection("g")
        sent: list[tuple[Any, ...]] = []
        real = client.evalsha

        def counted(*args: Any) -> Any:
            sent.append(args)
            return real(*args)

        monkeypatch.setattr(client, "evalsha", counted)
        lease = quota.try_acquire("a", 1).lease
        assert lease is not None and quota.release(lease).state == "released"
        assert sent == []
        enabled = type("Enabled", (), {"is_enabled": lambda self: True})()
        monkeypatch.setattr(backends, "_OBSERVABILITY", lambda: enabled)
        lease = quota.try_acquire("a", 1).lease
        assert lease is not None and quota.release(lease).state == "released"
        # Each once, or twice when the first met NOSCRIPT (the calls before went by FCALL).
        named = {load_scripts()[n].sha for n in ("acquire", "release")}
        assert {args[0] for args in sent} == named and len(sent) in (2, 3, 4)
    finally:
        quota.close()


# -- the other shortcuts of a sync decision -------------------------------------------------


def test_a_remembered_call_shape_still_refuses_a_wrong_one() -> None:
    """``script_call`` remembers the shapes a header accepted; a wrong one still asserts, and a
    variadic script is checked every time."""
    keys, args = ("k",) * 8, ("a",) * 6
    assert ops.script_call("release", "g", keys, args) == ops.script_call(
        "release", "g", keys, args
    )
    with pytest.raises(AssertionError):
        ops.script_call("release", "g", keys, (*args, "extra"))
    with pytest.raises(AssertionError):
        ops.script_call("release", "g", keys[:-1], args)
    snapshot = ops.script_call("snapshot", "g", ("k",) * 6, (1, 2, 3, "t"))
    assert snapshot.args == (1, 2, 3, "t")
    with pytest.raises(AssertionError):
        ops.script_call("snapshot", "g", ("k",) * 6, (1,))


@pytest.mark.parametrize(
    "reply",
    [
        [1, "admitted", 1_800_000_060_000, 7, 1, "1.5", 3, 10, 0, 2, 0],
        [0, "tenant_limit", 0, 0, 4, "4", 9, 10, 250, 2, 0],
        [1, "group_full", 1_800_000_060_000, 8, 5, "4", 10, 10, 0, 2, 0],  # shadow mode
        [0, "too_large", 0, 0, 0, "inf", 0, 10, 100, 2, 0],
        [1, "admitted", 1_800_000_060_000, 7, 1, "1", 3, 10, 0, 2, 1],  # a replay
    ],
)
def test_a_decoding_connections_replies_decode_as_bytes_do(reply: list[Any]) -> None:
    """The reason and the numbers read from text (a connection with decode_responses) and
    from bytes give the same decision."""
    as_bytes = [v.encode() if isinstance(v, str) else v for v in reply]
    decoded = [
        decode_acquire(r, group="g", tenant="a", units=1, lease_id="id") for r in (reply, as_bytes)
    ]
    assert repr(decoded[0]) == repr(decoded[1])  # NaN limits (replays) compare unequal
    assert decoded[0].reason == reply[1]


class _Counting:
    """Wraps a backend's connections to count ``evalsha`` (as the simulation's does)."""

    def __init__(self, inner: Any, sent: list[str]) -> None:
        self._inner, self._sent = inner, sent

    def connection(self, route: str) -> Any:
        conn, sent = self._inner.connection(route), self._sent

        class Counted:
            def evalsha(self, *args: Any) -> Any:
                sent.append(route)
                return conn.evalsha(*args)

            def __getattr__(self, name: str) -> Any:
                return getattr(conn, name)

        return Counted()

    def __getattr__(self, name: str) -> Any:  # send_script too: it must not be used
        return getattr(self._inner, name)


@pytest.mark.real_redis
@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_a_backend_that_wraps_connections_sees_every_script_call(server: RedisServer) -> None:
    """A wrapper swapped in after the first calls (``sim.fleet`` counts calls so), or a
    subclass overriding ``connection``: every script call goes through their connections."""
    quota = QuotaClient.from_url(server.url)
    try:
        quota.apply_policy(Policy([GroupPolicy("g", 4, [TenantPolicy("a", guarantee=2)])]))
        quota.load_scripts()  # no NOSCRIPT below: one evalsha per call
        assert quota.try_acquire("a", 1).admitted  # sent packed, on the URL backend
        sent: list[str] = []
        quota.backend = _Counting(quota.backend, sent)  # type: ignore[assignment]
        lease = quota.try_acquire("a", 1).lease
        assert lease is not None and quota.release(lease).state == "released"
        assert sent == ["g", "g"]
    finally:
        quota.close()

    class Spied(backends.SingleBackend):
        def connection(self, route: str) -> Any:
            sent.append(route)
            return super().connection(route)

    spied = Spied(url_backend(server.url, socket_timeout=1.0).connection("g"), "spied", packed=True)
    quota = QuotaClient(backend=spied)
    try:
        sent.clear()
        assert quota.try_acquire("a", 1).admitted and "g" in sent
    finally:
        quota.close()
