"""Driven time: threads take turns on a virtual clock, in a fixed order, and never overlap.

``ratequota.sim.timing.DrivenTime`` is what makes ``simulate --driven``
repeatable; these tests check its scheduling on plain threads, with no
Redis: who runs when, that ties go to whoever paused first, that only one
enrolled thread runs at a time, and that a thread that never enrolled is
not held up.
"""

from __future__ import annotations

import os
import threading

from ratequota.sim.timing import DrivenTime, PodClock, WallTime


def _play(pauses: dict[str, list[float]]) -> list[tuple[float, str]]:
    """Each named thread pauses for the given virtual seconds in turn; the log of
    (virtual time, name) at every wake-up."""
    driven = DrivenTime(threading.Event())
    log: list[tuple[float, str]] = []
    running = [0]
    overlap = [False]

    def body(name: str, token: int) -> None:
        driven.begin(token)
        try:
            for pause in pauses[name]:
                running[0] += 1
                overlap[0] |= running[0] > 1
                log.append((driven.now(), name))
                os.sched_yield()  # give any other runnable thread its chance to overlap
                running[0] -= 1
                driven.wait(pause)
            log.append((driven.now(), name))
        finally:
            driven.leave()

    threads = [threading.Thread(target=body, args=(name, driven.enroll())) for name in pauses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert not overlap[0]
    return log


def test_threads_wake_in_virtual_time_order() -> None:
    """Wake-ups follow the virtual clock, whatever the threads' real speed."""
    log = _play({"a": [0.3, 0.3], "b": [0.2, 0.5], "c": [1.0]})
    assert [round(t, 6) for t, _ in log] == sorted(round(t, 6) for t, _ in log)
    assert log[:3] == [(0.0, "a"), (0.0, "b"), (0.0, "c")]  # enrolment order at time 0
    assert (0.2, "b") in log and (0.6, "a") in log and (0.7, "b") in log and (1.0, "c") in log


def test_ties_go_to_whoever_paused_first_and_runs_repeat() -> None:
    """Two threads due at the same instant run in the order they paused; the whole
    log is the same on every run."""
    plan = {"x": [0.5, 0.5], "y": [0.5, 0.5], "z": [0.25, 0.75]}
    first = _play(plan)
    assert [name for t, name in first if t == 0.5] == ["x", "y"]
    assert all(_play(plan) == first for _ in range(3))


def test_latency_is_spent_around_a_call_and_strangers_do_not_wait() -> None:
    """``call`` spends the latency half before and half after; a thread that never
    enrolled calls ``wait`` without blocking and without moving the clock."""
    driven = DrivenTime(threading.Event(), latency=0.004)
    seen: list[float] = []
    stranger = threading.Thread(target=lambda: driven.wait(5.0))
    stranger.start()
    stranger.join(timeout=5)
    assert not stranger.is_alive()
    token = driven.enroll()
    driven.begin(token)
    try:
        assert driven.call(lambda: seen.append(driven.now()) or "reply") == "reply"
        assert seen == [0.002]
        assert driven.now() == 0.004
    finally:
        driven.leave()


def test_pod_clock_pins_redis_time_only_when_driven() -> None:
    """In driven time the scripts see the virtual clock as Redis time; on the wall clock
    they read Redis TIME. A watched pause is noted at the run's time."""
    stop = threading.Event()
    driven = DrivenTime(stop)
    clock = PodClock(driven)
    token = driven.enroll()
    driven.begin(token)
    try:
        start_ms = clock.redis_ms()
        assert start_ms is not None
        paused: list[float] = []
        clock.watch(paused)
        clock.sleep(1.5)
        clock.watch(None)
        assert paused == [0.0]
        assert clock.monotonic() == 1.5
        assert clock.redis_ms() == start_ms + 1500
    finally:
        driven.leave()
    assert PodClock(WallTime(stop)).redis_ms() is None
