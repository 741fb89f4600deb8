"""The report as a person sees it: headless Chromium opens the file, builds the page, paints it.

Checks on the DOM Chromium built (not on our own string): the heatmaps are SVG with one panel per
pair of dimensions, the tables have their rows, hostile model text stayed text; and the screenshot
is not blank. tests/acceptance/test_report_of_a_sweep.py does the same on a report made from a real sweep.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from producer.report import build_html
from tests.chromium import dump_dom, screenshot
from tests.report_data import HOSTILE, report_data

pytestmark = pytest.mark.timeout(400)


class Dom(HTMLParser):
    """Element counts inside elements with an id (ids nest: the innermost open one counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.inside: dict[str, dict[str, int]] = {}
        self.tags: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for _, ident in self.stack:
            if ident:
                counts = self.inside.setdefault(ident, {})
                counts[tag] = counts.get(tag, 0) + 1
        ident = dict(attrs).get("id")
        if ident:
            self.inside.setdefault(ident, {})
        if tag not in ("meta", "br", "img", "input", "link", "hr") and not tag.endswith("/"):
            self.stack.append((tag, ident))

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for _, ident in self.stack:
            if ident:
                counts = self.inside.setdefault(ident, {})
                counts[tag] = counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        self.text.append(data)


def rendered(tmp_path: Path, data: dict) -> tuple[Dom, str]:
    page = tmp_path / "report.html"
    page.write_text(build_html(data), encoding="utf-8")
    dom_text = dump_dom(page, tmp_path / "profile")
    dom = Dom()
    dom.feed(dom_text)
    return dom, dom_text


def test_chromium_shows_heatmaps_and_tables(tmp_path):
    dom, dom_text = rendered(tmp_path, report_data())
    for heatmap in ("heatmap-win-rate", "heatmap-check-within_max_words", "heatmap-coverage"):
        inside = dom.inside[heatmap]
        assert inside.get("svg") == 1, (heatmap, inside)
        assert inside.get("image", 0) + inside.get("path", 0) > 0, (heatmap, inside)
    # 3 dimensions: a panel for each pair (age x gender, age x power, gender x power).
    assert dom_text.count('id="win-panel-') == 3
    assert dom.inside["coverage"]["tr"] == 1 + 98        # header + the 7 x 2 x 7 cells
    assert dom.inside["eval-cells"]["tr"] == 1 + 98 + 2  # + the free inputs
    assert dom.inside["loss-curves"].get("svg") == 1 and dom.inside["length-histogram"].get("svg") == 1
    assert {"summary", "eval-overall", "samples", "finetune-job", "duplicates", "refusals"} <= set(dom.inside)
    # Untrusted model text is text in the browser too: no element came of it.
    assert "script" not in dom.tags
    assert HOSTILE in "".join(dom.text)


def test_chromium_without_eval_or_finetune_says_so(tmp_path):
    dom, dom_text = rendered(tmp_path, report_data(evaluation=False, job=False))
    assert "no-eval" in dom.inside and "no-finetune" in dom.inside
    assert "no evaluation yet: run python -m producer eval superhero" in dom_text
    assert dom.inside["heatmap-coverage"].get("svg") == 1


def test_chromium_paints_the_report(tmp_path):
    from matplotlib.image import imread

    page = tmp_path / "report.html"
    page.write_text(build_html(report_data()), encoding="utf-8")
    png = screenshot(page, tmp_path / "report.png", tmp_path / "profile")
    pixels = imread(png)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1000
    # Not a blank page: the heatmaps' colours are there (a red-yellow-green spread, not greys only).
    rgb = pixels[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    assert coloured.mean() > 0.01
