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


def test_long_profile_seed_and_flags_are_read() -> None:
    """RATEQUOTA_FAULTS, RATEQUOTA_FAULTS_SEED and RATEQUOTA_FAULTS_FLAGS."""
    env = {
        "RATEQUOTA_FAULTS": "long",
        "RATEQUOTA_FAULTS_SEED": "7",
        "RATEQUOTA_FAULTS_FLAGS": "eviction, catalog",
    }
    profile = profiles.from_environment(env)
    assert (profile.name, profile.seed) == ("long", 7)
    assert set(profiles.FLAGS["eviction"]) <= set(profile.faults)
    assert profile.flags == {"eviction", "catalog"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RATEQUOTA_FAULTS": "medium"}, "RATEQUOTA_FAULTS"),
        ({"RATEQUOTA_FAULTS_FLAGS": "state_loss"}, "unknown"),
    ],
)
def test_a_bad_variable_is_refused(env: dict[str, str], message: str) -> None:
    """An unknown profile or flag raises instead of silently running something else."""
    with pytest.raises(ValueError, match=message):
        profiles.from_environment(env)


def test_state_loss_checks_are_strict_and_catalog_makes_them_stricter() -> None:
    """``catalog`` turns UnknownTenant after a state loss into a failure; overshoot never passes.

    The leases fix is merged: after a state loss no overshoot is allowed (the
    bound is 0) and tokens never go back, in every profile.
    """
    from tests.faults import driver

    plain = profiles.from_environment({"RATEQUOTA_FAULTS_FLAGS": "eviction"})
    assert "unknown_after_state_loss" in driver.allowed_kinds(plain)
    assert "token_after_state_loss" not in driver.allowed_kinds(plain)
    assert driver.check_options(plain).state_loss_bound == 0
    strict = profiles.from_environment(
        {"RATEQUOTA_FAULTS_FLAGS": "eviction,catalog,fenced-reassert"}
    )
    assert driver.allowed_kinds(strict) == {"vanished_after_state_loss", "state_loss_overshoot"}


def test_async_cluster_adds_async_pods_to_the_cluster_run() -> None:
    """The cluster run has sync pods unless ``async-cluster`` is set; the shard run has both."""
    assert profiles.from_environment({}, topology="cluster").modes == ("sync",)
    flagged = profiles.from_environment({"RATEQUOTA_FAULTS_FLAGS": "async-cluster"}, "cluster")
    assert flagged.modes == ("sync", "async")
    assert profiles.from_environment({}).modes == ("sync", "async")
