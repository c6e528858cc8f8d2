"""The wheel ships the Lua scripts: build it, install it in a fresh virtualenv, acquire a lease."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import ratequota, sys
from ratequota import GroupPolicy, Policy, QuotaClient, TenantPolicy
assert "site-packages" in ratequota.__file__, ratequota.__file__
quota = QuotaClient()
quota.apply_policy(Policy([GroupPolicy("g", 4, [TenantPolicy("t", guarantee=4)])]))
with quota.acquire("t", 3) as lease:
    print("lease", lease.units, lease.token)
"""


@pytest.mark.slow
def test_wheel_installs_and_acquires(tmp_path: Path) -> None:
    """Build a wheel, install it without the source tree, and run an acquire from it."""
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("ratequota-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for script in ("_lib", "acquire", "release", "renew", "snapshot", "apply_policy"):
        assert f"ratequota/lua/{script}.lua" in names
    assert "ratequota/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # Dependencies come from this test environment's site-packages, added as a plain path
    # (not a site dir), so the editable install of the source tree there is not picked up.
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run(
        [str(python), "-c", PROGRAM],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("lease 3 1")
