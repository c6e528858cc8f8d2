"""The documentation build (docs/build.py): links and anchors resolve, pages render.

The real pages are checked on every run, so a renamed heading or a missing
page fails the suite rather than leaving a dead link; the checker and the
renderer are also tested on small pages made here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BUILD = Path(__file__).resolve().parent.parent / "docs" / "build.py"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    """docs/build.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("docs_build", BUILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_build"] = module
    spec.loader.exec_module(module)
    return module


def test_every_docs_link_and_anchor_resolves(build: ModuleType) -> None:
    """No page of docs/ links to a missing page, file or heading."""
    problems = build.check(build.pages())
    assert not problems, "\n".join(str(p) for p in problems)


def test_docs_pages_render(build: ModuleType, tmp_path: Path) -> None:
    """The build writes an HTML page per Markdown page, with anchors and nav links."""
    build.write_site(build.pages(), tmp_path)
    written = sorted(p.name for p in tmp_path.glob("*.html"))
    assert written == sorted(f"{p.stem}.html" for p in build.pages())
    cli = (tmp_path / "cli.html").read_text()
    assert '<h2 id="policy-apply">policy apply</h2>' in cli
    assert '<a href="simulate.html">' in cli


def test_checker_finds_missing_pages_and_anchors(build: ModuleType, tmp_path: Path) -> None:
    """A link to a missing page or heading is reported with file and line; code is ignored."""
    good = tmp_path / "a.md"
    good.write_text("# Title\n\n## Two words `here`\n\n## Two words here\n")
    bad = tmp_path / "b.md"
    bad.write_text(
        "# B\n[ok](a.md#two-words-here)\n[dup](a.md#two-words-here-1)\n"
        "[gone](c.md)\n[nohead](a.md#nope)\n```\n[in code](x.md)\n```\n[self](#b)\n"
    )
    problems = build.check([good, bad])
    assert [(p.line, p.message) for p in problems] == [
        (4, "link to missing file 'c.md'"),
        (5, "no heading #nope in a.md"),
    ]


def test_inline_rendering(build: ModuleType) -> None:
    """Code spans are escaped, page links become .html, repository files are reached from _build."""
    html = build.inline(
        "[`x<y`](cli.md#check), **b**, *e*, [f](../README.md), [w](https://a.b/c.md)"
    )
    assert '<a href="cli.html#check"><code>x&lt;y</code></a>' in html
    assert "<strong>b</strong>" in html
    assert "<em>e</em>" in html
    assert '<a href="../../README.md">f</a>' in html
    assert '<a href="https://a.b/c.md">w</a>' in html


def test_render_blocks(build: ModuleType) -> None:
    """Headings get GitHub anchors; lists nest one level; tables and fenced code render."""
    page = build.render(
        "## A `b` c\n\n1. one\n   cont\n   * sub\n2. two\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n"
        "```python\nif a < b: pass\n```\n"
    )
    assert '<h2 id="a-b-c">A <code>b</code> c</h2>' in page
    assert "<ol><li>one cont<ul><li>sub</li></ul></li><li>two</li></ol>" in page
    assert "<th>x</th>" in page
    assert "<td>2</td>" in page
    assert '<pre><code class="language-python">if a &lt; b: pass</code></pre>' in page
