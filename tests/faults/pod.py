"""One pod of a fault run: a separate process running a random workload through ratequota's public API.

``python -m tests.faults.pod --config run.json --name p0 --mode sync --seed 7 --history p0.jsonl``

Several workers (threads of one ``QuotaClient`` with ``--mode sync``, tasks of
one ``AsyncQuotaClient`` with ``--mode async``) each loop until the run's stop
time: ``try_acquire`` (leases kept, renewed and released explicitly, some
abandoned to expire, some released late on purpose), ``acquire`` with a
deadline held in a ``with`` block (renewed in the background, sometimes
explicitly too) and ``release``/``renew`` of held leases. Every call becomes
one record (see ``records``): what was asked, what the library answered, the
Redis times it reported, and the local clocks around it. Request ids are
chosen here (``<pod>.<worker>.<seq>``), so the checker can tell whose a lease
in a snapshot is even when the call that made it never returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ratequota
from ratequota import AsyncQuotaClient, LeaseInfo, QuotaClient
from tests.faults.records import JsonlWriter

__all__ = ["PodConfig", "Worker", "main"]


class PodConfig:
    """The run's settings every pod reads from the driver's JSON file."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.urls: list[str] = list(raw["urls"])
        self.shard_ids: list[str] = list(raw["shard_ids"])
        self.client_options: dict[str, Any] = dict(raw["client_options"])
        self.tenants: dict[str, int] = dict(raw["tenants"])  # tenant -> most units per request
        self.workers: int = int(raw["workers"])
        self.ttl_range: tuple[float, float] = tuple(raw["ttl_range"])  # type: ignore[assignment]
        self.timeout_range: tuple[float, float] = tuple(raw["timeout_range"])  # type: ignore[assignment]
        self.hold_range: tuple[float, float] = tuple(raw["hold_range"])  # type: ignore[assignment]
        self.think_range: tuple[float, float] = tuple(raw["think_range"])  # type: ignore[assignment]
        self.stop_at_wall: float = float(raw["stop_at_wall"])
        self.max_held: int = int(raw.get("max_held", 3))


def _error_name(exc: BaseException) -> str:
    """``ClassName`` of a ratequota error, ``foreign:ClassName`` of anything else (a bug)."""
    name = type(exc).__name__
    return name if isinstance(exc, ratequota.RateQuotaError) else f"foreign:{name}"


def lease_fields(info: LeaseInfo, ttl_ms: int | None) -> dict[str, Any]:
    """What a record keeps of a lease: ids, token, units, and Redis times as reported."""
    expiry_ms = round(info.expires_at * 1000)
    fields: dict[str, Any] = {
        "lease_id": info.id,
        "tenant": info.tenant,
        "group": info.group,
        "units": info.units,
        "token": info.token,
        "expiry_ms": expiry_ms,
        "replay": info.replay,
        "synthetic": info.synthetic,
    }
    if ttl_ms is not None and not info.replay and not info.synthetic:
        # The script sets expiry = its TIME + ttl, so this is the admission's Redis time.
        fields["admit_ms"] = expiry_ms - ttl_ms
    return fields


class Worker:
    """One worker's random choices and records; the sync and async loops only perform them."""

    def __init__(self, pod: str, index: int, seed: int, config: PodConfig, out: JsonlWriter):
        self.pod = pod
        self.index = index
        self.rng = random.Random(f"{seed}/{pod}/{index}")
        self.config = config
        self.out = out
        self.seq = 0
        #: try_acquire leases held: (info, last expiry in ms reported, ttl in s)
        self.held: list[tuple[LeaseInfo, int]] = []
        #: abandoned leases, released again later (after their expiry) on purpose
        self.abandoned: list[tuple[LeaseInfo, int]] = []

    def next_id(self) -> str:
        """A request id naming the pod, the worker and the call."""
        self.seq += 1
        return f"{self.pod}.{self.index}.{self.seq}"

    def choose(self) -> str:
        """The next operation."""
        roll = self.rng.random()
        if self.held and roll < 0.25:
            return "release"
        if self.held and roll < 0.40:
            return "renew"
        if self.held and roll < 0.44:
            return "abandon"
        if self.abandoned and roll < 0.48:
            return "release_stale"
        if len(self.held) < self.config.max_held and roll < 0.75:
            return "try_acquire"
        return "acquire"

    def request(self) -> tuple[str, int, float]:
        """A tenant, units and ttl (s) for a new acquire."""
        tenant = self.rng.choice(sorted(self.config.tenants))
        units = self.rng.randint(1, self.config.tenants[tenant])
        ttl = round(self.rng.uniform(*self.config.ttl_range), 3)
        return tenant, units, ttl

    def think(self) -> float:
        """Pause between operations (keeps the machine usable)."""
        return self.rng.uniform(*self.config.think_range)

    def stopping(self) -> bool:
        """True once the run's stop time has passed."""
        return time.time() >= self.config.stop_at_wall

    def begin(self, op: str, **fields: Any) -> dict[str, Any]:
        """A record for a call about to start (clocks read last, right before the call)."""
        record: dict[str, Any] = {"kind": "call", "op": op, "pod": self.pod, "worker": self.index}
        record.update(fields)
        record["mono_start"] = time.monotonic()
        record["wall_start"] = time.time()
        return record

    def end(self, record: dict[str, Any], **fields: Any) -> None:
        """Close and write a record (clocks read first, right after the call returned)."""
        record["mono_end"] = time.monotonic()
        record["wall_end"] = time.time()
        record.update(fields)
        self.out.write(record)

    def failed(self, record: dict[str, Any], exc: BaseException) -> None:
        """Close a record for a call that raised."""
        fields: dict[str, Any] = {
            "outcome": "error",
            "error": _error_name(exc),
            "message": str(exc),
        }
        if not isinstance(exc, ratequota.RateQuotaError):
            fields["traceback"] = traceback.format_exc()
        self.end(record, **fields)

    def decided(self, record: dict[str, Any], decision: ratequota.Decision, ttl_ms: int) -> None:
        """Close a try_acquire record and keep an admitted lease."""
        fields: dict[str, Any] = {
            "outcome": "admitted" if decision.admitted else "refused",
            "reason": decision.reason,
            "group": decision.group,
            "capacity": decision.capacity,
            "group_used": decision.group_used,
            "used": decision.used,
        }
        if decision.lease is not None:
            fields.update(lease_fields(decision.lease, ttl_ms))
        self.end(record, **fields)
        if decision.lease is not None and not decision.lease.synthetic:
            self.held.append((decision.lease, fields["expiry_ms"]))

    def pick_held(self) -> tuple[LeaseInfo, int]:
        """Remove and return a random held lease."""
        return self.held.pop(self.rng.randrange(len(self.held)))


def _lease_record(info: LeaseInfo, expiry_ms: int) -> dict[str, Any]:
    return {
        "lease_id": info.id,
        "tenant": info.tenant,
        "group": info.group,
        "units": info.units,
        "token": info.token,
        "expiry_ms": expiry_ms,
    }


# -- sync -------------------------------------------------------------------------------------


def run_sync_worker(worker: Worker, quota: QuotaClient, stop: threading.Event) -> None:
    """The worker's loop on a sync client, until the stop time or a stop signal."""
    while not worker.stopping() and not stop.is_set():
        op = worker.choose()
        try:
            sync_step(worker, quota, op)
        except Exception as exc:  # a bug in the pod or the library; recorded, the loop goes on
            worker.failed(worker.begin("step", step=op), exc)
        stop.wait(worker.think())
    for info, expiry_ms in worker.held:
        _sync_release(worker, quota, info, expiry_ms, "final")
    worker.held.clear()


def _sync_release(w: Worker, quota: QuotaClient, info: LeaseInfo, expiry_ms: int, via: str) -> None:
    record = w.begin("release", via=via, **_lease_record(info, expiry_ms))
    try:
        result = quota.release(info)
    except ratequota.RateQuotaError as exc:
        w.failed(record, exc)
    else:
        w.end(record, outcome="ok", state=result.state, freed=result.units, deadline_s=0.0)


def sync_step(w: Worker, quota: QuotaClient, op: str) -> None:
    """Perform one operation with the sync client and record it."""
    if op == "try_acquire":
        tenant, units, ttl = w.request()
        rid = w.next_id()
        record = w.begin(
            op, tenant=tenant, units=units, request_id=rid, ttl_ms=round(ttl * 1000), deadline_s=0.0
        )
        try:
            decision = quota.try_acquire(tenant, units, ttl=ttl, request_id=rid)
        except ratequota.RateQuotaError as exc:
            w.failed(record, exc)
        else:
            w.decided(record, decision, round(ttl * 1000))
    elif op == "release":
        info, expiry_ms = w.pick_held()
        _sync_release(w, quota, info, expiry_ms, "explicit")
    elif op == "release_stale":
        info, expiry_ms = w.abandoned.pop(0)
        if time.time() * 1000 > expiry_ms + 50:
            _sync_release(w, quota, info, expiry_ms, "stale")
        else:
            w.abandoned.append((info, expiry_ms))
    elif op == "abandon":
        info, expiry_ms = w.pick_held()
        w.abandoned.append((info, expiry_ms))
        w.out.write({"kind": "abandon", "pod": w.pod, **_lease_record(info, expiry_ms)})
    elif op == "renew":
        index = w.rng.randrange(len(w.held))
        info, expiry_ms = w.held[index]
        ttl = round(w.rng.uniform(*w.config.ttl_range), 3)
        record = w.begin(
            op, ttl_ms=round(ttl * 1000), deadline_s=0.0, **_lease_record(info, expiry_ms)
        )
        try:
            result = quota.renew(info, ttl)
        except ratequota.RateQuotaError as exc:
            w.failed(record, exc)
            return
        new_expiry = round(result.expires_at * 1000)
        w.end(record, outcome="ok", renewed=result.renewed, new_expiry_ms=new_expiry)
        if result.renewed:
            w.held[index] = (info, new_expiry)
        else:
            w.held.pop(index)
    elif op == "acquire":
        _sync_acquire(w, quota)


def _sync_acquire(w: Worker, quota: QuotaClient) -> None:
    tenant, units, ttl = w.request()
    timeout = round(w.rng.uniform(*w.config.timeout_range), 3)
    hold = w.rng.uniform(*w.config.hold_range)
    renew_inside = w.rng.random() < 0.3
    rid = w.next_id()
    ttl_ms = round(ttl * 1000)
    record = w.begin(
        "acquire", tenant=tenant, units=units, request_id=rid, ttl_ms=ttl_ms, deadline_s=timeout
    )
    exit_record: dict[str, Any] | None = None
    try:
        with quota.acquire(tenant, units, ttl=ttl, timeout=timeout, request_id=rid) as lease:
            w.end(record, outcome="admitted", reason="admitted", **lease_fields(lease.info, ttl_ms))
            record = {}
            if renew_inside:
                time.sleep(hold / 2)
                r = w.begin(
                    "renew",
                    ttl_ms=ttl_ms,
                    deadline_s=0.0,
                    via="context",
                    **_lease_record(lease.info, round(lease.expires_at * 1000)),
                )
                try:
                    result = lease.renew(ttl)
                except ratequota.RateQuotaError as exc:
                    w.failed(r, exc)
                else:
                    w.end(
                        r,
                        outcome="ok",
                        renewed=result.renewed,
                        new_expiry_ms=round(result.expires_at * 1000),
                    )
                time.sleep(hold / 2)
            else:
                time.sleep(hold)
            # Background renewals moved the expiry: the record keeps the last one reported.
            r = w.begin(
                "release",
                via="context",
                lost=lease.lost,
                **_lease_record(lease.info, round(lease.expires_at * 1000)),
            )
            try:
                released = lease.release()
            except ratequota.RateQuotaError as exc:
                w.failed(r, exc)
            else:
                w.end(r, outcome="ok", state=released.state, freed=released.units, deadline_s=0.0)
            exit_record = w.begin("exit", lease_id=rid, deadline_s=0.0)
    except ratequota.RateQuotaError as exc:
        if record:
            reason = "timeout" if isinstance(exc, ratequota.AcquireTimeout) else None
            w.failed(record, exc) if reason is None else w.end(
                record, outcome="refused", reason=reason, error=_error_name(exc)
            )
        else:  # leaving the with block raised: the handler's own outcome would be lost
            w.failed(exit_record or w.begin("exit", lease_id=rid, deadline_s=0.0), exc)
        return
    if exit_record is not None:
        w.end(exit_record, outcome="ok")


def run_sync(config: PodConfig, name: str, seed: int, out: JsonlWriter) -> None:
    """A sync pod: one ``QuotaClient`` shared by ``config.workers`` threads."""
    quota = QuotaClient.sharded(config.urls, shard_ids=config.shard_ids, **config.client_options)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workers = [Worker(name, i, seed, config, out) for i in range(config.workers)]
    threads = [
        threading.Thread(target=run_sync_worker, args=(w, quota, stop), daemon=True)
        for w in workers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    quota.close()


# -- async ------------------------------------------------------------------------------------


async def run_async_worker(worker: Worker, quota: AsyncQuotaClient, stop: asyncio.Event) -> None:
    """The worker's loop on an async client, until the stop time or a stop signal."""
    while not worker.stopping() and not stop.is_set():
        op = worker.choose()
        try:
            await async_step(worker, quota, op)
        except Exception as exc:  # a bug in the pod or the library; recorded, the loop goes on
            worker.failed(worker.begin("step", step=op), exc)
        try:
            await asyncio.wait_for(stop.wait(), worker.think())
        except asyncio.TimeoutError:
            pass
    for info, expiry_ms in worker.held:
        await _async_release(worker, quota, info, expiry_ms, "final")
    worker.held.clear()


async def _async_release(
    w: Worker, quota: AsyncQuotaClient, info: LeaseInfo, expiry_ms: int, via: str
) -> None:
    record = w.begin("release", via=via, **_lease_record(info, expiry_ms))
    try:
        result = await quota.release(info)
    except ratequota.RateQuotaError as exc:
        w.failed(record, exc)
    else:
        w.end(record, outcome="ok", state=result.state, freed=result.units, deadline_s=0.0)


async def async_step(w: Worker, quota: AsyncQuotaClient, op: str) -> None:
    """Perform one operation with the async client and record it (mirrors ``sync_step``)."""
    if op == "try_acquire":
        tenant, units, ttl = w.request()
        rid = w.next_id()
        record = w.begin(
            op, tenant=tenant, units=units, request_id=rid, ttl_ms=round(ttl * 1000), deadline_s=0.0
        )
        try:
            decision = await quota.try_acquire(tenant, units, ttl=ttl, request_id=rid)
        except ratequota.RateQuotaError as exc:
            w.failed(record, exc)
        else:
            w.decided(record, decision, round(ttl * 1000))
    elif op == "release":
        info, expiry_ms = w.pick_held()
        await _async_release(w, quota, info, expiry_ms, "explicit")
    elif op == "release_stale":
        info, expiry_ms = w.abandoned.pop(0)
        if time.time() * 1000 > expiry_ms + 50:
            await _async_release(w, quota, info, expiry_ms, "stale")
        else:
            w.abandoned.append((info, expiry_ms))
    elif op == "abandon":
        info, expiry_ms = w.pick_held()
        w.abandoned.append((info, expiry_ms))
        w.out.write({"kind": "abandon", "pod": w.pod, **_lease_record(info, expiry_ms)})
    elif op == "renew":
        index = w.rng.randrange(len(w.held))
        info, expiry_ms = w.held[index]
        ttl = round(w.rng.uniform(*w.config.ttl_range), 3)
        record = w.begin(
            op, ttl_ms=round(ttl * 1000), deadline_s=0.0, **_lease_record(info, expiry_ms)
        )
        try:
            result = await quota.renew(info, ttl)
        except ratequota.RateQuotaError as exc:
            w.failed(record, exc)
            return
        new_expiry = round(result.expires_at * 1000)
        w.end(record, outcome="ok", renewed=result.renewed, new_expiry_ms=new_expiry)
        if result.renewed:
            w.held[index] = (info, new_expiry)
        else:
            w.held.pop(index)
    elif op == "acquire":
        await _async_acquire(w, quota)


async def _async_acquire(w: Worker, quota: AsyncQuotaClient) -> None:
    tenant, units, ttl = w.request()
    timeout = round(w.rng.uniform(*w.config.timeout_range), 3)
    hold = w.rng.uniform(*w.config.hold_range)
    renew_inside = w.rng.random() < 0.3
    rid = w.next_id()
    ttl_ms = round(ttl * 1000)
    record = w.begin(
        "acquire", tenant=tenant, units=units, request_id=rid, ttl_ms=ttl_ms, deadline_s=timeout
    )
    exit_record: dict[str, Any] | None = None
    try:
        async with quota.acquire(tenant, units, ttl=ttl, timeout=timeout, request_id=rid) as lease:
            w.end(record, outcome="admitted", reason="admitted", **lease_fields(lease.info, ttl_ms))
            record = {}
            if renew_inside:
                await asyncio.sleep(hold / 2)
                r = w.begin(
                    "renew",
                    ttl_ms=ttl_ms,
                    deadline_s=0.0,
                    via="context",
                    **_lease_record(lease.info, round(lease.expires_at * 1000)),
                )
                try:
                    result = await lease.renew(ttl)
                except ratequota.RateQuotaError as exc:
                    w.failed(r, exc)
                else:
                    w.end(
                        r,
                        outcome="ok",
                        renewed=result.renewed,
                        new_expiry_ms=round(result.expires_at * 1000),
                    )
                await asyncio.sleep(hold / 2)
            else:
                await asyncio.sleep(hold)
            r = w.begin(
                "release",
                via="context",
                lost=lease.lost,
                **_lease_record(lease.info, round(lease.expires_at * 1000)),
            )
            try:
                released = await lease.release()
            except ratequota.RateQuotaError as exc:
                w.failed(r, exc)
            else:
                w.end(r, outcome="ok", state=released.state, freed=released.units, deadline_s=0.0)
            exit_record = w.begin("exit", lease_id=rid, deadline_s=0.0)
    except ratequota.RateQuotaError as exc:
        if record:
            reason = "timeout" if isinstance(exc, ratequota.AcquireTimeout) else None
            w.failed(record, exc) if reason is None else w.end(
                record, outcome="refused", reason=reason, error=_error_name(exc)
            )
        else:
            w.failed(exit_record or w.begin("exit", lease_id=rid, deadline_s=0.0), exc)
        return
    if exit_record is not None:
        w.end(exit_record, outcome="ok")


async def run_async(config: PodConfig, name: str, seed: int, out: JsonlWriter) -> None:
    """An async pod: one ``AsyncQuotaClient`` shared by ``config.workers`` tasks."""
    quota = AsyncQuotaClient.sharded(
        config.urls, shard_ids=config.shard_ids, **config.client_options
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    workers = [Worker(name, i, seed, config, out) for i in range(config.workers)]
    await asyncio.gather(*(run_async_worker(w, quota, stop) for w in workers))
    await quota.close()


def main(argv: list[str] | None = None) -> int:
    """Run one pod until the run's stop time; records go to ``--history``."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults.pod", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mode", choices=("sync", "async"), required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--history", type=Path, required=True)
    args = parser.parse_args(argv)
    config = PodConfig(json.loads(args.config.read_text(encoding="utf-8")))
    out = JsonlWriter(args.history)
    out.write(
        {
            "kind": "start",
            "pod": args.name,
            "mode": args.mode,
            "pid": os.getpid(),
            "wall": time.time(),
            "mono": time.monotonic(),
        }
    )
    runner: Callable[[], Any]
    if args.mode == "sync":
        runner = lambda: run_sync(config, args.name, args.seed, out)  # noqa: E731
    else:
        runner = lambda: asyncio.run(run_async(config, args.name, args.seed, out))  # noqa: E731
    runner()
    out.write({"kind": "stop", "pod": args.name, "wall": time.time(), "mono": time.monotonic()})
    out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
