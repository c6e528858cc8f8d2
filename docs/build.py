"""Build the documentation: check every link and anchor, then render the pages to HTML.

    python docs/build.py              # check, then write docs/_build/*.html
    python docs/build.py --check      # check only (what the test suite runs)

Dependency-free on purpose (standard library only): the docs are a handful
of Markdown pages, and what matters most is that they never link to a page
or a heading that does not exist — which this script checks and reports as
``file:line: message``, exiting 1. The renderer understands the Markdown the
pages use (headings, paragraphs, lists, fenced code, tables, emphasis,
inline code, links); ``.md`` links become ``.html`` links, and every page
gets a navigation bar in the order of ``NAV``. Pages not in ``NAV`` are
appended after it, so a new page is never left out.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

#: Navigation order; pages missing from the folder are skipped.
NAV = [
    ("index.md", "Home"),
    ("getting-started.md", "Getting started"),
    ("concepts.md", "Concepts"),
    ("fairness.md", "Fairness"),
    ("failure-modes.md", "Failure modes"),
    ("deployment.md", "Deployment"),
    ("cli.md", "Command line"),
    ("simulate.md", "Simulation"),
    ("design.md", "Design notes"),
    ("benchmarks.md", "Benchmarks"),
]

_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass
class Problem:
    """A broken link: where it is and what is wrong."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        shown = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{shown}:{self.line}: {self.message}"


def slug(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"[*_]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with their numbers."""
    out = []
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page (duplicates get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def pages() -> list[Path]:
    """Every page, in navigation order, then any page NAV does not name."""
    named = [DOCS / name for name, _ in NAV if (DOCS / name).exists()]
    rest = sorted(p for p in DOCS.glob("*.md") if p not in named)
    return named + rest


def check(paths: list[Path]) -> list[Problem]:
    """Broken relative links and anchors in ``paths``."""
    texts = {p: p.read_text(encoding="utf-8") for p in paths}
    known = {p.resolve(): anchors(t) for p, t in texts.items()}
    problems = []
    for path, text in texts.items():
        for number, line in prose_lines(text):
            stripped = re.sub(r"`[^`]*`", "", line)
            for _, target in _LINK.findall(stripped):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path.resolve()
                if not dest.exists():
                    problems.append(Problem(path, number, f"link to missing file {file_part!r}"))
                    continue
                if anchor:
                    if dest.suffix != ".md":
                        continue
                    found = known.get(dest)
                    if found is None:
                        found = anchors(dest.read_text(encoding="utf-8"))
                    if anchor not in found:
                        name = file_part or path.name
                        problems.append(Problem(path, number, f"no heading #{anchor} in {name}"))
    return problems


# -- rendering --------------------------------------------------------------------


def _href(target: str) -> str:
    """Where a link points in the built site: pages become .html, repository files stay."""
    file_part, sep, anchor = target.partition("#")
    if not file_part or re.match(r"^[a-z][a-z0-9+.-]*:", file_part):
        return target  # an anchor on this page, or http:, https:, mailto:
    if file_part.endswith(".md") and "/" not in file_part:
        return file_part[:-3] + ".html" + sep + anchor
    return "../" + target  # a file of the repository, seen from docs/_build/


def inline(text: str) -> str:
    """Inline Markdown to HTML: code, links, bold, italics; everything else escaped."""
    codes: list[str] = []

    def stash(match: re.Match[str]) -> str:
        codes.append(f"<code>{html.escape(match.group(1))}</code>")
        return f"\x00{len(codes) - 1}\x00"

    text = re.sub(r"`([^`]*)`", stash, text)
    text = html.escape(text, quote=False)
    text = _LINK.sub(lambda m: f'<a href="{html.escape(_href(m.group(2)))}">{m.group(1)}</a>', text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], text)


def _table(rows: list[str]) -> str:
    def cells(row: str) -> list[str]:
        return [c.strip() for c in row.strip().strip("|").split("|")]

    head = "".join(f"<th>{inline(c)}</th>" for c in cells(rows[0]))
    body = "".join(
        "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in cells(r)) + "</tr>" for r in rows[2:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(text: str) -> str:
    """A page's Markdown as HTML (the subset the docs use)."""
    lines = text.splitlines()
    out: list[str] = []
    paragraph: list[str] = []
    items: list[list[Any]] = []  # [text, nested list tag, nested items]
    list_tag = ""
    seen: dict[str, int] = {}
    i = 0

    def flush() -> None:
        nonlocal list_tag
        if paragraph:
            out.append(f"<p>{inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if items:
            rendered = []
            for text, sub_tag, sub_items in items:
                inner = "".join(f"<li>{inline(x)}</li>" for x in sub_items)
                nested = f"<{sub_tag}>{inner}</{sub_tag}>" if sub_items else ""
                rendered.append(f"<li>{inline(text)}{nested}</li>")
            out.append(f"<{list_tag}>{''.join(rendered)}</{list_tag}>")
            items.clear()
            list_tag = ""

    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            language = line.strip()[3:].strip()
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence.group(1)):
                block.append(lines[i])
                i += 1
            cls = f' class="language-{html.escape(language)}"' if language else ""
            out.append(f"<pre><code{cls}>{html.escape(chr(10).join(block))}</code></pre>")
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            level = len(heading.group(1))
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchor = base if count == 0 else f"{base}-{count}"
            out.append(f'<h{level} id="{anchor}">{inline(heading.group(2))}</h{level}>')
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and "---" in lines[i + 1]:
            flush()
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(lines[i])
                i += 1
            out.append(_table(rows))
            continue
        elif re.match(r"^\s*([*-]|\d+\.)\s+", line):
            tag = "ol" if re.match(r"^\s*\d+\.", line) else "ul"
            text = re.sub(r"^\s*([*-]|\d+\.)\s+", "", line)
            if items and line.startswith("  "):  # one level of nesting under the last item
                items[-1][1] = tag
                items[-1][2].append(text)
            else:
                if paragraph or (items and tag != list_tag):
                    flush()
                list_tag = tag
                items.append([text, "", []])
        elif line.startswith(">"):
            flush()
            out.append(f"<blockquote>{inline(line.lstrip('> '))}</blockquote>")
        elif not line.strip():
            flush()
        elif items and line.startswith(" "):  # continuation of the last (sub-)item
            if items[-1][2]:
                items[-1][2][-1] += " " + line.strip()
            else:
                items[-1][0] += " " + line.strip()
        else:
            paragraph.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


_STYLE = """
body { font: 16px/1.55 system-ui, sans-serif; max-width: 50em; margin: 0 auto; padding: 1em 2em;
       color: #1d1d1f; }
nav { border-bottom: 1px solid #ddd; padding-bottom: .6em; margin-bottom: 1.5em; font-size: .9em; }
nav a { margin-right: .9em; }
nav a.here { font-weight: bold; text-decoration: none; color: inherit; }
pre { background: #f5f5f7; padding: .8em 1em; overflow-x: auto; font-size: .85em; }
code { font-family: ui-monospace, monospace; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
"""


def page_html(path: Path, nav: list[Path]) -> str:
    """A complete HTML document for one page."""
    text = path.read_text(encoding="utf-8")
    titles = dict(NAV)
    links = []
    for other in nav:
        label = titles.get(other.name, other.stem.replace("-", " ").capitalize())
        here = ' class="here"' if other == path else ""
        links.append(f'<a href="{other.stem}.html"{here}>{html.escape(label)}</a>')
    first = next(
        (m.group(2) for _, ln in prose_lines(text) if (m := _HEADING.match(ln))), path.stem
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(first)} — ratequota</title><style>{_STYLE}</style></head>\n"
        f"<body><nav>{''.join(links)}</nav>\n<main>\n{render(text)}\n</main></body></html>\n"
    )


def write_site(nav: list[Path], out: Path) -> None:
    """Write one HTML file per page into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for path in nav:
        (out / f"{path.stem}.html").write_text(page_html(path, nav), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Check the docs; unless ``--check``, render them to ``--out`` (docs/_build)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check links only, write nothing")
    parser.add_argument("--out", type=Path, default=DOCS / "_build", help="output folder")
    args = parser.parse_args(argv)
    nav = pages()
    problems = check(nav)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} broken links", file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(nav)} pages, every link and anchor resolves")
        return 0
    write_site(nav, args.out)
    print(f"{len(nav)} pages checked and written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
