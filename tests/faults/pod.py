"""One pod of a fault run: a process running a random workload through ratequota's public API.

``python -m tests.faults.pod --config run.json --name p0 --mode sync --seed 7 --history p0.jsonl``

Several workers (threads sharing one ``QuotaClient`` with ``--mode sync``,
tasks sharing one ``AsyncQuotaClient`` with ``--mode async``) loop until the
run's stop time: ``try_acquire`` (leases kept, renewed and released
explicitly, some abandoned to expire and released late on purpose), and
``acquire`` with a deadline, held in a ``with`` block (renewed in the
background, sometimes explicitly too); a new request of a tenant with a rate
meter names a random amount of ``tokens``. Every call becomes one record (see
``records``): what was asked, what the library answered, the Redis times it
reported, and the local clocks around it. Request ids are chosen here
(``<pod>.<worker>.<seq>``), so the checker can tell whose a lease in a
snapshot is even when the call that made it never returned.

The workload is written once, as generators that yield the calls they need
(``Call``) and receive the outcome; ``drive_sync`` and ``drive_async`` only
perform them — the same split as the library's own sans-I/O core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ratequota
from ratequota import AsyncQuotaClient, LeaseInfo, QuotaClient
from tests.faults.records import JsonlWriter

__all__ = ["Call", "PodConfig", "Worker", "drive_async", "drive_sync", "main"]


def _pair(raw: Any) -> tuple[float, float]:
    low, high = raw
    return float(low), float(high)


class PodConfig:
    """The run's settings every pod reads from the driver's JSON file."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.topology: str = str(raw.get("topology", "shards"))
        self.urls: list[str] = list(raw["urls"])
        self.shard_ids: list[str] = list(raw["shard_ids"])
        self.client_options: dict[str, Any] = dict(raw["client_options"])
        self.tenants: dict[str, int] = dict(raw["tenants"])  # tenant -> most units per request
        self.workers: int = int(raw["workers"])
        self.ttl_range = _pair(raw["ttl_range"])
        self.timeout_range = _pair(raw["timeout_range"])
        self.hold_range = _pair(raw["hold_range"])
        self.think_range = _pair(raw["think_range"])
        self.stop_at_wall: float = float(raw["stop_at_wall"])
        self.max_held: int = int(raw.get("max_held", 3))
        self.groups: dict[str, str] = dict(raw.get("groups", {}))  # tenant -> group
        #: tenant -> most ``tokens`` one request names (its group's rate meter); others none
        self.tokens: dict[str, int] = dict(raw.get("tokens", {}))
        #: retry a held lease's id as another tenant, or with other units (must be refused)
        self.foreign_replays: bool = bool(raw.get("foreign_replays", True))
        #: forged renewals too (they can hijack a lost lease during a recovery window)
        self.forged_renewals: bool = bool(raw.get("forged_renewals", False))


@dataclass(frozen=True)
class Call:
    """One thing a workload needs done; the drivers map ``name`` to a client call.

    ``try_acquire``, ``release``, ``renew`` call the client; ``enter`` opens
    ``acquire(...)`` as a context manager (the result is the held lease),
    ``lease_renew`` / ``lease_release`` call the held lease's own methods,
    ``exit`` leaves the block, ``sleep`` waits.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()


Flow = Generator[Call, Any, None]


def _error_name(exc: BaseException) -> str:
    """``ClassName`` of a ratequota error, ``foreign:ClassName`` of anything else (a bug)."""
    name = type(exc).__name__
    return name if isinstance(exc, ratequota.RateQuotaError) else f"foreign:{name}"


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def lease_fields(info: LeaseInfo, ttl_ms: int | None = None) -> dict[str, Any]:
    """What a record keeps of a lease: ids, token, units, and Redis times as reported."""
    fields: dict[str, Any] = {
        "lease_id": info.id,
        "tenant": info.tenant,
        "group": info.group,
        "units": info.units,
        "token": info.token,
        "expiry_ms": _ms(info.expires_at),
    }
    if ttl_ms is not None:
        fields["replay"] = info.replay
        fields["synthetic"] = info.synthetic
        if not info.replay and not info.synthetic:
            # The script sets expiry = its TIME + ttl: this is the admission's Redis time.
            fields["admit_ms"] = fields["expiry_ms"] - ttl_ms
    return fields


class Worker:
    """One worker: its random choices, its held leases, and the flows that record each call."""

    def __init__(self, pod: str, index: int, seed: int, config: PodConfig, out: JsonlWriter):
        self.pod = pod
        self.index = index
        self.rng = random.Random(f"{seed}/{pod}/{index}")
        self.config = config
        self.out = out
        self.seq = 0
        self.calls = 0
        #: try_acquire leases held, with the expiry (ms) last reported
        self.held: list[tuple[LeaseInfo, int]] = []
        #: abandoned leases, released again after their expiry on purpose
        self.abandoned: list[tuple[LeaseInfo, int]] = []

    # -- choices -----------------------------------------------------------------------------------

    def next_id(self) -> str:
        """A request id naming the pod, the worker and the call."""
        self.seq += 1
        return f"{self.pod}.{self.index}.{self.seq}"

    def choose(self) -> str:
        """The next operation."""
        roll = self.rng.random()
        if self.held and roll < 0.22:
            return "release"
        if self.held and roll < 0.36:
            return "renew"
        if self.held and roll < 0.40:
            return "abandon"
        if self.held and roll < 0.44:
            return "replay"
        if self.held and roll < 0.48:
            return "forge"
        if self.abandoned and roll < 0.51:
            return "release_stale"
        if len(self.held) < self.config.max_held and roll < 0.75:
            return "try_acquire"
        return "acquire"

    def request(self) -> tuple[str, int, float]:
        """A tenant, units and a TTL (s) for a new acquire."""
        tenant = self.rng.choice(sorted(self.config.tenants))
        units = self.rng.randint(1, self.config.tenants[tenant])
        ttl = round(self.rng.uniform(*self.config.ttl_range), 3)
        return tenant, units, ttl

    def tokens(self, tenant: str) -> dict[str, int]:
        """The rate-meter amount a new acquire of ``tenant`` names (``tokens``), if metered."""
        most = self.config.tokens.get(tenant)
        return {} if most is None else {"tokens": self.rng.randint(0, most)}

    def think(self) -> float:
        """Pause between operations (keeps a shared machine usable)."""
        return self.rng.uniform(*self.config.think_range)

    def stopping(self) -> bool:
        """True once the run's stop time has passed."""
        return time.time() >= self.config.stop_at_wall

    # -- records -----------------------------------------------------------------------------------

    def begin(self, op: str, **fields: Any) -> dict[str, Any]:
        """A record for a call about to start, announced by an ``intent`` line written now.

        If the pod is killed before the call's own record is written, the
        intent tells the checker that the call may have run (a release that
        reached Redis, say). Clocks are read last, right before the call.
        """
        self.calls += 1
        call_id = f"{self.pod}.{self.index}#{self.calls}"
        record: dict[str, Any] = {"kind": "call", "op": op, "pod": self.pod, "worker": self.index}
        record.update(fields)
        record["call"] = call_id
        intent = {k: v for k, v in record.items() if k != "deadline_s"}
        intent["kind"] = "intent"
        intent["wall_start"] = time.time()
        self.out.write(intent)
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
        fields: dict[str, Any] = {"outcome": "error", "error": _error_name(exc)}
        fields["message"] = str(exc)
        if not isinstance(exc, ratequota.RateQuotaError):
            fields["traceback"] = "".join(traceback.format_exception(exc))
        self.end(record, **fields)

    # -- flows -------------------------------------------------------------------------------------

    def step(self, op: str) -> Flow:
        """The flow of one operation chosen by ``choose``."""
        if op == "try_acquire":
            yield from self.try_acquire()
        elif op == "release":
            info, expiry_ms = self.held.pop(self.rng.randrange(len(self.held)))
            yield from self.release(info, expiry_ms, "explicit")
        elif op == "release_stale":
            info, expiry_ms = self.abandoned.pop(0)
            if time.time() * 1000 > expiry_ms + 50:
                yield from self.release(info, expiry_ms, "stale")
            else:
                self.abandoned.append((info, expiry_ms))
        elif op == "abandon":
            info, expiry_ms = self.held.pop(self.rng.randrange(len(self.held)))
            self.abandoned.append((info, expiry_ms))
            fields = lease_fields(info) | {"expiry_ms": expiry_ms}
            self.out.write({"kind": "abandon", "pod": self.pod, **fields})
        elif op == "renew":
            yield from self.renew()
        elif op == "replay":
            yield from self.replay()
        elif op == "forge":
            yield from self.forge()
        else:
            yield from self.acquire()

    def finish(self) -> Flow:
        """At the stop time: give back every try_acquire lease still held."""
        while self.held:
            info, expiry_ms = self.held.pop()
            yield from self.release(info, expiry_ms, "final")

    def try_acquire(self) -> Flow:
        """``try_acquire``; an admitted lease is kept for a later release or renewal."""
        tenant, units, ttl = self.request()
        metered = self.tokens(tenant)
        rid, ttl_ms = self.next_id(), _ms(ttl)
        record = self.begin(
            "try_acquire", tenant=tenant, units=units, request_id=rid, ttl_ms=ttl_ms,
            deadline_s=0.0, **metered,
        )  # fmt: skip
        try:
            options = (("ttl", ttl), ("request_id", rid), *metered.items())
            decision = yield Call("try_acquire", (tenant, units), options)
        except ratequota.RateQuotaError as exc:
            self.failed(record, exc)
            return
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

    def replay(self) -> Flow:
        """``try_acquire`` again with a held lease's request id: the retry of a lost answer.

        The same tenant and units must get the same lease back (``replay``).
        With ``foreign_replays`` the id is sometimes retried by another tenant
        of the group or with other units, which must be refused.
        """
        index = self.rng.randrange(len(self.held))
        info, expiry_ms = self.held[index]
        if expiry_ms < time.time() * 1000 + 300:
            return  # may have expired: a retry would be a new lease, not a replay
        tenant, units = info.tenant, info.units
        if self.config.foreign_replays and self.rng.random() < 0.5:
            mates = [t for t, g in self.config.groups.items() if g == info.group and t != tenant]
            if mates and self.rng.random() < 0.5:
                tenant = self.rng.choice(sorted(mates))
            else:
                units += 1
        ttl = round(self.rng.uniform(*self.config.ttl_range), 3)
        record = self.begin(
            "try_acquire",
            via="replay",
            tenant=tenant,
            units=units,
            request_id=info.id,
            ttl_ms=_ms(ttl),
            deadline_s=0.0,
        )
        try:
            decision = yield Call(
                "try_acquire", (tenant, units), (("ttl", ttl), ("request_id", info.id))
            )
        except ratequota.RateQuotaError as exc:
            self.failed(record, exc)
            return
        fields: dict[str, Any] = {
            "outcome": "admitted" if decision.admitted else "refused",
            "reason": decision.reason,
            "group": decision.group,
        }
        if decision.lease is not None:
            fields.update(lease_fields(decision.lease, _ms(ttl)))
        self.end(record, **fields)
        lease = decision.lease
        if lease is not None and not lease.replay and not lease.synthetic:
            # The first lease had ended after all: this is a new one under the same id.
            self.held[index] = (lease, fields["expiry_ms"])

    def forge(self) -> Flow:
        """Release or renew a held lease under a wrong token or tenant: must change nothing.

        Anyone who can read a snapshot knows lease ids; release and renew are
        fenced by tenant and token. The real lease stays held (snapshots
        must still list it, its holder's calls must still work).
        """
        info, expiry_ms = self.held[self.rng.randrange(len(self.held))]
        mates = [t for t, g in self.config.groups.items() if g == info.group and t != info.tenant]
        if mates and self.rng.random() < 0.5:
            forged = LeaseInfo(
                id=info.id,
                tenant=self.rng.choice(sorted(mates)),
                group=info.group,
                units=info.units,
                token=info.token,
                expires_at=info.expires_at,
            )
        else:
            forged = LeaseInfo(
                id=info.id,
                tenant=info.tenant,
                group=info.group,
                units=info.units,
                token=info.token + self.rng.choice((-1, 1)),
                expires_at=info.expires_at,
            )
        ops = (
            ("forged_release", "forged_renew")
            if self.config.forged_renewals
            else ("forged_release",)
        )
        op = self.rng.choice(ops)
        fields = lease_fields(forged) | {"expiry_ms": expiry_ms, "true_token": info.token}
        record = self.begin(op, deadline_s=0.0, **fields)
        try:
            if op == "forged_release":
                result = yield Call("release", (forged,))
            else:
                result = yield Call("renew", (forged, 1.0))
        except ratequota.RateQuotaError as exc:
            self.failed(record, exc)
            return
        if op == "forged_release":
            self.end(record, outcome="ok", state=result.state, freed=result.units)
        else:
            self.end(record, outcome="ok", renewed=result.renewed, reason=result.reason)

    def release(self, info: LeaseInfo, expiry_ms: int, via: str) -> Flow:
        """``release`` of a try_acquire lease."""
        fields = lease_fields(info) | {"expiry_ms": expiry_ms}
        record = self.begin("release", via=via, deadline_s=0.0, **fields)
        try:
            result = yield Call("release", (info,))
        except ratequota.RateQuotaError as exc:
            self.failed(record, exc)
        else:
            self.end(record, outcome="ok", state=result.state, freed=result.units)

    def renew(self) -> Flow:
        """``renew`` of a held try_acquire lease, with a new random TTL."""
        index = self.rng.randrange(len(self.held))
        info, expiry_ms = self.held[index]
        ttl = round(self.rng.uniform(*self.config.ttl_range), 3)
        fields = lease_fields(info) | {"expiry_ms": expiry_ms}
        record = self.begin("renew", ttl_ms=_ms(ttl), deadline_s=0.0, **fields)
        try:
            result = yield Call("renew", (info, ttl))
        except ratequota.RateQuotaError as exc:
            self.failed(record, exc)
            return
        new_expiry = _ms(result.expires_at)
        self.end(
            record,
            outcome="ok",
            renewed=result.renewed,
            reason=result.reason,
            new_expiry_ms=new_expiry,
        )
        if result.renewed:
            self.held[self.held.index((info, expiry_ms))] = (info, new_expiry)
        else:
            self.held.remove((info, expiry_ms))

    def acquire(self) -> Flow:
        """``acquire`` with a deadline, held in its block for a while, released inside it.

        The explicit release inside the block is recorded with its result;
        leaving the block afterwards must then do nothing and raise nothing.
        """
        tenant, units, ttl = self.request()
        metered = self.tokens(tenant)
        timeout = round(self.rng.uniform(*self.config.timeout_range), 3)
        hold = self.rng.uniform(*self.config.hold_range)
        renew_inside = self.rng.random() < 0.3
        rid, ttl_ms = self.next_id(), _ms(ttl)
        options = (("ttl", ttl), ("timeout", timeout), ("request_id", rid), *metered.items())
        record = self.begin(
            "acquire", tenant=tenant, units=units, request_id=rid, ttl_ms=ttl_ms,
            deadline_s=timeout, **metered,
        )  # fmt: skip
        try:
            lease = yield Call("enter", (tenant, units), options)
        except ratequota.AcquireTimeout as exc:
            self.end(record, outcome="refused", reason="timeout", error=_error_name(exc))
            return
        except ratequota.RateQuotaError as exc:
            self.failed(record, exc)
            return
        self.end(record, outcome="admitted", reason="admitted", **lease_fields(lease.info, ttl_ms))
        if renew_inside:
            yield Call("sleep", (hold / 2,))
            fields = lease_fields(lease.info)
            r = self.begin("renew", ttl_ms=ttl_ms, deadline_s=0.0, via="context", **fields)
            try:
                renewed = yield Call("lease_renew", (lease, ttl))
            except ratequota.RateQuotaError as exc:
                self.failed(r, exc)
            else:
                self.end(
                    r,
                    outcome="ok",
                    renewed=renewed.renewed,
                    reason=renewed.reason,
                    new_expiry_ms=_ms(renewed.expires_at),
                )
            yield Call("sleep", (hold / 2,))
        else:
            yield Call("sleep", (hold,))
        # Background renewals moved the expiry: the record keeps the last one the lease knows.
        fields = lease_fields(lease.info)
        r = self.begin("release", via="context", lost=lease.lost, deadline_s=0.0, **fields)
        try:
            released = yield Call("lease_release", (lease,))
        except ratequota.RateQuotaError as exc:
            self.failed(r, exc)
        else:
            self.end(r, outcome="ok", state=released.state, freed=released.units)
        r = self.begin("exit", lease_id=rid, group=lease.group, deadline_s=0.0)
        try:
            yield Call("exit", (lease,))
        except ratequota.RateQuotaError as exc:
            self.failed(r, exc)
        else:
            self.end(r, outcome="ok")


# -- performing the flows ---------------------------------------------------------------------


def drive_sync(flow: Flow, quota: QuotaClient, held: dict[int, ratequota.Acquisition]) -> None:
    """Run ``flow`` with blocking calls on a sync client."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            call = flow.send(value) if error is None else flow.throw(error)
        except StopIteration:
            return
        kwargs = dict(call.kwargs)
        value, error = None, None
        try:
            if call.name == "sleep":
                time.sleep(call.args[0])
            elif call.name == "enter":
                acquisition = quota.acquire(*call.args, **kwargs)
                value = acquisition.__enter__()
                held[id(value)] = acquisition
            elif call.name == "exit":
                held.pop(id(call.args[0])).__exit__(None, None, None)
            elif call.name == "lease_renew":
                value = call.args[0].renew(*call.args[1:])
            elif call.name == "lease_release":
                value = call.args[0].release()
            else:
                value = getattr(quota, call.name)(*call.args, **kwargs)
        except Exception as exc:
            error = exc


async def drive_async(
    flow: Flow, quota: AsyncQuotaClient, held: dict[int, ratequota.AsyncAcquisition]
) -> None:
    """Run ``flow`` with awaited calls on an async client (mirrors ``drive_sync``)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            call = flow.send(value) if error is None else flow.throw(error)
        except StopIteration:
            return
        kwargs = dict(call.kwargs)
        value, error = None, None
        try:
            if call.name == "sleep":
                await asyncio.sleep(call.args[0])
            elif call.name == "enter":
                acquisition = quota.acquire(*call.args, **kwargs)
                value = await acquisition.__aenter__()
                held[id(value)] = acquisition
            elif call.name == "exit":
                await held.pop(id(call.args[0])).__aexit__(None, None, None)
            elif call.name == "lease_renew":
                value = await call.args[0].renew(*call.args[1:])
            elif call.name == "lease_release":
                value = await call.args[0].release()
            else:
                value = await getattr(quota, call.name)(*call.args, **kwargs)
        except Exception as exc:
            error = exc


def _step_failed(worker: Worker, op: str, exc: BaseException) -> None:
    """A flow raised past its own handling: a bug in the pod or the library, recorded."""
    worker.failed(worker.begin("step", step=op), exc)


def run_sync(config: PodConfig, name: str, seed: int, out: JsonlWriter) -> None:
    """A sync pod: one ``QuotaClient`` shared by ``config.workers`` threads."""
    quota = (
        QuotaClient.cluster(config.urls[0], **config.client_options)
        if config.topology == "cluster"
        else QuotaClient.sharded(config.urls, shard_ids=config.shard_ids, **config.client_options)
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def loop(worker: Worker) -> None:
        held: dict[int, ratequota.Acquisition] = {}
        while not worker.stopping() and not stop.is_set():
            op = worker.choose()
            try:
                drive_sync(worker.step(op), quota, held)
            except Exception as exc:
                _step_failed(worker, op, exc)
            stop.wait(worker.think())
        drive_sync(worker.finish(), quota, held)

    workers = [Worker(name, i, seed, config, out) for i in range(config.workers)]
    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    quota.close()


async def run_async(config: PodConfig, name: str, seed: int, out: JsonlWriter) -> None:
    """An async pod: one ``AsyncQuotaClient`` shared by ``config.workers`` tasks."""
    quota = (
        AsyncQuotaClient.cluster(config.urls[0], **config.client_options)
        if config.topology == "cluster"
        else AsyncQuotaClient.sharded(
            config.urls, shard_ids=config.shard_ids, **config.client_options
        )
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def loop(worker: Worker) -> None:
        held: dict[int, ratequota.AsyncAcquisition] = {}
        while not worker.stopping() and not stop.is_set():
            op = worker.choose()
            try:
                await drive_async(worker.step(op), quota, held)
            except Exception as exc:
                _step_failed(worker, op, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), worker.think())
        await drive_async(worker.finish(), quota, held)

    workers = [Worker(name, i, seed, config, out) for i in range(config.workers)]
    await asyncio.gather(*(loop(w) for w in workers))
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
    out.write({"kind": "start", "pod": args.name, "mode": args.mode, "pid": os.getpid()})
    if args.mode == "sync":
        run_sync(config, args.name, args.seed, out)
    else:
        asyncio.run(run_async(config, args.name, args.seed, out))
    out.write({"kind": "stop", "pod": args.name})
    out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
