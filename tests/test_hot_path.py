"""The shortcuts of a decision's hot path answer exactly what the general path answers.

Each shortcut skips work only when that work would change nothing: a script
call meets its exchange only on NOSCRIPT, a closed breaker is read without its
lock, a fresh catalog routes without a flow, a request without options skips
the option checks, key tuples and header shapes are remembered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from ratequota.clients.batcher import ShardBatcher
from ratequota.clients.core import QuotaCore
from ratequota.clients.failure import Breakers
from ratequota.clients.requests import acquire_request, plain_request
from ratequota.clients.runner import Runner
from ratequota.clients.settings import Settings
from ratequota.engine import protocol
from ratequota.engine.batching import BatchPolicy
from ratequota.engine.keys import KeySpace
from ratequota.engine.ledger import HOUR_MS, ledger_keys
from ratequota.engine.ops import LoadScript, ScriptCall
from ratequota.engine.scripts import load_scripts
from ratequota.errors import InvalidRequest, InvalidType
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import ManualClock

KS = KeySpace()
NOSCRIPT = redis.exceptions.NoScriptError("NOSCRIPT No matching script.")


def _acquire() -> ScriptCall:
    return protocol.acquire_call(KS, "g", "a", 1, "id", 1000, wait=False, pending_ms=2000, purge=8)


def _run_one(call: ScriptCall, perform: Any) -> tuple[list[Any], Any]:
    """Step a flow yielding ``call`` once; (the ops performed, the reply the flow got)."""

    def flow() -> Any:
        return (yield call)

    ops: list[Any] = []

    def record(op: Any) -> Any:
        ops.append(op)
        return perform(op, len(ops))

    run = Runner(flow(), Breakers(3, 1.0, lambda: 0.0), lambda route: "s", "x")
    while run.op is not None:
        run.step(record)
    return ops, run.result()


@pytest.mark.parametrize("raised", [True, False])
def test_a_single_call_meeting_noscript_loads_and_is_sent_once_more(raised: bool) -> None:
    """NOSCRIPT, raised or handed back as the reply, loads the script and re-sends the call."""
    call = _acquire()

    def perform(op: Any, n: int) -> Any:
        if n == 1:
            if raised:
                raise NOSCRIPT
            return NOSCRIPT
        return "sha" if isinstance(op, LoadScript) else "reply"

    ops, reply = _run_one(call, perform)
    assert ops == [call, LoadScript("g", call.script.source), call]
    assert reply == "reply"


def test_a_single_call_is_sent_as_it_is() -> None:
    """Without NOSCRIPT one round trip, the reply straight to the flow."""
    call = _acquire()
    ops, reply = _run_one(call, lambda op, n: ["ok"])
    assert ops == [call] and reply == ["ok"]


def test_the_async_batcher_reloads_a_call_sent_alone() -> None:
    """A call alone in its round trip meets NOSCRIPT: loaded once, sent once more."""
    sent: list[tuple[Any, ...]] = []
    loads: list[str] = []

    class Connection:
        async def evalsha(self, *args: Any) -> Any:
            sent.append(args)
            if len(sent) == 1:
                raise NOSCRIPT
            return "admitted"

        async def script_load(self, source: str) -> str:
            loads.append(source)
            return "sha"

    async def main() -> Any:
        batcher = ShardBatcher(Connection(), BatchPolicy(max_in_flight=1), bound=5.0)
        return await batcher.submit(_acquire())

    assert asyncio.run(main()) == "admitted"
    assert len(sent) == 2 and loads == [load_scripts()["acquire"].source]


def test_a_success_after_failures_still_resets_the_count() -> None:
    """The lock-free success is taken only when there is nothing to reset."""
    breakers = Breakers(2, 10.0, lambda: 0.0)
    assert breakers.refuse("s", "x") is None
    breakers.record("s", False)
    breakers.record("s", True)  # resets the one failure
    breakers.record("s", False)
    assert breakers.states() == {"s": "closed"}
    breakers.record("s", False)
    assert breakers.states() == {"s": "open"}
    assert breakers.refuse("s", "x") is not None


def test_a_plain_request_is_acquire_request_without_options() -> None:
    """Same defaults, same checks, a fresh lease id each time."""
    settings = Settings(lease_ttl=2.5, timeout=3.0)
    plain, full = plain_request(settings, "a", 2), acquire_request(settings, "a", 2)
    assert plain.lease_id != full.lease_id and len(plain.lease_id) == len(full.lease_id)
    assert (plain.tenant, plain.units, plain.group, plain.ttl_ms, plain.timeout, plain.meters) == (
        full.tenant,
        full.units,
        full.group,
        full.ttl_ms,
        full.timeout,
        full.meters,
    )
    for bad, error in (("", InvalidRequest), (3, InvalidType)):
        with pytest.raises(error):
            plain_request(settings, bad, 1)  # type: ignore[arg-type]
    for units, error in ((0, InvalidRequest), (True, InvalidType), (1.5, InvalidType)):
        with pytest.raises(error):
            plain_request(settings, "a", units)  # type: ignore[arg-type]


def test_lease_keys_are_built_once_per_group_and_hours() -> None:
    """The cached tuple holds the group's keys then its two ledger hours, as the ledger names
    them; a call in another hour names other hours; a bad group is still refused by name."""
    at = 1_800_000_000_000

    def call(now_ms: int) -> ScriptCall:
        return protocol.release_call(KS, "g{1}", "id", tenant="a", token=1, purge=8, now_ms=now_ms)

    first, again = call(at), call(at + 1)
    expected = (*KS.group("g{1}").all, *ledger_keys(KS, "g{1}", at))
    assert first.keys == expected and again.keys is first.keys
    later = call(at + 3 * HOUR_MS)
    assert later.keys[:6] == first.keys[:6] and later.keys[6:] != first.keys[6:]
    assert later.keys[6:] == tuple(ledger_keys(KS, "g{1}", at + 3 * HOUR_MS))
    with pytest.raises(InvalidType):
        protocol.release_call(KS, ["g"], "id", tenant="a", token=1, purge=8)  # type: ignore[arg-type]


def test_a_remembered_shape_does_not_hide_a_wrong_one() -> None:
    """Header checks remember right shapes only: a wrong one still asserts."""
    spec = load_scripts()["release"]
    spec.check_call(len(spec.keys), len(spec.argv))
    spec.check_call(len(spec.keys), len(spec.argv))
    with pytest.raises(AssertionError):
        spec.check_call(len(spec.keys), len(spec.argv) + 1)


def test_routed_answers_from_a_fresh_catalog_only() -> None:
    """A fresh catalog routes (the default group too); a stale one leaves it to group_of."""
    clock = ManualClock()
    core = QuotaCore(Settings(catalog_ttl=5.0), clock)
    assert core.routed("a") is None  # no policy held
    policy = Policy(
        [GroupPolicy("g", capacity=10, tenants=[TenantPolicy("a", guarantee=1)])],
        default_group="g",
    )
    core.set_policy(policy)
    assert core.routed("a") == "g" and core.routed("stranger") == "g"
    clock.advance(5.1)
    assert core.routed("a") is None


def test_the_wire_form_pre_encodes_only_what_any_connection_would_encode_alike() -> None:
    """Ints and ASCII text go as bytes; other text and other types are left to redis-py."""
    call = ScriptCall(
        load_scripts()["release"], "g", ("k:{g}", "ключ"), (7, "ascii", "été", 1.5, True)
    )
    sha, count, *rest = call.wire
    assert sha == call.script.sha and count == 2
    assert rest == [b"k:{g}", "ключ", b"7", b"ascii", "été", 1.5, True]
