"""The fault harness as a test: pods under injected faults, checked by the independent checker.

By default the short profile runs (about 40 s on two shards and 40 s on a
three-node cluster, fixed seed) with the faults today's library handles
(``profiles.MAIN_FAULTS``, ``profiles.CLUSTER_FAULTS``).
``RATEQUOTA_FAULTS=long`` runs the long profile, ``RATEQUOTA_FAULTS_SEED``
picks another seed, and ``RATEQUOTA_FAULTS_FLAGS`` adds the faults and strict
checks that wait for fixes not merged yet (see ``profiles``). A failure
prints the checker's summary and the run directory, whose JSON-lines files
hold every call; re-run the same seed with ``python -m tests.faults.driver``.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import _no_redis
from tests.faults import driver, profiles
from tests.servers import redis_server_binary

pytestmark = [pytest.mark.real_redis, pytest.mark.slow]


@pytest.mark.parametrize("topology", ["shards", "cluster"])
def test_no_violation_under_faults(topology: str) -> None:
    """Every enabled fault is injected, work gets done, and no property that counts breaks.

    ``shards``: two servers, one with AOF; sync and async pods; pod kills,
    pauses, restarts (from the AOF, and empty: the recovery window), SCRIPT
    FLUSH, policy changes, memory pressure (evicting, and refusing writes).
    ``cluster``: three masters, sync and async pods; the same without
    restarts, plus failovers to a freshly added replica.
    """
    if redis_server_binary() is None or shutil.which("redis-cli") is None:
        _no_redis()
    profile = profiles.from_environment(topology=topology)
    directory, report = driver.run_profile(profile)
    summary = f"seed {profile.seed}, run directory {directory}\n{report.summary()}"
    print(summary)
    hard = report.hard(driver.allowed_kinds(profile))
    assert not hard, summary
    injected = set(report.figures["faults"])
    # Every enabled kind normally runs; a failover slowed by a loaded machine can use up the
    # time of the last ones, so at least all but two must have run.
    assert injected <= set(profile.faults), summary
    assert len(injected) >= len(profile.faults) - 2, summary
    assert report.figures["admissions"] > 50, summary
    assert report.figures["pods_hung"] == 0, summary
    shutil.rmtree(directory, ignore_errors=True)
