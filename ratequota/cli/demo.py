"""A short demonstration: threads of two tenants sharing a group, borrowing and reclaiming.

Runs in a few seconds on the embedded default (no Redis needed) or any
backend the command line names, and prints what each tenant held and how the
limits moved. It checks the safety invariant as it goes and exits non-zero
if it was ever broken.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

from ratequota.cli.backend import client_from_args
from ratequota.cli.output import add_json_option, plural, print_json
from ratequota.clients.sync import QuotaClient
from ratequota.errors import QuotaExceeded
from ratequota.policy import GroupPolicy, Policy, TenantPolicy

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ratequota demo``."""
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to run (default 3)")
    parser.add_argument("--workers", type=int, default=8, help="threads per tenant (default 8)")
    add_json_option(parser, "text")


def run(args: argparse.Namespace) -> int:
    """Run the demonstration; 0 when every invariant held."""
    client: QuotaClient = client_from_args(args)
    group = f"demo-{uuid.uuid4().hex[:8]}"
    policy = Policy(
        groups=(
            GroupPolicy(
                group,
                capacity=24,
                tenants=(
                    TenantPolicy("lender", guarantee=12, lendable=1 / 3, borrow_limit=4),
                    TenantPolicy("borrower", guarantee=12, lendable=1 / 3, borrow_limit=4),
                ),
            ),
        )
    )
    client.apply_policy(policy)
    say = (lambda text="": None) if args.json else print
    say(f"group {group}: capacity 24; lender and borrower each guaranteed 12 (8 never lent),")
    say("each may borrow 4 above its guarantee.\n")
    stop = threading.Event()
    lender_active = threading.Event()
    held = {"lender": 0, "borrower": 0}
    admitted = {"lender": 0, "borrower": 0}
    refused = {"lender": 0, "borrower": 0}
    peak = {"lender": 0, "borrower": 0, "group": 0}
    violations: list[str] = []
    lock = threading.Lock()  # guards the counters above; never held across a Redis call

    def worker(tenant: str) -> None:
        while not stop.is_set():
            if tenant == "lender" and not lender_active.is_set():
                time.sleep(0.01)
                continue
            try:
                with client.acquire(tenant, units=2, timeout=0.5, ttl=10):
                    with lock:
                        held[tenant] += 2
                        admitted[tenant] += 1
                        peak[tenant] = max(peak[tenant], held[tenant])
                        total = held["lender"] + held["borrower"]
                        peak["group"] = max(peak["group"], total)
                        if total > 24 or held[tenant] > 16:
                            violations.append(f"{tenant} held {held[tenant]}, group {total}")
                    time.sleep(0.02)
                    with lock:
                        held[tenant] -= 2
            except QuotaExceeded:
                with lock:
                    refused[tenant] += 1

    threads = [
        threading.Thread(target=worker, args=(tenant,), daemon=True)
        for tenant in ("lender", "borrower")
        for _ in range(args.workers)
    ]
    for thread in threads:
        thread.start()
    half = args.seconds / 2
    time.sleep(half)
    snap = client.snapshot(group, ["lender", "borrower"])
    borrower = snap.tenants["borrower"]
    phases = {"lender idle": {"borrower": borrower.used}}
    say(f"lender idle:    borrower holds {borrower.used:2d} units")
    lender_active.set()
    time.sleep(half)
    snap = client.snapshot(group, ["lender", "borrower"])
    phases["lender back"] = {name: snap.tenants[name].used for name in ("lender", "borrower")}
    for name in ("lender", "borrower"):
        say(f"lender back:    {name:8s} holds {snap.tenants[name].used:2d} units")
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    say()
    for name in ("lender", "borrower"):
        say(
            f"{name:8s}: {plural(admitted[name], 'batch', 'batches')} admitted, "
            f"{refused[name]} timed out, peak {plural(peak[name], 'unit')}"
        )
    say(f"group peak {peak['group']} of 24 units; over-admission: {len(violations)}")
    left = client.snapshot(group).used
    say(f"units still held after the run: {left}")
    client.close()
    if args.json:
        print_json(
            {
                "group": group,
                "held": phases,
                "admitted": admitted,
                "timed_out": refused,
                "peak": peak,
                "violations": violations,
                "left_over_units": left,
            }
        )
    return 1 if violations or left else 0
