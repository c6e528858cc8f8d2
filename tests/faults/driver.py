"""The fault driver: real redis-servers, pod processes, faults on a seeded schedule, snapshots.

``python -m tests.faults.driver [--profile short|long] [--topology shards|cluster] [--seed N]
[--flags fenced-reassert] [--faults KIND,...] [--dir D]``

``--faults`` draws only the named kinds (each one the topology can inject), to chase
one fault's failure with more of its occurrences per run.

One run:

1. Two redis-servers on free loopback ports, used as two shards (ids ``s0``
   and ``s1``, one group on each): ``s0`` with AOF (``appendfsync always``:
   a restart loses nothing acknowledged), ``s1`` without persistence.
2. A policy published, then ``pods`` pod processes (sync and async
   alternately, see ``pod``) started with the run's stop time.
3. Faults drawn from the seed, one at a time, ``fault_gap`` apart, bounded by
   ``max_faults`` and stopping ``settle`` seconds before the pods stop; every
   fault is a ``fault`` record with its window on the host clock. A thread
   meanwhile records a snapshot of every group every ``snapshot_every`` s.
4. After the pods stop (a pod still running well past the stop time is
   SIGKILLed and reported), a final snapshot, then a snapshot pinned after
   every possible expiry and a scan for state keys without an expiry.

Every process is started here and ended here by its PID. The records go to
``driver.jsonl`` and ``pods/<name>.jsonl``; ``checker.check_run`` reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from ratequota import (
    GroupPolicy,
    MeterPolicy,
    Policy,
    QuotaClient,
    RateQuotaError,
    TenantMeter,
    TenantPolicy,
)
from ratequota.engine.keys import KeySpace
from ratequota.engine.routing import Rendezvous
from ratequota.testing import ManualClock
from tests.faults import checker, profiles
from tests.faults.profiles import Profile
from tests.faults.records import JsonlWriter
from tests.servers import RedisCluster, RedisServer

__all__ = ["Run", "main", "run_profile"]

ROOT = Path(__file__).resolve().parents[2]
SHARDS = ("s0", "s1")
#: Tenants of the group on each shard, and the most units one request asks for.
TENANTS = ({"a": 3, "b": 3, "c": 2}, {"d": 3, "e": 3})
#: Short, because after Redis loses a group's state the group admits nothing new for up to
#: this long (its recovery window); the pods' TTLs (``Profile.ttl_range``) stay below it.
MAX_LEASE_TTL = 4.0

#: The rate meter of the first group (``tokens`` per second; the same in both policies, so
#: a policy change moves no meter bound): every field given, none left to a default, so the
#: checker's bounds are these numbers. The pods' requests there name up to ``TOKENS`` tokens
#: each (at most what a borrower may take at once, the burst above the guaranteed ones): with
#: the group's leases coming and going several times a second, the meter refuses some and
#: admits more (a run reports both counts).
METER = MeterPolicy("tokens", rate=30, burst=20, debt=20)
SHARES = {
    "a": TenantMeter("tokens", rate=12, ceil=24, burst=8, cburst=16, weight=2.0),
    "b": TenantMeter("tokens", rate=6, ceil=30, burst=4, cburst=20),
    "c": TenantMeter("tokens", rate=0, ceil=18, burst=0, cburst=10),
}
TOKENS = 8


def group_names() -> tuple[str, str]:
    """Two group names that rendezvous hashing places on ``s0`` and ``s1`` respectively."""
    routing = Rendezvous(SHARDS)
    found: dict[str, str] = {}
    for i in range(100):
        name = f"g{i}"
        found.setdefault(routing.shard(name), name)
    return found["s0"], found["s1"]


def policies() -> tuple[Policy, Policy]:
    """The two policies a run switches between: capacities and guarantees differ."""
    g0, g1 = group_names()
    first = Policy(
        [
            GroupPolicy(
                g0,
                capacity=8,
                tenants=[
                    TenantPolicy("a", guarantee=3, borrow_limit=3, meters=[SHARES["a"]]),
                    TenantPolicy("b", guarantee=2, meters=[SHARES["b"]]),
                    TenantPolicy("c", guarantee=0, borrow_limit=4, meters=[SHARES["c"]]),
                ],
                max_lease_ttl=MAX_LEASE_TTL,
                meters=[METER],
            ),
            GroupPolicy(
                g1,
                capacity=6,
                tenants=[
                    TenantPolicy("d", guarantee=2, borrow_limit=2),
                    TenantPolicy("e", guarantee=2, lendable=0.5),
                ],
                max_lease_ttl=MAX_LEASE_TTL,
            ),
        ]
    )
    second = Policy(
        [
            GroupPolicy(
                g0,
                capacity=6,
                tenants=[
                    TenantPolicy("a", guarantee=1, borrow_limit=2, meters=[SHARES["a"]]),
                    TenantPolicy("b", guarantee=3, borrow_limit=1, meters=[SHARES["b"]]),
                    TenantPolicy("c", guarantee=0, borrow_limit=3, meters=[SHARES["c"]]),
                ],
                max_lease_ttl=MAX_LEASE_TTL,
                meters=[METER],
            ),
            GroupPolicy(
                g1,
                capacity=8,
                tenants=[
                    TenantPolicy("d", guarantee=4, borrow_limit=2),
                    TenantPolicy("e", guarantee=1),
                ],
                max_lease_ttl=MAX_LEASE_TTL,
            ),
        ]
    )
    return first, second


def policy_record(policy: Policy) -> dict[str, Any]:
    """The bounds of ``policy`` as plain data for the checker: capacity, min(C, G + B), and
    each rate meter's rate and burst (per second), with each tenant's ceil and cburst."""
    groups: dict[str, Any] = {}
    for g in policy.groups:
        tenants = {}
        for t in g.tenants:
            above = g.capacity if t.borrow_limit is None else t.borrow_limit
            tenants[t.name] = {
                "guarantee": t.guarantee,
                "ceiling": min(g.capacity, t.guarantee + above),
            }
        groups[g.name] = {"capacity": g.capacity, "tenants": tenants}
        meters = {}
        for m in g.meters:
            assert m.per == "second", "the checker's rate bounds are per second"
            shares = {}
            for t in g.tenants:
                share = t.meter(m.name)
                assert share is not None and share.ceil is not None and share.cburst is not None
                shares[t.name] = {"ceil": share.ceil, "cburst": share.cburst}
            meters[m.name] = {"rate": m.rate, "burst": m.burst, "tenants": shares}
        if meters:
            groups[g.name]["meters"] = meters
    return groups


class Shards:
    """Two independent redis-servers used as shards ``s0`` (AOF, fsync always) and ``s1`` (none)."""

    name = "shards"

    def __init__(self) -> None:
        self.servers: dict[str, RedisServer] = {
            "s0": RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")),
            "s1": RedisServer(),
        }

    def start(self) -> None:
        """Start both servers."""
        for server in self.servers.values():
            server.start()

    @property
    def urls(self) -> list[str]:
        """Shard URLs in ``SHARDS`` order."""
        return [self.servers[s].url for s in SHARDS]

    def client(self, clock: ManualClock | None = None, **options: Any) -> QuotaClient:
        """A driver-side client with the pods' placement (``clock`` pins Redis time)."""
        options.setdefault("socket_timeout", 2.0)
        return QuotaClient.sharded(self.urls, shard_ids=list(SHARDS), clock=clock, **options)

    def pod_target(self) -> dict[str, Any]:
        """How pods connect."""
        return {"topology": self.name, "urls": self.urls, "shard_ids": list(SHARDS)}

    def targets(self) -> dict[str, RedisServer]:
        """Servers a pause, a SCRIPT FLUSH or memory pressure may hit, by name."""
        return dict(self.servers)

    def nodes(self) -> list[RedisServer]:
        """Every server, for the scan of keys without an expiry."""
        return list(self.servers.values())

    def cleanup(self) -> None:
        """Stop every server by PID and remove its directory."""
        for server in self.servers.values():
            server.cleanup()


class Cluster:
    """A 3-master Redis Cluster; a failover promotes a fresh replica of a group's master."""

    name = "cluster"

    def __init__(self) -> None:
        self.cluster = RedisCluster(masters=3)
        self.keyspace = KeySpace()

    def start(self) -> None:
        """Start the nodes and create the cluster."""
        self.cluster.start()

    def client(self, clock: ManualClock | None = None, **options: Any) -> QuotaClient:
        """A driver-side cluster client (``clock`` pins Redis time)."""
        options.setdefault("socket_timeout", 2.0)
        return QuotaClient.cluster(self.cluster.url, clock=clock, **options)

    def pod_target(self) -> dict[str, Any]:
        """How pods connect: any node's URL."""
        return {"topology": self.name, "urls": [self.cluster.url], "shard_ids": []}

    def owner(self, group: str) -> RedisServer:
        """The master serving ``group``'s slot now."""
        return self.cluster.owner(key_slot(self.keyspace.group(group).policy.encode()))

    def targets(self) -> dict[str, RedisServer]:
        """The masters serving the run's groups, by port."""
        return {str(node.port): node for node in (self.owner(g) for g in group_names())}

    def failover(self, group: str) -> dict[str, Any]:
        """Add a replica to ``group``'s master and promote it (CLUSTER FAILOVER, no data lost)."""
        master = self.owner(group)
        replica = self.cluster.add_replica(master)
        self.cluster.failover(replica)
        return {"group": group, "old_master": master.port, "new_master": replica.port}

    def nodes(self) -> list[RedisServer]:
        """Every node (replicas hold the same keys and expiries)."""
        return list(self.cluster.nodes)

    def cleanup(self) -> None:
        """Stop every node by PID and remove its directory."""
        self.cluster.cleanup()


Topology = Shards | Cluster


class Run:
    """One fault run in ``workdir``; ``execute`` does it all and cleans up."""

    def __init__(self, profile: Profile, workdir: Path) -> None:
        self.profile = profile
        self.dir = workdir
        (workdir / "pods").mkdir(parents=True, exist_ok=True)
        self.out = JsonlWriter(workdir / "driver.jsonl")
        self.rng = random.Random(profile.seed)
        self.topology: Topology = Cluster() if profile.topology == "cluster" else Shards()
        self.pods: dict[str, subprocess.Popen[bytes]] = {}
        self.pod_modes: dict[str, str] = {}
        self.policies = policies()
        self.policy_index = 0
        self.stop_at = 0.0
        self._snapshots_stop = threading.Event()
        self.keyspace = KeySpace()

    # -- set-up ----------------------------------------------------------------------------------

    def client(self, **options: Any) -> QuotaClient:
        """A driver-side client (the same placement as the pods')."""
        return self.topology.client(**options)

    def record(self, kind: str, **fields: Any) -> None:
        """One driver record, stamped with the host clock."""
        self.out.write({"kind": kind, "wall": time.time(), **fields})

    def apply_policy(self, quota: QuotaClient, policy: Policy, cause: str) -> None:
        """Publish ``policy`` and record when it was being applied."""
        start = time.time()
        quota.apply_policy(policy)
        self.record(
            "policy",
            cause=cause,
            wall_start=start,
            wall_end=time.time(),
            groups=policy_record(policy),
        )

    def start_pod(self, name: str, mode: str, config: Path) -> None:
        """Start one pod process (its log beside its history)."""
        log = (self.dir / "pods" / f"{name}.log").open("wb")
        args = [
            sys.executable, "-m", "tests.faults.pod",
            "--config", str(config), "--name", name, "--mode", mode,
            "--seed", str(self.profile.seed), "--history", str(self.dir / "pods" / f"{name}.jsonl"),
        ]  # fmt: skip
        self.pods[name] = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        self.pod_modes[name] = mode
        self.record("pod_start", pod=name, mode=mode, pid=self.pods[name].pid)

    # -- faults ----------------------------------------------------------------------------------

    def fault(self, name: str, config: Path, quota: QuotaClient) -> None:
        """Inject one fault and record its window."""
        rng = self.rng
        targets = self.topology.targets()
        server_id = rng.choice(sorted(targets))
        server = targets[server_id]
        start = time.time()
        detail: dict[str, Any] = {}
        state_loss = False
        if name == "pod_kill":
            alive = sorted(n for n, p in self.pods.items() if p.poll() is None)
            if not alive:
                return
            victim = rng.choice(alive)
            self.pods[victim].kill()
            self.pods[victim].wait(timeout=10)
            detail = {"pod": victim}
            server_id = ""
            mode = self.pod_modes[victim]
            self.start_pod(f"p{len(self.pods)}", mode, config)
        elif name == "redis_pause":
            seconds = round(rng.uniform(0.3, 1.2), 3)
            server.pause()
            try:
                time.sleep(seconds)
            finally:
                server.resume()
            detail = {"seconds": seconds}
        elif name in ("redis_restart_aof", "redis_restart_empty"):
            assert isinstance(self.topology, Shards), "restarts are faults of the shard topology"
            server_id = "s0" if name == "redis_restart_aof" else "s1"
            state_loss = name == "redis_restart_empty"
            self.topology.servers[server_id].restart()
        elif name == "script_flush":  # the server forgets the scripts and the function library
            with contextlib.closing(server.client()) as admin:
                admin.script_flush()
                admin.function_flush()
        elif name == "policy_change":
            self.policy_index = 1 - self.policy_index
            self.apply_policy(quota, self.policies[self.policy_index], "fault")
            server_id = ""
        elif name == "cluster_failover":
            assert isinstance(self.topology, Cluster), "a failover needs the cluster topology"
            detail = self.topology.failover(rng.choice(group_names()))
            server_id = str(detail["old_master"])
        elif name in ("maxmemory_noeviction", "maxmemory_evict"):
            evict = name == "maxmemory_evict"
            state_loss = evict
            detail = self._memory_pressure(server, evict, round(rng.uniform(0.5, 1.5), 3))
        else:
            raise ValueError(f"unknown fault {name!r}")
        self.record(
            "fault",
            fault=name,
            server=server_id,
            state_loss=state_loss,
            wall_start=start,
            wall_end=time.time(),
            **detail,
        )

    def _memory_pressure(self, server: RedisServer, evict: bool, hold: float) -> dict[str, Any]:
        """A small ``maxmemory`` filled with junk keys (each with an expiry), held, then undone."""
        admin: Any = server.client()
        junk = 0
        tag = self._local_tag(admin)
        ours = set(admin.keys("rq:*"))  # the library's keys here, to name what an eviction took
        lost: set[bytes] = set()
        filled: set[bytes] = set()
        policies = sorted(k for k in ours if k.endswith(b":policy") and b":v2:" in k)
        windows = [self._window_fields(admin, policies)]
        try:
            used = int(admin.info("memory")["used_memory"])
            limit = used + 512 * 1024
            admin.config_set("maxmemory-policy", "allkeys-lru" if evict else "noeviction")
            admin.config_set("maxmemory", limit)
            value = "x" * 4096
            # Bounded: twice the headroom when evicting (each write evicts something), until
            # the first refusal otherwise (at most 64 * 32 * 4 KB).
            for _ in range(8 if evict else 64):
                pipe = admin.pipeline(transaction=False)
                for _ in range(32):
                    pipe.set(f"junk:{tag}:{junk}", value, ex=60)
                    junk += 1
                replies = pipe.execute(raise_on_error=False)
                if any(isinstance(r, Exception) for r in replies):
                    break
            filled = ours - set(admin.keys("rq:*"))  # taken by the junk writes
            windows.append(self._window_fields(admin, policies))
            time.sleep(hold)
            lost = ours - set(admin.keys("rq:*"))
            windows.append(self._window_fields(admin, policies))
        finally:
            for start in range(0, junk, 500):
                admin.delete(*[f"junk:{tag}:{i}" for i in range(start, min(junk, start + 500))])
            admin.config_set("maxmemory", 0)
            admin.config_set("maxmemory-policy", "noeviction")
            admin.close()
        detail: dict[str, Any] = {"junk_keys": junk, "hold": hold, "maxmemory": limit}
        if evict:  # keys the eviction took (some may have been re-created meanwhile)
            detail["lost_keys"] = sorted(k.decode() for k in lost)
            detail["lost_at_fill"] = sorted(k.decode() for k in filled)
            # busy / recover of each policy hash here: before, after the fill, at the end.
            detail["windows"] = windows
        return detail

    @staticmethod
    def _window_fields(admin: Any, policies: list[bytes]) -> dict[str, list[str | None]]:
        """Each policy hash's ``busy`` and ``recover`` now (None: field or hash missing)."""
        out: dict[str, list[str | None]] = {}
        for key in policies:
            values = admin.hmget(key, "busy", "recover")
            out[key.decode()] = [v.decode() if v is not None else None for v in values]
        return out

    def _local_tag(self, admin: Any) -> str:
        """A hash tag this server serves (in a cluster it refuses keys of other slots)."""
        if not isinstance(self.topology, Cluster):
            return "{junk}"
        port = int(admin.connection_pool.connection_kwargs["port"])
        mine = [
            (int(start), int(end))
            for start, end, primary, *_ in admin.execute_command("CLUSTER", "SLOTS")
            if int(primary[1]) == port
        ]
        for i in range(100_000):
            slot = key_slot(f"junk{i}".encode())
            if any(a <= slot <= b for a, b in mine):
                return f"{{junk{i}}}"
        raise RuntimeError("no hash tag found for this node")

    # -- snapshots -------------------------------------------------------------------------------

    def snapshot(self, quota: QuotaClient, group: str, **flags: Any) -> None:
        """Record one snapshot of ``group`` (an error is recorded and skipped)."""
        start = time.time()
        try:
            snap = quota.snapshot(group)
        except RateQuotaError as exc:
            self.record("snapshot_error", group=group, error=type(exc).__name__, message=str(exc))
            return
        self.record(
            "snapshot",
            group=group,
            wall_start=start,
            wall_end=time.time(),
            now_ms=round(snap.now * 1000),
            used=snap.used,
            capacity=snap.capacity,
            pending=sum(t.pending for t in snap.tenants.values()),
            truncated=snap.leases_truncated,
            leases=[
                {
                    "id": x.id,
                    "tenant": x.tenant,
                    "units": x.units,
                    "token": x.token,
                    "expiry_ms": round(x.expires_at * 1000),
                }
                for x in snap.leases
            ],
            **flags,
        )

    def _snapshot_loop(self) -> None:
        quota = self.client(socket_timeout=self.profile.socket_timeout, catalog_ttl=3600.0)
        try:
            while not self._snapshots_stop.wait(self.profile.snapshot_every):
                for group in group_names():
                    self.snapshot(quota, group)
        finally:
            quota.close()

    def _end_checks(self) -> None:
        """Final snapshot, then one pinned after every possible expiry, then keys' expiries."""
        quota = self.client(catalog_ttl=3600.0)
        try:
            for group in group_names():
                self.snapshot(quota, group, final=True)
        finally:
            quota.close()
        later = round(time.time() * 1000 + (MAX_LEASE_TTL + 60) * 1000)
        pinned = self.topology.client(clock=ManualClock(start_ms=later), catalog_ttl=3600.0)
        try:
            for group in group_names():
                self.snapshot(pinned, group, pinned=True, keys_without_ttl=self._keys_without_ttl())
        finally:
            pinned.close()

    def _keys_without_ttl(self) -> list[str]:
        """State keys without an expiry; only published policies, catalogs and a metered
        group's contention sets (kept with the policy, docs/rates.md) may have none.

        Of every key schema: a client may publish the previous schema's policy
        too, for the pods of the previous release during a rolling update.
        """
        schema = re.escape(self.keyspace.prefix) + r":v\d+:"
        groups = "|".join(re.escape(g) for g in group_names())
        published = re.compile(
            rf"{schema}(\{{(?:{groups})\}}:(?:policy|contend[1-4])|\{{#catalog\}}:catalog)"
        )
        missing = []
        for server in self.topology.nodes():
            with contextlib.closing(server.client()) as admin:
                if admin.info("replication").get("role") != "master":
                    continue  # a replica redirects reads; its master is scanned
                for key in admin.scan_iter(match=f"{self.keyspace.prefix}:*", count=500):
                    name = key.decode()
                    if not published.fullmatch(name) and admin.ttl(key) == -1:
                        missing.append(name)
        return missing

    # -- the run ---------------------------------------------------------------------------------

    def execute(self) -> Path:
        """Do the run; every process it started is ended by PID before this returns."""
        p = self.profile
        snapshots: threading.Thread | None = None
        try:
            self.topology.start()
            self._record_clocks()
            quota = self.client()
            self.apply_policy(quota, self.policies[0], "initial")
            self.stop_at = time.time() + p.duration
            config = self.dir / "run.json"
            config.write_text(json.dumps(self._pod_config()), encoding="utf-8")
            self.record(
                "run",
                profile=p.name,
                topology=p.topology,
                seed=p.seed,
                faults=list(p.faults),
                flags=sorted(p.flags),
                stop_at=self.stop_at,
            )
            for i in range(p.pods):
                self.start_pod(f"p{i}", p.modes[i % len(p.modes)], config)
            snapshots = threading.Thread(target=self._snapshot_loop, daemon=True)
            snapshots.start()
            self._wait_for_first_calls()
            self._inject(config, quota)
            quota.close()
            self._wait_for_pods()
            self._snapshots_stop.set()
            snapshots.join(timeout=10)
            self._end_checks()
            self.record("end")
        finally:
            self._snapshots_stop.set()
            for name, process in self.pods.items():
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
                    self.record("pod_exit", pod=name, returncode=process.returncode, hung=True)
            self.topology.cleanup()
            self.out.close()
        return self.dir

    def _pod_config(self) -> dict[str, Any]:
        p = self.profile
        return {
            **self.topology.pod_target(),
            "client_options": {"socket_timeout": p.socket_timeout, "catalog_ttl": 1.0},
            "tenants": {t: u for group in TENANTS for t, u in group.items()},
            "tokens": dict.fromkeys(SHARES, TOKENS),
            "groups": {
                t: g for g, group in zip(group_names(), TENANTS, strict=True) for t in group
            },
            "forged_renewals": "fenced-reassert" in p.flags,
            "workers": p.workers,
            "ttl_range": list(p.ttl_range),
            "timeout_range": list(p.timeout_range),
            "hold_range": list(p.hold_range),
            "think_range": list(p.think_range),
            "stop_at_wall": self.stop_at,
        }

    def _record_clocks(self) -> None:
        for name, server in self.topology.targets().items():
            with contextlib.closing(server.client()) as admin:
                before = time.time()
                seconds, micros = admin.time()
                after = time.time()
            redis_ms = seconds * 1000 + micros / 1000
            offset = redis_ms - (before + after) * 500
            self.record(
                "clock",
                server=name,
                offset_ms=round(offset, 3),
                rtt_ms=round((after - before) * 1000, 3),
            )

    def _inject(self, config: Path, quota: QuotaClient) -> None:
        p = self.profile
        order: list[str] = []
        count = 0
        next_at = time.time() + self.rng.uniform(*p.fault_gap)
        while count < p.max_faults:
            if next_at > self.stop_at - p.settle:
                break
            time.sleep(max(0.0, next_at - time.time()))
            if not order:  # every enabled fault once per round, in a seeded order
                order = list(p.faults)
                self.rng.shuffle(order)
            name = order.pop()
            try:
                self.fault(name, config, quota)
            except Exception as exc:  # the harness's own machinery (e.g. a failover timing out)
                self.record("fault_error", fault=name, error=repr(exc))
            count += 1
            next_at = time.time() + self.rng.uniform(*p.fault_gap)
        time.sleep(max(0.0, self.stop_at - time.time()))

    def _wait_for_first_calls(self, timeout: float = 60.0) -> None:
        """Faults start once every pod has finished a call, or after ``timeout``.

        A pod learns the policy (the catalog) with its first call and keeps it; a fault
        that takes the catalog before any pod has read it leaves no pod able to restore
        it, and the run turns into nothing but ``UnknownTenant``. That is no outage a
        deployment meets (its pods ran before the fault) but the harness's own: an
        eviction-only run on a loaded machine injected its first fault 1 s after the
        start, its pods' first calls came 2 s after it.
        """
        started = time.time()
        waiting = set(self.pods)
        while waiting and time.time() - started < timeout:
            for name in sorted(waiting):
                history = self.dir / "pods" / f"{name}.jsonl"
                if history.exists() and '"kind":"call"' in history.read_text(errors="replace"):
                    waiting.discard(name)
            if waiting:
                time.sleep(0.05)
        self.record("pods_ready", waited_s=round(time.time() - started, 3),
                    not_ready=sorted(waiting))  # fmt: skip

    def _wait_for_pods(self) -> None:
        """Pods stop by themselves at the stop time; one still running 20 s later is hung."""
        deadline = self.stop_at + 20
        for name, process in sorted(self.pods.items()):
            if process.returncode is not None:
                continue  # killed by a fault, already recorded
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
                hung = False
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
                hung = True
            self.record("pod_exit", pod=name, returncode=process.returncode, hung=hung)


def run_profile(profile: Profile, workdir: Path | None = None) -> tuple[Path, checker.Report]:
    """Run ``profile`` in ``workdir`` (a new temporary directory by default) and check it."""
    directory = workdir or Path(tempfile.mkdtemp(prefix=f"rq-faults-{profile.seed}-"))
    Run(profile, directory).execute()
    return directory, checker.check_run(directory, check_options(profile))


def check_options(profile: Profile) -> checker.CheckOptions:
    """The checker's tolerances for ``profile`` (see ``CheckOptions``)."""
    return checker.CheckOptions(
        margin_s=profile.margin_s,
        loss_window_ms=round(profile.ttl_range[1] * 1000) + 500,
        state_loss_bound=0,
    )


def allowed_kinds(profile: Profile) -> frozenset[str]:
    """Violation kinds a profile reports without failing.

    A lease lost with Redis's data is missing from snapshots until its holder
    re-asserts it (a holder that never renews never does): that is reported,
    never a failure; so is a release that says "released" for an expired lease
    whose expiry the loss took (the library cannot tell; it frees the units).
    An overshoot after a loss is reported, and also fails the run as
    ``over_capacity`` / ``over_ceiling`` beyond the bound, which is 0 since the
    recovery window (``check_options``); a token going back fails too, and so
    does ``UnknownTenant`` right after a loss (pods keep and restore the policy
    they knew). A forged renewal accepted in a loss window
    fails the run only with the ``fenced-reassert`` flag (``profiles``).
    """
    allowed = {"vanished_after_state_loss", "released_after_state_loss", "state_loss_overshoot"}
    if "fenced-reassert" not in profile.flags:
        allowed.add("forgery_after_state_loss")
    return frozenset(allowed)


def main(argv: list[str] | None = None) -> int:
    """Run a profile by hand; exit status 1 if the checker found a violation that counts."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.driver",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", choices=("short", "long"), default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--flags", default=None, help=f"comma-separated: {sorted(profiles.FLAGS)}")
    parser.add_argument("--topology", choices=("shards", "cluster"), default="shards")
    parser.add_argument(
        "--faults", default=None, help="comma-separated fault kinds to draw (default: all)"
    )
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.profile:
        env["RATEQUOTA_FAULTS"] = args.profile
    if args.seed is not None:
        env["RATEQUOTA_FAULTS_SEED"] = str(args.seed)
    if args.flags is not None:
        env["RATEQUOTA_FAULTS_FLAGS"] = args.flags
    profile = profiles.from_environment(env, args.topology)
    if args.faults is not None:
        profile = profiles.only_faults(profile, args.faults.split(","))
    directory, report = run_profile(profile, args.dir)
    print(f"run directory: {directory}")
    print(report.summary())
    return 1 if report.hard(allowed_kinds(profile)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
