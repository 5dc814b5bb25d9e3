"""The HTML patch report is one self-contained page with the diff table and the depth charts."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import torch

from surgeon.models import load_model
from surgeon.patch import PatchReport, patch
from surgeon.report_html import patch_html


@pytest.fixture(scope="module")
def spd_report() -> PatchReport:
    model = load_model("resnet18").model
    example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _, report = patch(model, "spd", example, model_name="torchvision:resnet18")
    return report


class _Tags(HTMLParser):
    """Every start tag with its attributes, and whether end tags balance for svg and table."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.depth = {"svg": 0, "table": 0}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in self.depth:
            self.depth[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.depth:
            self.depth[tag] -= 1


def test_page_is_self_contained(spd_report: PatchReport) -> None:
    page = patch_html(spd_report)
    assert not re.search(r"https?://", page), "the page references an external resource"
    parser = _Tags()
    parser.feed(page)
    names = [tag for tag, _ in parser.tags]
    assert "script" not in names and "link" not in names and "img" not in names
    for tag, attrs in parser.tags:
        for key in ("src", "href"):
            assert attrs.get(key) is None, f"<{tag} {key}=...> loads something"
    assert parser.depth == {"svg": 0, "table": 0}, "unbalanced <svg> or <table>"


def test_page_names_every_site_and_has_charts(spd_report: PatchReport) -> None:
    page = patch_html(spd_report)
    for row in spd_report.rows:
        assert f"<td>{row.site}</td>" in page, f"site {row.site} missing from the table"
    assert page.count("<svg") == 3, "expected the spatial, channel and MAC charts"
    assert "spatial size by depth" in page and "channels by depth" in page
    # the totals say what changed
    assert (
        f"{sum(r.status == 'patched' for r in spd_report.rows)} of {len(spd_report.rows)}" in page
    )


def test_spd_sites_show_the_space_to_depth_channels(spd_report: PatchReport) -> None:
    page = patch_html(spd_report)
    # layer2.0.conv1: 64 channels at 16×16 in, stride 2: space-to-depth makes 256 channels
    assert "layer2.0.conv1: channels 256 inside the patched site, 128 at its output" in page


def test_antialias_sites_show_where_the_work_now_happens() -> None:
    model = load_model("resnet18").model
    example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _, report = patch(model, "antialias", example)
    page = patch_html(report)
    # layer2.0.conv1 now runs at stride 1 on the 16×16 map, then blurs down to 8×8
    assert "layer2.0.conv1: spatial 16 inside the patched site, 8 at its output" in page


def test_names_and_notes_are_escaped(spd_report: PatchReport) -> None:
    from dataclasses import replace

    hostile = replace(spd_report, model="<script>x</script>", notes=("a < b & c",))
    page = patch_html(hostile)
    assert "<script>" not in page
    assert "a &lt; b &amp; c" in page
