"""The checker fails when it should: hand-made histories, each with one kind of violation.

Every test builds a small history by hand (times in ms on one clock, as the
driver's host clock and Redis TIME are), runs the checker and expects exactly
the violation planted, so a checker that silently passes everything cannot
pass here. ``test_a_clean_history_has_no_violation`` is the baseline the
others differ from by one record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checker import CheckOptions, Report, check, check_run, complete_calls
from tests.faults.records import JsonlWriter, read_jsonl

T0 = 1_800_000_000_000  # ms
#: Tokens of the leases of ``clean_history``, as snapshots list them.
TOKENS = {"x": 1, "y": 2, "z": 3}


def policy(
    capacity: int = 4, ceilings: dict[str, int] | None = None, at: int = 0
) -> dict[str, Any]:
    """A policy record for group ``g`` applied during ``[T0 + at, T0 + at + 1]``."""
    tenants = {t: {"guarantee": 0, "ceiling": c} for t, c in (ceilings or {"a": 4, "b": 4}).items()}
    return {
        "kind": "policy",
        "wall_start": (T0 + at) / 1000,
        "wall_end": (T0 + at + 1) / 1000,
        "groups": {"g": {"capacity": capacity, "tenants": tenants}},
    }


def call(op: str, start: int, end: int, **fields: Any) -> dict[str, Any]:
    """A call record of pod ``p0`` from ``T0 + start`` to ``T0 + end`` (ms)."""
    record: dict[str, Any] = {
        "kind": "call",
        "op": op,
        "pod": "p0",
        "group": "g",
        "wall_start": (T0 + start) / 1000,
        "wall_end": (T0 + end) / 1000,
        "mono_start": start / 1000,
        "mono_end": end / 1000,
        "deadline_s": 0.0,
    }
    record.update(fields)
    return record


def admit(
    lease: str, at: int, units: int = 1, token: int = 1, ttl: int = 1000, tenant: str = "a"
) -> dict[str, Any]:
    """A try_acquire admitted at ``T0 + at`` on Redis time, reported 1 ms later."""
    return call(
        "try_acquire",
        at - 1,
        at + 1,
        outcome="admitted",
        request_id=lease,
        lease_id=lease,
        tenant=tenant,
        units=units,
        token=token,
        ttl_ms=ttl,
        admit_ms=T0 + at,
        expiry_ms=T0 + at + ttl,
    )


def release(lease: str, at: int, state: str = "released") -> dict[str, Any]:
    """A release started at ``T0 + at`` that answered ``state`` 1 ms later."""
    return call("release", at, at + 1, outcome="ok", lease_id=lease, via="explicit", state=state)


def renew(lease: str, at: int, expiry: int | None, ttl: int = 1000) -> dict[str, Any]:
    """A renewal at ``T0 + at``: renewed until ``T0 + expiry``, or lost (None)."""
    return call(
        "renew",
        at,
        at + 1,
        outcome="ok",
        lease_id=lease,
        ttl_ms=ttl,
        renewed=expiry is not None,
        new_expiry_ms=0 if expiry is None else T0 + expiry,
    )


def snapshot(
    at: int, leases: dict[str, int], used: int | None = None, **flags: Any
) -> dict[str, Any]:
    """A snapshot of ``g`` at ``T0 + at`` listing ``leases`` (id -> units)."""
    return {
        "kind": "snapshot",
        "group": "g",
        "wall_start": (T0 + at - 1) / 1000,
        "wall_end": (T0 + at + 1) / 1000,
        "now_ms": T0 + at,
        "used": sum(leases.values()) if used is None else used,
        "capacity": 4,
        "pending": 0,
        "truncated": False,
        "leases": [
            {"id": k, "tenant": "a", "units": u, "token": TOKENS.get(k, 0), "expiry_ms": 0}
            for k, u in leases.items()
        ],
        **flags,
    }


def state_loss(at: int, until: int) -> dict[str, Any]:
    """A Redis restart without persistence from ``T0 + at`` to ``T0 + until``."""
    return {
        "kind": "fault",
        "fault": "redis_restart_empty",
        "server": "s1",
        "state_loss": True,
        "wall_start": (T0 + at) / 1000,
        "wall_end": (T0 + until) / 1000,
    }


def run(
    calls: list[dict[str, Any]],
    *,
    policies: list[dict[str, Any]] | None = None,
    faults: list[dict[str, Any]] | None = None,
    snapshots: list[dict[str, Any]] | None = None,
    options: CheckOptions | None = None,
) -> Report:
    """Check a hand-made history (one policy of capacity 4 unless given)."""
    return check(
        calls,
        policies if policies is not None else [policy()],
        faults or [],
        snapshots or [],
        options or CheckOptions(loss_window_ms=1000),
    )


def kinds(report: Report) -> dict[str, int]:
    """Violation counts by kind."""
    return dict(report.kinds())


def clean_history() -> list[dict[str, Any]]:
    """Two tenants sharing capacity 4 without ever exceeding it; tokens in order."""
    return [
        admit("x", 100, units=2, token=1),
        admit("y", 200, units=2, token=2, tenant="b"),
        release("x", 300),
        admit("z", 400, units=2, token=3),
        renew("z", 500, 1600),
        release("y", 600),
        release("z", 700),
    ]


def test_a_clean_history_has_no_violation() -> None:
    """The baseline: a history within every bound passes, with its figures counted."""
    report = run(
        clean_history(), snapshots=[snapshot(350, {"y": 2}), snapshot(450, {"y": 2, "z": 2})]
    )
    assert report.violations == []
    assert report.figures["admissions"] == 3
    assert report.figures["max_overshoot_units"] == 0


def test_over_capacity_is_reported() -> None:
    """Three leases of 2 units live at once on capacity 4 (each tenant within its ceiling)."""
    calls = [
        admit("x", 100, units=2, token=1),
        admit("y", 200, units=2, token=2, tenant="b"),
        admit("w", 250, units=2, token=3, tenant="b"),
    ]
    report = run(calls)
    assert kinds(report) == {"over_capacity": 1}
    assert report.figures["max_overshoot_units"] == 2


def test_a_release_started_before_an_admission_frees_its_units() -> None:
    """The same units again right after the release began: no overshoot (the boundary)."""
    report = run([admit("x", 100, units=4), release("x", 200), admit("y", 200, units=4, token=2)])
    assert report.violations == []


def test_over_ceiling_is_reported() -> None:
    """A tenant above min(C, G + B) while the group is within its capacity."""
    calls = [admit("x", 100, units=2), admit("y", 200, units=2, token=2)]
    report = run(calls, policies=[policy(ceilings={"a": 3, "b": 4})])
    assert kinds(report) == {"over_ceiling": 1}


def test_a_capacity_lowered_under_held_leases_is_not_an_overshoot_but_admitting_above_it_is() -> (
    None
):
    """Leases held before a lower capacity may run on; no admission may add to them."""
    policies = [policy(capacity=4), policy(capacity=2, at=150)]
    held = [admit("x", 100, units=3, ttl=5000)]
    assert run(held, policies=policies).violations == []
    report = run([*held, admit("y", 300, units=1, token=2)], policies=policies)
    assert kinds(report) == {"over_capacity": 1}


def test_while_a_policy_change_is_applied_both_bounds_hold() -> None:
    """During the apply call the larger capacity counts: Redis may still decide on the old one."""
    policies = [policy(capacity=4), policy(capacity=2, at=150)]
    policies[1]["wall_end"] = (T0 + 400) / 1000
    report = run(
        [admit("x", 100, units=2, ttl=5000), admit("y", 300, units=2, token=2)], policies=policies
    )
    assert report.violations == []


def test_an_overshoot_after_state_loss_is_reported_apart_and_bounded() -> None:
    """Inside a loss window the overshoot is its own kind; beyond the bound it also counts."""
    calls = [admit("x", 100, units=4, ttl=5000), admit("y", 300, units=4, token=1, tenant="b")]
    faults = [state_loss(200, 250)]
    report = run(calls, faults=faults)
    assert kinds(report) == {"state_loss_overshoot": 1, "token_after_state_loss": 1}
    within = run(
        calls, faults=faults, options=CheckOptions(loss_window_ms=1000, state_loss_bound=4)
    )
    assert within.hard({"state_loss_overshoot", "token_after_state_loss"}) == []
    strict = run(
        calls, faults=faults, options=CheckOptions(loss_window_ms=1000, state_loss_bound=0)
    )
    assert kinds(strict)["over_capacity"] == 1


def test_a_token_going_back_is_reported() -> None:
    """A later admission with a smaller token, without any state loss."""
    calls = [admit("x", 100, token=5), release("x", 150), admit("y", 200, token=4)]
    assert kinds(run(calls)) == {"token_order": 1}


def test_a_repeated_token_is_reported() -> None:
    """Two leases of one group with the same token."""
    calls = [admit("x", 100, token=5), release("x", 150), admit("y", 200, token=5)]
    assert kinds(run(calls)) == {"token_order": 1}


def test_tokens_within_one_millisecond_are_not_ordered() -> None:
    """Admissions in the same ms cannot be ordered by time: any token order is fine."""
    calls = [admit("x", 100, token=5), admit("y", 100, token=4)]
    assert run(calls).violations == []


def test_a_release_not_reflected_in_a_later_snapshot_is_reported() -> None:
    """The lease is listed after its release was acknowledged."""
    report = run(clean_history(), snapshots=[snapshot(350, {"x": 2, "y": 2})])
    assert kinds(report) == {"release_not_reflected": 1}


def test_a_live_lease_missing_from_a_snapshot_is_reported() -> None:
    """A lease before its expiry, not released, absent from the snapshot (used agrees)."""
    report = run(clean_history(), snapshots=[snapshot(250, {"y": 2})])
    assert kinds(report) == {"lease_vanished": 1}
    lossy = run(clean_history(), snapshots=[snapshot(250, {"y": 2})], faults=[state_loss(220, 240)])
    assert kinds(lossy) == {"vanished_after_state_loss": 1}


def test_a_renewal_that_finds_a_live_lease_gone_is_reported() -> None:
    """Renew says lost although the lease's reported expiry is still ahead."""
    report = run([admit("x", 100, ttl=1000), renew("x", 500, None)])
    assert kinds(report) == {"lease_vanished": 1}


def test_a_renewal_may_shorten_the_expiry() -> None:
    """Renewing with a shorter TTL moves the expiry earlier; losing it after that is fine."""
    calls = [admit("x", 100, ttl=2000), renew("x", 200, 500), renew("x", 600, None)]
    assert run(calls).violations == []


def test_snapshot_accounting_is_checked() -> None:
    """Units held must equal the units of the listed leases."""
    report = run(clean_history(), snapshots=[snapshot(350, {"y": 2}, used=3)])
    assert kinds(report) == {"accounting": 1}


def test_released_after_expiry_is_reported() -> None:
    """A release after the lease's expiry must not report it live."""
    report = run([admit("x", 100, ttl=100), release("x", 400)])
    assert kinds(report) == {"released_after_expiry": 1}
    assert run([admit("x", 100, ttl=100), release("x", 400, state="expired")]).violations == []
    # Its expiry lost (evicted) with its entry still there, the library cannot tell: it frees
    # the units and says "released". Reported apart inside a loss window, as such.
    lossy = run([admit("x", 100, ttl=100), release("x", 400)], faults=[state_loss(380, 390)])
    assert kinds(lossy) == {"released_after_state_loss": 1}


def test_a_late_call_is_reported() -> None:
    """A call that returned after its deadline plus the margin."""
    late = call("acquire", 0, 2500, outcome="refused", deadline_s=1.0, request_id="q")
    assert kinds(run([late], options=CheckOptions(margin_s=1.0))) == {"late_call": 1}
    assert run([late], options=CheckOptions(margin_s=1.6)).violations == []


def test_units_held_at_the_end_are_reported() -> None:
    """The pinned end snapshot counts units, or a key has no expiry."""
    end = snapshot(9000, {}, used=2, pinned=True, keys_without_ttl=["rq:v1:{g}:demand"])
    assert kinds(run(clean_history(), snapshots=[end])) == {"held_at_end": 1, "key_without_ttl": 1}
    clean_end = snapshot(9000, {}, pinned=True, keys_without_ttl=[])
    assert run(clean_history(), snapshots=[clean_end]).violations == []


def test_a_stray_lease_in_the_final_snapshot_is_reported() -> None:
    """The final snapshot lists a lease no pod asked for (and no killed pod could have)."""
    final = snapshot(750, {"p9.0.1": 1}, final=True)
    assert kinds(run(clean_history(), snapshots=[final])) == {"stray_lease": 1}
    killed = call(
        "try_acquire", 1, 2, outcome="error", error="BackendUnavailable", pod="p9", killed=True
    )
    assert run([*clean_history(), killed], snapshots=[final]).violations == []


def test_foreign_errors_and_raising_exits_are_reported() -> None:
    """A non-ratequota exception, and leaving acquire's block with an exception."""
    calls = [
        call("try_acquire", 1, 2, outcome="error", error="foreign:KeyError", request_id="q"),
        call("exit", 3, 4, outcome="error", error="BackendError", lease_id="r"),
    ]
    assert kinds(run(calls)) == {"foreign_error": 1, "exit_raised": 1}


def test_torn_last_line_is_skipped_and_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    """A SIGKILLed writer may leave half a last line; anything else torn is corruption."""
    path = tmp_path / "p.jsonl"
    writer = JsonlWriter(path)
    writer.write({"n": 1})
    writer.close()
    with path.open("a", encoding="utf-8") as f:
        f.write('{"n": 2, "half')
    assert list(read_jsonl(path)) == [{"n": 1}]
    path.write_text('{"n": 1}\n{"half\n{"n": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON record"):
        list(read_jsonl(path))


def test_check_run_reads_a_run_directory(tmp_path: Path) -> None:
    """The files the driver and the pods write: one planted violation is found in them."""
    (tmp_path / "pods").mkdir()
    driver = [
        policy(),
        {
            "kind": "fault",
            "fault": "pod_kill",
            "pod": "p1",
            "state_loss": False,
            "wall_start": T0 / 1000,
            "wall_end": T0 / 1000,
            "wall": T0 / 1000,
        },
    ]
    (tmp_path / "driver.jsonl").write_text("".join(json.dumps(r) + "\n" for r in driver))
    calls = [admit("x", 100, units=3), admit("y", 200, units=3, token=2, tenant="b")]
    (tmp_path / "pods" / "p0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calls))
    assert kinds(check_run(tmp_path)) == {"over_capacity": 1}


def test_a_call_without_an_answer_may_have_run() -> None:
    """A timed-out release or renewal may still run in Redis later: never a false overshoot.

    A paused server keeps the request in its socket buffer and runs it when it
    resumes, after the pod has given up; the units may then be free (release)
    or the expiry shortened (renewal with a shorter TTL) without the pod knowing.
    """
    timed_out = call("release", 200, 450, outcome="error", error="BackendUnavailable", lease_id="x")
    freed = [admit("x", 100, units=4, ttl=5000), timed_out, admit("y", 500, units=4, token=2)]
    assert run(freed).violations == []
    renew_lost = call(
        "renew", 200, 450, outcome="error", error="BackendUnavailable", lease_id="x", ttl_ms=100
    )
    shortened = [admit("x", 100, units=4, ttl=5000), renew_lost, admit("y", 500, units=4, token=2)]
    assert run(shortened).violations == []
    gone = [admit("x", 100, ttl=5000), renew_lost, renew("x", 600, None)]
    assert run(gone).violations == []


def test_gone_is_judged_by_when_the_answer_came() -> None:
    """A slow release (redirected after a failover) may run after the expiry: not a vanish."""
    slow = call("release", 900, 1200, outcome="ok", lease_id="x", via="explicit", state="expired")
    assert run([admit("x", 100, ttl=1000), slow]).violations == []
    quick = call("release", 900, 905, outcome="ok", lease_id="x", via="explicit", state="expired")
    assert kinds(run([admit("x", 100, ttl=1000), quick])) == {"lease_vanished": 1}


def test_a_replay_must_return_the_original_lease() -> None:
    """A retry with the same id gets the same lease; another tenant's or other units are refused.

    Issue 9 item 2: request ids were scoped to the group, so tenant B retrying
    tenant A's id was "admitted" as a replay of A's lease without being charged.
    """

    def replay(tenant: str, units: int, token: int) -> dict[str, Any]:
        return call(
            "try_acquire", 150, 151, outcome="admitted", request_id="x", lease_id="x",
            tenant=tenant, units=units, token=token, ttl_ms=1000, replay=True,
            expiry_ms=T0 + 1100,
        )  # fmt: skip

    original = admit("x", 100, units=2, token=7)
    assert run([original, replay("a", 2, 7)]).violations == []
    assert kinds(run([original, replay("b", 2, 7)])) == {"replay_mismatch": 1}
    assert kinds(run([original, replay("a", 3, 7)])) == {"replay_mismatch": 1}


def test_one_id_may_name_a_new_lease_after_the_first_ended() -> None:
    """Calls on a reused id belong to the latest lease of that id known when they started."""
    calls = [
        admit("x", 100, units=2, token=1, ttl=200),
        admit("x", 400, units=2, token=5),
        renew("x", 500, 1500),
        release("x", 600),
    ]
    later = snapshot(550, {"x": 2})
    later["leases"][0]["token"] = 5  # the second lease, not the first
    report = run(calls, snapshots=[later])
    assert report.violations == [], report.summary()
    earlier = snapshot(550, {"x": 2})
    assert kinds(run(calls, snapshots=[earlier])) == {"lease_vanished": 1}
    assert report.figures["leases"] == 2


def test_a_known_tenant_refused_as_unknown_is_reported() -> None:
    """Issue 9 item 1: after an empty restart pods answered UnknownTenant for ever."""
    refused = call(
        "try_acquire", 5000, 5001, outcome="error", error="UnknownTenant", tenant="a",
        request_id="q",
    )  # fmt: skip
    assert kinds(run([refused])) == {"known_tenant_refused": 1}
    assert kinds(run([refused], faults=[state_loss(4500, 4600)])) == {"unknown_after_state_loss": 1}
    stranger = dict(refused, tenant="zed")
    assert run([stranger]).violations == []


def test_an_accepted_forgery_is_reported() -> None:
    """Issue 9 item 3: release and renew checked only the lease id."""
    forged = call(
        "forged_release", 300, 301, outcome="ok", lease_id="x", tenant="b", token=1,
        true_token=1, state="released",
    )  # fmt: skip
    refused = dict(forged, state="fenced")
    assert kinds(run([admit("x", 100), forged])) == {"forgery_accepted": 1}
    assert run([admit("x", 100), refused]).violations == []
    renewed = call(
        "forged_renew", 300, 301, outcome="ok", lease_id="x", tenant="a", token=2,
        true_token=1, renewed=True,
    )  # fmt: skip
    assert kinds(run([admit("x", 100), renewed])) == {"forgery_accepted": 1}
    lossy = run([admit("x", 100), renewed], faults=[state_loss(250, 260)])
    assert kinds(lossy) == {"forgery_after_state_loss": 1}


def test_a_killed_pod_may_have_released_in_its_last_call() -> None:
    """The release a SIGKILLed pod sent may have run: its intent ends the lease's validity.

    Without the intent the checker would count the lease until its expiry
    and report an overshoot that never happened.
    """
    intent = {
        "kind": "intent", "op": "release", "pod": "p0", "worker": 0, "call": "p0.0#9",
        "lease_id": "x", "wall_start": (T0 + 200) / 1000,
    }  # fmt: skip
    history = [admit("x", 100, units=4, ttl=5000), admit("y", 300, units=4, token=2, tenant="b")]
    assert kinds(run(history)) == {"over_capacity": 1}
    assert run(complete_calls([*history, intent])).violations == []
    answered = dict(release("x", 200), call="p0.0#9")
    assert len(complete_calls([*history, intent, answered])) == 3


def metered_policy(rate: int = 100, burst: int = 50, at: int = 0) -> dict[str, Any]:
    """``policy()`` with a ``tokens`` meter: ``rate`` per second and ``burst`` for the group,
    ceil 60/s and cburst 30 for tenant ``a``; ``b``'s ceiling bucket never binds, so the
    group's bound is what its admissions meet."""
    record = policy(capacity=100, ceilings={"a": 100, "b": 100}, at=at)
    shares = {"a": {"ceil": 60, "cburst": 30}, "b": {"ceil": 10 * rate, "cburst": 10 * burst}}
    record["groups"]["g"]["meters"] = {"tokens": {"rate": rate, "burst": burst, "tenants": shares}}
    return record


def metered(lease: str, at: int, tokens: int, tenant: str = "b") -> dict[str, Any]:
    """An admission at ``T0 + at`` naming ``tokens`` (a distinct token per lease)."""
    record = admit(lease, at, token=at, ttl=50, tenant=tenant)
    record["tokens"] = tokens
    return record


def test_tokens_within_the_buckets_pass() -> None:
    """A burst, then the rate: the group's bucket lets exactly this through (within ceil)."""
    calls = [metered("x1", 100, 25), metered("x2", 101, 25)]  # the burst of 50 at once
    calls += [metered(f"y{i}", 200 + 100 * i, 10) for i in range(10)]  # 100/s from 100 ms on
    report = run(calls, policies=[metered_policy()])
    assert report.violations == []
    assert report.figures["tokens_admitted"] == {"g": 150}


def test_tokens_above_the_groups_bucket_are_reported() -> None:
    """One token more than burst + rate·T over some interval is an excess, found wherever it
    lies in the history."""
    calls = [metered("x1", 100, 25), metered("x2", 101, 25)]
    calls += [metered(f"y{i}", 200 + 100 * i, 10) for i in range(10)]
    calls.append(metered("over", 1101, 1))  # 151 tokens in [100, 1101]: bound 150.1
    report = run(calls, policies=[metered_policy()])
    assert kinds(report) == {"over_rate": 1}
    assert "[1800000000100, 1800000001101]" in report.violations[0].detail


def test_tokens_above_a_tenants_ceiling_bucket_are_reported() -> None:
    """Tenant ``a`` may take cburst 30 + 60/s, within the group's bucket or not."""
    calls = [metered("a1", 100, 30, tenant="a"), metered("a2", 600, 31, tenant="a")]
    report = run(calls, policies=[metered_policy()])
    assert kinds(report) == {"over_tenant_rate": 1}


def test_tokens_after_a_state_loss_are_held_to_the_same_buckets() -> None:
    """A loss restarts the buckets at their floor: no excess is excused by it."""
    calls = [metered("x1", 100, 50), metered("x2", 300, 50)]  # 100 in 200 ms: bound 70
    report = run(calls, policies=[metered_policy()], faults=[state_loss(150, 200)])
    assert kinds(report) == {"over_rate": 1}


def test_replays_and_unmetered_admissions_are_not_counted_as_tokens() -> None:
    """A replay answers the same lease (charged once); a lease naming no tokens charges none."""
    replay = metered("x1", 100, 50)
    replay.update(replay=True, admit_ms=T0 + 101)
    plain = admit("p", 102, token=102, tenant="b")
    report = run([metered("x1", 100, 50), replay, plain], policies=[metered_policy()])
    assert report.violations == []
    assert report.figures["tokens_admitted"] == {"g": 50}
