"""The simulation's picture without any plotting library (issue 13, item 6).

The README's first command, ``ratequota simulate --duration 10``, must show
its picture on a fresh install, where matplotlib (the ``plot`` extra) is
absent. The SVG is parsed back as XML and checked for what a reader needs:
one line per tenant inside the frame, the capacity, and guarantees that stay
apart when they are equal.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ratequota import cli
from ratequota.sim.svg import Line, Panel, render

SVG = "{http://www.w3.org/2000/svg}"

SCENARIO = """\
[simulation]
pods = 2

[[groups]]
name = "pair"
capacity = 8

[[groups.tenants]]
name = "lender"
guarantee = 4
traffic = { concurrency = 2, units = 1, hold = 0.05 }

[[groups.tenants]]
name = "borrower"
guarantee = 4
traffic = { concurrency = 3, units = 2, hold = 0.05 }
"""


def _coordinates(root: ET.Element) -> list[tuple[float, float]]:
    found = []
    for element in root.iter():
        for attr in ("points",):
            for pair in element.get(attr, "").split():
                x, y = pair.split(",")
                found.append((float(x), float(y)))
        for xa, ya in (("x1", "y1"), ("x2", "y2"), ("x", "y")):
            if element.get(xa) is not None and element.get(ya) is not None:
                found.append((float(element.get(xa, 0)), float(element.get(ya, 0))))
    return found


def test_simulate_draws_an_svg_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With matplotlib missing, the default run writes ratequota-simulation.svg and names it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.chdir(tmp_path)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    code = cli.main(["simulate", "--scenario", str(scenario), "--duration", "1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "picture of units held per tenant over time: ratequota-simulation.svg" in out
    root = ET.parse(tmp_path / "ratequota-simulation.svg").getroot()
    assert root.tag == f"{SVG}svg"
    tenants = [p for p in root.iter(f"{SVG}polyline") if p.get("class") == "tenant"]
    assert sorted(p.findtext(f"{SVG}title") for p in tenants) == ["borrower", "lender"]
    assert all(len(p.get("points", "").split()) >= 5 for p in tenants)
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    assert "capacity 8" in texts
    # Equal guarantees: two labels, two dash patterns.
    assert {"G 4: lender", "G 4: borrower"} <= set(texts)
    dashes = {
        g.get("stroke-dasharray") for g in root.iter(f"{SVG}line") if g.get("class") == "guarantee"
    }
    assert len(dashes) == 2


def test_png_still_needs_matplotlib_and_says_how_to_avoid_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asking for a PNG without matplotlib names the extra and the SVG alternative."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    png = tmp_path / "x.png"
    args = ["simulate", "--scenario", str(scenario), "--duration", "0.5", "--quiet"]
    assert cli.main([*args, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "pip install 'ratequota[plot]'" in out
    assert f"--plot {tmp_path / 'x.svg'}" in out
    assert not png.exists()


def test_render_stays_inside_its_frame_and_escapes_names() -> None:
    """Every coordinate lies in the viewBox, even for values above the drawn range."""
    wild = Line("<a & b>", [0.0, 1.0, 2.0], [0.0, 500.0, -3.0], guarantee=2.0)
    calm = Line("c", [0.0, 1.0, 2.0], [1.0, 1.0, 1.0], guarantee=2.0)
    panel = Panel("group 'x' <y>", 10.0, 2.0, Line("total", [0.0, 2.0], [1.0, 9.0]), [wild, calm])
    text = render([panel, panel], "title & more", "seconds")
    root = ET.fromstring(text)  # escaping: it parses
    _, _, width, height = (float(v) for v in root.get("viewBox", "").split())
    for x, y in _coordinates(root):
        assert 0 <= x <= width
        assert 0 <= y <= height
    assert "<a & b>" in [t.findtext(f"{SVG}title") for t in root.iter(f"{SVG}polyline")]
    assert re.search(r"G 2: c", text)


def test_render_of_an_idle_group() -> None:
    """A panel with no samples still renders a frame and its capacity."""
    panel = Panel("idle", 4.0, 1.0, Line("total", [], []), [])
    root = ET.fromstring(render([panel], "t"))
    assert "capacity 4" in [t.text for t in root.iter(f"{SVG}text")]
