"""The documentation: a strict site build, links out of docs/, and every Python example run.

``mkdocs build --strict`` (the same build as the ``docs`` extra) fails on a link
to a missing page or heading; links that leave docs/ for repository files are
checked here. Every ```python block of README.md and docs/ is executed by
pytest-examples on the embedded default, so an example cannot rot; a block that
needs a real deployment (host names) is fenced ``{.python .no-run}`` and shown only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples

from ratequota import GroupPolicy, Policy, TenantPolicy
from ratequota.testing import fake_client

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s#]+)(#[^)\s]*)?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def test_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs --strict: no missing page, no missing anchor, every page in the nav."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").exists()


def _outside_links(page: Path) -> Iterator[tuple[int, str]]:
    """Relative links of ``page`` (outside code blocks) that mkdocs does not check."""
    in_code = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for match in _LINK.finditer(line.replace("``", "")):
            target = match.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if page.parent == DOCS and not target.startswith(".."):
                continue  # a page of the site: mkdocs checks it
            yield number, target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_to_repository_files_resolve(page: Path) -> None:
    """A link from README.md, or from docs/ to a file outside it, names a file that exists."""
    missing = [
        f"{page.name}:{line}: {target}"
        for line, target in _outside_links(page)
        if not (page.parent / target).resolve().exists()
    ]
    assert missing == []


class _Done:
    """What the examples' ``run_batch`` returns: ignorable, and awaitable in async examples."""

    def __await__(self) -> Iterator[None]:
        return iter(())


def run_batch(*args: Any, **kwargs: Any) -> _Done:
    """The examples' stand-in for the user's batch."""
    return _Done()


EXAMPLE_POLICY = Policy(
    [
        GroupPolicy(
            "acme",
            capacity=24,
            tenants=[
                TenantPolicy("acme-prod", guarantee=12, lendable=1 / 3, borrow_limit=4),
                TenantPolicy("acme-dev", guarantee=12, lendable=1 / 3, borrow_limit=4),
            ],
        ),
        GroupPolicy("shared", capacity=16, tenants=[TenantPolicy("tenant-a", guarantee=4)]),
    ]
)


def _runnable(example: CodeExample) -> bool:
    return example.prefix.startswith("python") or (
        example.prefix.startswith("{") and ".no-run" not in example.prefix
    )


EXAMPLES = [e for e in find_examples(*map(str, PAGES)) if _runnable(e)]


def _page_file(path: Path, name: str) -> str | None:
    """The page's fenced block whose first line is ``# <name>`` (a file the examples read)."""
    block: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if _FENCE.match(line):
            if block is None:
                block = []
                continue
            if block and block[0] == f"# {name}\n":
                return "".join(block)
            block = None
        elif block is not None:
            block.append(line)
    return None


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_python_example_runs(
    example: CodeExample, eval_example: EvalExample, tmp_path: Path, monkeypatch: Any
) -> None:
    """Each example runs as written, with ``quota``, ``policy`` and ``run_batch`` predefined."""
    toml = _page_file(example.path, "policy.toml")
    if toml is not None:
        (tmp_path / "policy.toml").write_text(toml, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    quota = fake_client(EXAMPLE_POLICY)
    try:
        eval_example.run(
            example,
            module_globals={"quota": quota, "policy": EXAMPLE_POLICY, "run_batch": run_batch},
        )
    finally:
        quota.close()
