"""No deadlock, measured: hundreds of threads and tasks on shared clients, through a slow link.

A real redis-server sits behind ``LatencyProxy``, a loopback TCP proxy that
delays every chunk a few milliseconds each way. 200 threads share one
``QuotaClient`` and 200 tasks share one ``AsyncQuotaClient``; for a bounded
time each runs decorated handlers (some raising) under waiting acquires.
Every call must return by its deadline, no thread may be left stuck (stacks
are dumped if one is), and at the end no units are held and every key but
the published policy and catalog has an expiry.
"""

from __future__ import annotations

import asyncio
import faulthandler
import random
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

from ratequota.clients.aio import AsyncQuotaClient
from ratequota.clients.sync import QuotaClient
from ratequota.errors import AcquireTimeout
from ratequota.policy import GroupPolicy, Policy, TenantPolicy
from tests.servers import RedisServer

POLICY = Policy(
    [
        GroupPolicy("g1", capacity=12, tenants=[TenantPolicy("a", 4), TenantPolicy("b", 4)]),
        GroupPolicy("g2", capacity=12, tenants=[TenantPolicy("c", 4), TenantPolicy("d", 4)]),
    ]
)
TENANTS = "abcd"
RUN_SECONDS = 3.0
TIMEOUT = 1.0
SOCKET_TIMEOUT = 2.0
#: Wait, plus one round trip started just before the deadline and one for the release,
#: plus the handler; a generous margin for a loaded 2-core machine.
BOUND = TIMEOUT + 2 * SOCKET_TIMEOUT + 1.0


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 delaying each chunk by up to ``max_delay`` seconds, each way.

    It runs an asyncio loop in one daemon thread; ``stop`` closes every
    connection and joins the thread (bounded).
    """

    def __init__(self, upstream_port: int, max_delay: float = 0.004) -> None:
        self.upstream_port = upstream_port
        self.max_delay = max_delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> LatencyProxy:
        """Start listening; returns once the port is known."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(random.uniform(0, self.max_delay))
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop, join the thread."""

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            self._loop.call_later(0.2, self._loop.stop)

        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(5)
        if not self._thread.is_alive():
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()


class Tally:
    """Outcomes and the slowest call, shared by threads (a lock around two updates)."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.slowest = 0.0
        self.late: list[float] = []
        self._lock = threading.Lock()

    def add(self, outcome: str, seconds: float) -> None:
        """Record one call."""
        with self._lock:
            self.outcomes[outcome] += 1
            self.slowest = max(self.slowest, seconds)
            if seconds > BOUND:
                self.late.append(seconds)


def classify(exc: BaseException | None) -> str:
    """The outcome kind of a call that raised ``exc`` (None: it succeeded)."""
    if exc is None:
        return "ok"
    if isinstance(exc, AcquireTimeout):
        return "timeout"
    if isinstance(exc, ValueError) and str(exc) == "handler failed":
        return "handler_error"
    return f"unexpected {type(exc).__name__}: {exc}"


def pick(rng: random.Random) -> tuple[str, int, bool]:
    """A random tenant, unit count, and whether the handler will raise."""
    return rng.choice(TENANTS), rng.randint(1, 3), rng.random() < 0.1


def run_threads(quota: QuotaClient, tally: Tally, count: int, end: float) -> list[threading.Thread]:
    """``count`` threads calling a decorated handler on one shared client until ``end``."""

    @quota.limit(tenant="tenant", units="units", timeout=TIMEOUT)
    def handler(tenant: str, units: int, fail: bool) -> None:
        time.sleep(random.uniform(0, 0.005))
        if fail:
            raise ValueError("handler failed")

    def work(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                handler(*pick(rng))
            except Exception as exc:
                error = exc
            tally.add(classify(error), time.monotonic() - started)

    threads = [
        threading.Thread(target=work, args=(i,), name=f"stress-{i}", daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads


async def run_tasks(url: str, tally: Tally, count: int, end: float) -> None:
    """``count`` tasks calling a decorated async handler on one shared async client."""
    quota = AsyncQuotaClient(url, socket_timeout=SOCKET_TIMEOUT, lease_ttl=5.0)

    @quota.limit(tenant="tenant", units="units", timeout=TIMEOUT)
    async def handler(tenant: str, units: int, fail: bool) -> None:
        await asyncio.sleep(random.uniform(0, 0.005))
        if fail:
            raise ValueError("handler failed")

    async def work(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await handler(*pick(rng))
            except Exception as exc:
                error = exc
            tally.add(classify(error), time.monotonic() - started)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(work(1000 + i) for i in range(count))), RUN_SECONDS + 3 * BOUND
        )
    finally:
        await quota.close()


def dump_stacks() -> str:
    """Every thread's stack, for a hang report."""
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    frames = sys._current_frames()
    return "\n".join(f"{t.name}: {frames.get(t.ident or 0)}" for t in threading.enumerate())


@pytest.mark.real_redis
@pytest.mark.slow
def test_hundreds_of_threads_and_tasks_never_hang_and_leak_nothing(
    real_redis: RedisServer,
) -> None:
    """200 threads + 200 tasks through a latency proxy: bounded calls, no stuck thread, no leak."""
    admin = QuotaClient(real_redis.url)
    admin.apply_policy(POLICY)
    proxy = LatencyProxy(real_redis.port).start()
    quota = QuotaClient(proxy.url, socket_timeout=SOCKET_TIMEOUT, lease_ttl=5.0)
    quota.load_scripts()  # as a pod does at start-up (its readiness probe), before traffic
    tally = Tally()
    end = time.monotonic() + RUN_SECONDS
    results: dict[str, Any] = {}

    def async_side() -> None:
        try:
            asyncio.run(run_tasks(proxy.url, tally, 200, end))
        except BaseException as exc:
            results["async"] = exc

    try:
        threads = run_threads(quota, tally, 200, end)
        threads.append(threading.Thread(target=async_side, name="stress-async", daemon=True))
        threads[-1].start()
        join_by = end + 3 * BOUND
        for thread in threads:
            thread.join(max(0.0, join_by - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            pytest.fail(f"threads stuck: {stuck[:10]}\n{dump_stacks()}")
    finally:
        quota.close()
        proxy.stop()

    print(f"\nstress outcomes {dict(tally.outcomes)}, slowest call {tally.slowest:.3f}s")
    assert "async" not in results, results.get("async")
    unexpected = [k for k in tally.outcomes if k.startswith("unexpected")]
    assert not unexpected, unexpected
    assert tally.outcomes["ok"] > 100 and tally.outcomes["handler_error"] > 0
    assert not tally.late, f"calls past their deadline: {tally.late[:5]}"
    for group in ("g1", "g2"):
        snap = admin.snapshot(group)
        assert snap.used == 0, (group, snap.tenants)
        assert all(t.pending == 0 for t in snap.tenants.values())
    conn = real_redis.client()
    try:
        for key in conn.scan_iter(match="rq:*"):
            name = key.decode()
            if not (name.endswith(":policy") or name.endswith(":catalog")):
                assert conn.pttl(key) > 0, f"{name} has no expiry"
    finally:
        conn.close()
        admin.close()
