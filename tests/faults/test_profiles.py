"""Profiles are chosen by environment variables, and a typo there fails loudly."""

from __future__ import annotations

import pytest

from tests.faults import profiles


def test_the_default_is_the_short_profile_with_main_faults_only() -> None:
    """No variable set: the short profile, fixed seed, only faults main handles."""
    profile = profiles.from_environment({})
    assert profile.name == "short"
    assert profile.seed == profiles.SHORT.seed
    assert profile.faults == profiles.MAIN_FAULTS
    assert not profile.flags


def test_merged_fixes_run_by_default_on_both_topologies() -> None:
    """Eviction and memory pressure (the old ``eviction`` and ``oom`` flags) run by default on
    both topologies, each fault of the cluster run fits its count, and the deadline margin is
    the documented promise (the old ``strict-deadline``): one socket timeout plus slack."""
    shards = profiles.from_environment({})
    cluster = profiles.from_environment({}, topology="cluster")
    for profile in (shards, cluster):
        assert {"maxmemory_evict", "maxmemory_noeviction"} <= set(profile.faults)
        assert profile.margin_s == profile.socket_timeout + 0.5
    assert cluster.max_faults >= len(cluster.faults)
    assert set(profiles.FLAGS) == {"fenced-reassert"}


def test_long_profile_seed_and_flags_are_read() -> None:
    """RATEQUOTA_FAULTS, RATEQUOTA_FAULTS_SEED and RATEQUOTA_FAULTS_FLAGS."""
    env = {
        "RATEQUOTA_FAULTS": "long",
        "RATEQUOTA_FAULTS_SEED": "7",
        "RATEQUOTA_FAULTS_FLAGS": " fenced-reassert, ",
    }
    profile = profiles.from_environment(env)
    assert (profile.name, profile.seed) == ("long", 7)
    assert set(profiles.FLAGS["fenced-reassert"]) <= set(profile.faults)
    assert profile.flags == {"fenced-reassert"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RATEQUOTA_FAULTS": "medium"}, "RATEQUOTA_FAULTS"),
        ({"RATEQUOTA_FAULTS_FLAGS": "state_loss"}, "unknown"),
        # Merged into the defaults: naming one now is a stale setting, refused loudly.
        ({"RATEQUOTA_FAULTS_FLAGS": "eviction,catalog"}, "unknown"),
    ],
)
def test_a_bad_variable_is_refused(env: dict[str, str], message: str) -> None:
    """An unknown profile or flag raises instead of silently running something else."""
    with pytest.raises(ValueError, match=message):
        profiles.from_environment(env)


def test_state_loss_checks_are_strict_and_fenced_reassert_makes_them_stricter() -> None:
    """After a state loss no overshoot is allowed (the bound is 0), tokens never go back and
    listed tenants are served (the catalog fix is merged), in every profile; only
    ``fenced-reassert`` turns a forged renewal accepted in the loss window into a failure.
    """
    from tests.faults import driver

    plain = profiles.from_environment({})
    assert driver.allowed_kinds(plain) == {
        "vanished_after_state_loss",
        "released_after_state_loss",
        "state_loss_overshoot",
        "forgery_after_state_loss",
    }
    assert driver.check_options(plain).state_loss_bound == 0
    strict = profiles.from_environment({"RATEQUOTA_FAULTS_FLAGS": "fenced-reassert"})
    assert driver.allowed_kinds(strict) == {
        "vanished_after_state_loss",
        "released_after_state_loss",
        "state_loss_overshoot",
    }


def test_both_topologies_run_sync_and_async_pods() -> None:
    """The cluster run has async pods too (the old ``async-cluster`` flag), as the shard run."""
    assert profiles.from_environment({}, topology="cluster").modes == ("sync", "async")
    assert profiles.from_environment({}).modes == ("sync", "async")


def test_only_faults_narrows_the_draw_and_refuses_what_the_topology_cannot_inject() -> None:
    """``--faults``: the named kinds only; a kind of the other topology, a typo or an empty
    list is a clear error, not a run that silently injects nothing."""
    shards = profiles.from_environment({})
    cluster = profiles.from_environment({}, topology="cluster")
    narrowed = profiles.only_faults(shards, ["maxmemory_evict", " pod_kill "])
    assert narrowed.faults == ("maxmemory_evict", "pod_kill")
    assert narrowed.seed == shards.seed
    with pytest.raises(ValueError, match="redis_restart_empty"):
        profiles.only_faults(cluster, ["redis_restart_empty"])
    with pytest.raises(ValueError, match="evict_typo"):
        profiles.only_faults(shards, ["evict_typo"])
    with pytest.raises(ValueError, match="none named"):
        profiles.only_faults(shards, [""])
