"""The one owner of running scripts (``ratequota.clients.scripting``), without Redis.

``exchange`` is what the runner (single calls, batches) and the async batcher
(merged round trips) both step: EVALSHA first, and only the calls answered
NOSCRIPT are sent again, once, after their scripts are loaded once each.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from ratequota.clients.scripting import Load, Send, exchange, load_all, reload_missing
from ratequota.engine import protocol
from ratequota.engine.keys import KeySpace
from ratequota.engine.scripts import load_scripts

KS = KeySpace()
NOSCRIPT = redis.exceptions.NoScriptError("NOSCRIPT No matching script.")


def _acquire(lease: str) -> Any:
    return protocol.acquire_call(KS, "g", "a", 1, lease, 1000, wait=False, pending_ms=2000, purge=8)


def _release(lease: str) -> Any:
    return protocol.release_call(KS, "g", lease, tenant="a", token=1, purge=8)


def test_only_the_calls_answered_noscript_are_loaded_and_sent_again() -> None:
    """Each missing script is loaded once; the calls that ran keep their replies."""
    calls = [_acquire("1"), _release("x"), _acquire("2")]
    run = exchange(calls)
    assert next(run) == Send(tuple(calls))
    request = run.send([NOSCRIPT, "released", NOSCRIPT])
    assert request == Load(load_scripts()["acquire"].source)
    assert run.send("sha") == Send((calls[0], calls[2]))
    with pytest.raises(StopIteration) as done:
        run.send(["one", "two"])
    assert done.value.value == ["one", "released", "two"]


def test_nothing_is_resent_without_noscript() -> None:
    """Any other reply, an error reply included, is final (a timed-out script may have run)."""
    calls = [_acquire("1"), _release("x")]
    error = redis.exceptions.ResponseError("OOM command not allowed")
    run = exchange(calls)
    next(run)
    with pytest.raises(StopIteration) as done:
        run.send([error, "released"])
    assert done.value.value == [error, "released"]


def test_noscript_again_after_loading_is_the_reply() -> None:
    """A second NOSCRIPT (flushed again in between) is not retried a second time."""
    call = _acquire("1")
    run = exchange([call])
    next(run)
    assert isinstance(run.send([NOSCRIPT]), Load)
    assert run.send("sha") == Send((call,))
    with pytest.raises(StopIteration) as done:
        run.send([NOSCRIPT])
    assert done.value.value == [NOSCRIPT]


def test_a_failed_load_fails_only_the_calls_that_needed_it() -> None:
    """A driver throws a failed load in: the calls that had run keep their replies."""
    calls = [_acquire("1"), _release("x")]
    run = exchange(calls)
    next(run)
    assert isinstance(run.send([NOSCRIPT, "released"]), Load)
    down = ConnectionError("gone")
    with pytest.raises(StopIteration) as done:
        run.throw(down)
    assert done.value.value == [down, "released"]


def test_loading_every_script_and_only_the_missing_ones() -> None:
    """``load_all`` loads each script; ``reload_missing`` loads what SCRIPT EXISTS denies."""
    specs = load_scripts()
    assert list(load_all()) == [("SCRIPT LOAD", s.source) for s in specs.values()]
    probe = reload_missing()
    assert next(probe) == ("SCRIPT EXISTS", *(s.sha for s in specs.values()))
    missing = [name == "renew" for name in specs]
    assert probe.send([not m for m in missing]) == ("SCRIPT LOAD", specs["renew"].source)
    assert next(probe)[0] == "SCRIPT EXISTS"
    with pytest.raises(StopIteration) as done:
        probe.send([1] * len(specs))
    assert done.value.value == (dict.fromkeys(specs, True), ["renew"])


def test_the_async_batcher_reloads_through_the_same_exchange() -> None:
    """A round trip of the async batcher: NOSCRIPT loads and re-sends through ``exchange``;
    when the load fails, only the call that needed it fails, the others keep their replies."""
    import asyncio

    from ratequota.clients.batcher import ShardBatcher
    from ratequota.engine.batching import BatchPolicy

    acquire_sha = load_scripts()["acquire"].sha
    loads: list[str] = []

    def reply(args: tuple[Any, ...]) -> Any:
        return NOSCRIPT if args[0] == acquire_sha else "released"

    class Pipeline:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def evalsha(self, *args: Any) -> None:
            self.calls.append(args)

        async def execute(self, raise_on_error: bool) -> list[Any]:
            return [reply(args) for args in self.calls]

    class Connection:
        async def evalsha(self, *args: Any) -> Any:
            return reply(args)

        def pipeline(self, transaction: bool) -> Pipeline:
            return Pipeline()

        async def script_load(self, source: str) -> str:
            loads.append(source)
            raise ConnectionError("the shard went away")

    async def main() -> list[Any]:
        batcher = ShardBatcher(Connection(), BatchPolicy(max_in_flight=1), bound=5.0)
        first = batcher.submit(_release("x"))
        await asyncio.sleep(0)  # its round trip begins: sent alone
        queued = [batcher.submit(_acquire("1")), batcher.submit(_release("y"))]  # one pipeline
        return list(await asyncio.gather(first, *queued, return_exceptions=True))

    first, acquired, released = asyncio.run(main())
    assert first == "released" and released == "released"
    assert isinstance(acquired, ConnectionError)
    assert loads == [load_scripts()["acquire"].source]  # loaded once, for the one call
