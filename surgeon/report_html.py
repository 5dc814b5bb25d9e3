"""A patch report as one self-contained HTML page: the diff table and where the network downsamples.

`patch_html(report)` returns the page: inline CSS and inline SVG, no scripts, no external
assets, so it can be mailed, attached to a CI run or opened offline. Three charts plot every site
in the model's order (the x axis is depth: site order, labelled with the cumulative stride),
before the surgery in grey and after it in blue:

- spatial size of each site's output, log scale; a hollow marker shows where a patched site
  now does its work when that differs from its output (anti-aliasing computes at the input
  resolution and only then blurs and subsamples);
- channels of each site's output; a hollow marker shows a patched site's widest inner tensor
  (space-to-depth multiplies channels by stride² before the convolution);
- multiply-accumulates per site.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from surgeon.patch import PatchReport, SiteRow
from surgeon.sites import Site

__all__ = ["patch_html"]

BEFORE = "#9aa0a6"
AFTER = "#1a66d2"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#1f2328}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em}
.sub{color:#59636e;margin-top:0}
.totals{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.totals div{border:1px solid #d1d9e0;border-radius:6px;padding:.4em .8em}
.totals b{display:block;font-size:1.15em}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{border-bottom:1px solid #d1d9e0;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f6f8fa;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.shape{white-space:nowrap;font-family:ui-monospace,monospace}
tr.kept td,tr.unmatched td,tr.not-a-site td{color:#818b98}
tr.skipped td{color:#9a6700}
.chg{color:#1a66d2;font-weight:600}
.chart{margin:.4em 0 1.2em}
.legend span{display:inline-block;margin-right:1.2em}
.sw{display:inline-block;width:1.6em;height:3px;vertical-align:middle;margin-right:.4em}
ul.notes li{margin:.2em 0}
svg text{font:11px system-ui,sans-serif;fill:#59636e}
"""


@dataclass(frozen=True)
class _Point:
    """One site in the charts: output and innermost tensor (channels, spatial), and MACs."""

    label: str
    stage: str
    out_before: tuple[int, int]
    out_after: tuple[int, int]
    inner_after: tuple[int, int] | None
    macs_before: int
    macs_after: int
    patched: bool


def _spatial(shape: Sequence[int], dims: int) -> int:
    """A single size for a shape's spatial part: the geometric mean of its `dims` last sizes."""
    sizes = [s for s in shape[-dims:]] if dims and len(shape) > dims else [1]
    return max(1, round(math.prod(sizes) ** (1 / len(sizes))))


def _channels(shape: Sequence[int], dims: int) -> int:
    return int(shape[-dims - 1]) if len(shape) > dims else 1


def _inner(row: SiteRow, site: Site | None) -> tuple[int, int] | None:
    """(channels, spatial size) of the widest tensor inside a patched site, when that differs
    from its output: known for the built-in `spd`, `haar` (space-to-depth and Haar bands: s^d·C
    channels at the output's size) and `antialias` actions only."""
    if row.status != "patched" or site is None or site.role != "downsample":
        return None
    stride = math.prod(site.stride)
    if row.action in ("spd", "haar"):
        out = row.out_shape_after or row.out_shape_before
        return stride * site.in_channels, _spatial(out, site.dims)
    if row.action == "antialias" and site.op != "avg_pool":  # an average pool is blurred as is
        return site.out_channels, _spatial(site.in_shape, site.dims)
    return None


def _points(report: PatchReport) -> list[_Point]:
    sites = {s.name: s for s in report.sites}
    points = []
    for row in report.rows:
        site = sites.get(row.site)
        dims = site.dims if site else max(1, len(row.out_shape_before) - 2)
        after = row.out_shape_after or row.out_shape_before
        stage = "" if site is None else f"/{site.stage_out}"
        if site is not None and site.role in ("global_pool", "adaptive_pool"):
            stage = "pool"
        points.append(
            _Point(
                label=row.site,
                stage=stage,
                out_before=(
                    _channels(row.out_shape_before, dims),
                    _spatial(row.out_shape_before, dims),
                ),
                out_after=(_channels(after, dims), _spatial(after, dims)),
                inner_after=_inner(row, site),
                macs_before=row.macs_before,
                macs_after=row.macs_after,
                patched=row.status == "patched",
            )
        )
    return points


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if n != int(n) else str(int(n))


class _Axes:
    """Pixel mapping for one chart: x = column index (0 = input), y = log2 or linear value."""

    left, right, top, bottom = 56, 16, 26, 124

    def __init__(self, columns: int, low: float, high: float, *, log: bool, height: int = 300):
        self.columns = columns
        self.width = max(640, self.left + self.right + 26 * columns)
        self.height = height
        self.log = log
        self.low, self.high = self._t(low), self._t(high)
        if self.high <= self.low:
            self.high = self.low + 1
        pad = 0.25 if log else 0.0  # headroom for markers, in log2 units
        self.low, self.high = self.low - pad, self.high + (pad or 0.05 * (self.high - self.low))

    def _t(self, v: float) -> float:
        return math.log2(max(v, 1e-9)) if self.log else v

    def x(self, column: float) -> float:
        span = self.width - self.left - self.right
        return self.left + span * (column + 0.5) / self.columns

    def y(self, value: float) -> float:
        span = self.height - self.top - self.bottom
        return self.top + span * (1 - (self._t(value) - self.low) / (self.high - self.low))

    def ticks(self) -> list[float]:
        if self.log:
            lo, hi = math.floor(self.low), math.ceil(self.high)
            step = max(1, math.ceil((hi - lo) / 8))
            return [2.0**e for e in range(lo, hi + 1, step) if self.low <= e <= self.high]
        raw = (self.high - self.low) / 5
        step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
        for mult in (1, 2, 5, 10):
            if raw <= step * mult:
                step *= mult
                break
        first = math.ceil(self.low / step) * step
        return [first + i * step for i in range(int((self.high - first) / step) + 1)]


def _svg_frame(axes: _Axes, points: Sequence[_Point], title: str) -> list[str]:
    parts = [
        f'<svg role="img" aria-label="{html.escape(title)}" width="{axes.width}" '
        f'height="{axes.height}" viewBox="0 0 {axes.width} {axes.height}">',
        f"<title>{html.escape(title)}</title>",
    ]
    x0, x1 = axes.left, axes.width - axes.right
    for tick in axes.ticks():
        y = axes.y(tick)
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>')
        parts.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    base = axes.height - axes.bottom
    parts.append(f'<line x1="{x0}" x2="{x1}" y1="{base}" y2="{base}" stroke="#d1d9e0"/>')
    labels = [("input", "")] + [(p.label, p.stage) for p in points]
    for i, (label, stage) in enumerate(labels):
        x = axes.x(i)
        short = label if len(label) <= 18 else "…" + label[-17:]
        parts.append(
            f'<text transform="translate({x + 3:.1f},{base + 10}) rotate(-45)" '
            'text-anchor="end">'
            f"<title>{html.escape(label)}</title>{html.escape(short)}</text>"
        )
        if stage:
            parts.append(
                f'<text x="{x:.1f}" y="{axes.top - 8}" text-anchor="middle">'
                f"{html.escape(stage)}</text>"
            )
    return parts


def _series(axes: _Axes, values: Sequence[float], colour: str, dash: str = "") -> list[str]:
    """A step line through (column, value): each site holds its value until the next."""
    path = []
    for i, v in enumerate(values):
        x, y = axes.x(i), axes.y(v)
        if i == 0:
            path.append(f"M{x:.1f},{y:.1f}")
        else:
            path.append(f"H{x:.1f}V{y:.1f}")
    style = f' stroke-dasharray="{dash}"' if dash else ""
    parts = [f'<path d="{"".join(path)}" fill="none" stroke="{colour}" stroke-width="2"{style}/>']
    parts += [
        f'<circle cx="{axes.x(i):.1f}" cy="{axes.y(v):.1f}" r="2.6" fill="{colour}"/>'
        for i, v in enumerate(values)
    ]
    return parts


def _inner_marks(
    axes: _Axes,
    points: Sequence[_Point],
    pick: Callable[[_Point], tuple[int, int] | None],
    out: Callable[[_Point], int],
    what: str,
) -> list[str]:
    parts = []
    for i, p in enumerate(points, start=1):
        inner = pick(p)
        if inner is None:
            continue
        value = inner[0] if what == "channels" else inner[1]
        if value == out(p):
            continue
        x, y, y_out = axes.x(i), axes.y(value), axes.y(out(p))
        tip = f"{p.label}: {what} {value} inside the patched site, {out(p)} at its output"
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y:.1f}" y2="{y_out:.1f}" stroke="{AFTER}" '
            'stroke-dasharray="2 2"/>'
        )
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#fff" stroke="{AFTER}" '
            f'stroke-width="1.6"><title>{html.escape(tip)}</title></circle>'
        )
    return parts


def _line_chart(points: Sequence[_Point], start: tuple[int, int], what: str, title: str) -> str:
    index = 0 if what == "channels" else 1
    before = [start[index]] + [p.out_before[index] for p in points]
    after = [start[index]] + [p.out_after[index] for p in points]
    inner = [p.inner_after[index] for p in points if p.inner_after is not None]
    values = before + after + inner
    axes = _Axes(len(points) + 1, min(values), max(values), log=True)
    parts = _svg_frame(axes, points, title)
    parts += _series(axes, before, BEFORE)
    parts += _series(axes, after, AFTER, dash="" if before != after else "5 3")
    parts += _inner_marks(axes, points, lambda p: p.inner_after, lambda p: p.out_after[index], what)
    parts.append("</svg>")
    return "".join(parts)


def _macs_chart(points: Sequence[_Point], title: str) -> str:
    values = [p.macs_before for p in points] + [p.macs_after for p in points]
    axes = _Axes(len(points) + 1, 0, max([*values, 1]), log=False)
    parts = _svg_frame(axes, points, title)
    width = max(2.0, (axes.x(1) - axes.x(0)) * 0.36)
    base = axes.y(0)
    for i, p in enumerate(points, start=1):
        for value, colour, shift in ((p.macs_before, BEFORE, -width), (p.macs_after, AFTER, 0.0)):
            y = axes.y(value)
            tip = f"{p.label}: {_fmt(value)} MACs {'before' if colour == BEFORE else 'after'}"
            parts.append(
                f'<rect x="{axes.x(i) + shift:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{max(0.0, base - y):.1f}" fill="{colour}"><title>{html.escape(tip)}'
                "</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _e(text: object) -> str:
    return html.escape(str(text))


def _shape(shape: Sequence[int] | None) -> str:
    if not shape:
        return "—"
    return "×".join(str(s) for s in (shape[1:] if len(shape) > 1 else shape))


def _pair(before: int, after: int) -> str:
    if before == after:
        return _e(_fmt(before))
    return f'{_e(_fmt(before))} → <span class="chg">{_e(_fmt(after))}</span>'


def _what(row: SiteRow) -> str:
    if row.status == "patched":
        return f'<span class="chg">{_e(row.replacement)}</span>'
    if row.status == "skipped":
        return f"skipped: {_e(row.note)}"
    if row.status == "not-a-site":
        return f"left alone ({_e(row.role.replace('_', ' '))})"
    return "kept" if row.status == "kept" else "no rule matched"


def _transfer(row: SiteRow) -> str:
    if row.transfer is None:
        return ""
    if row.rel_diff is None:
        return _e(row.transfer)
    return f"{_e(row.transfer)} <small>(rel. diff {row.rel_diff:.1e})</small>"


def _table(report: PatchReport) -> str:
    head = (
        "<tr><th>#</th><th>site</th><th>op</th><th>replacement</th><th>in</th>"
        "<th>out before</th><th>out after</th><th>params</th><th>MACs</th><th>rule</th>"
        "<th>transfer</th></tr>"
    )
    body = []
    for i, row in enumerate(report.rows, start=1):
        after = row.out_shape_after or row.out_shape_before
        out_after = _shape(after)
        if after != row.out_shape_before:
            out_after = f'<span class="chg">{_e(out_after)}</span>'
        body.append(
            f'<tr class="{_e(row.status)}"><td class="num">{i}</td><td>{_e(row.site)}</td>'
            f"<td>{_e(row.op)}</td><td>{_what(row)}</td>"
            f'<td class="shape">{_e(_shape(row.in_shape))}</td>'
            f'<td class="shape">{_e(_shape(row.out_shape_before))}</td>'
            f'<td class="shape">{out_after}</td>'
            f'<td class="num">{_pair(row.params_before, row.params_after)}</td>'
            f'<td class="num">{_pair(row.macs_before, row.macs_after)}</td>'
            f"<td>{_e(row.rule or '—')}</td><td>{_transfer(row)}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _ratio(after: int, before: int) -> str:
    return f"×{after / before:.2f}" if before else "—"


def _totals(report: PatchReport) -> str:
    counts = {s: sum(r.status == s for r in report.rows) for s in ("patched", "skipped", "kept")}
    cells = [
        ("sites patched", f"{counts['patched']} of {len(report.rows)}"),
        ("skipped / kept", f"{counts['skipped']} / {counts['kept']}"),
        (
            "parameters",
            f"{_fmt(report.params_before)} → {_fmt(report.params_after)} "
            f"({_ratio(report.params_after, report.params_before)})",
        ),
        (
            "MACs",
            f"{_fmt(report.macs_before)} → {_fmt(report.macs_after)} "
            f"({_ratio(report.macs_after, report.macs_before)})",
        ),
        ("output vs original", f"max |Δ| {report.output_max_abs_diff:.3g}"),
        (
            "state-dict keys",
            f"+{len(report.keys_added)} −{len(report.keys_removed)} "
            f"renamed {len(report.keys_renamed)}",
        ),
    ]
    return (
        '<div class="totals">'
        + "".join(f"<div>{_e(label)}<b>{_e(value)}</b></div>" for label, value in cells)
        + "</div>"
    )


def _padding(report: PatchReport) -> str:
    """The policy's `padding: circular`: every padded layer, what it pads with now or why not."""
    if not report.padding:
        return ""
    rows = "".join(
        f"<tr><td>{_e(c.layer)}</td><td>{_e(c.op)}</td><td>{_e(c.before)}</td>"
        + (
            f'<td><span class="chg">{_e(c.after)}</span></td></tr>'
            if c.changed
            else f"<td>kept: {_e(c.reason)}</td></tr>"
        )
        for c in report.padding
    )
    changed = sum(c.changed for c in report.padding)
    return (
        f"<h2>Padding</h2><p>circular padding at {changed} of {len(report.padding)} padded "
        "layers</p><table><tr><th>layer</th><th>op</th><th>before</th><th>after</th></tr>"
        f"{rows}</table>"
    )


def _notes(report: PatchReport) -> str:
    items = [f"<li>note: {_e(n)}</li>" for n in report.notes]
    items += [f"<li>warning: {_e(w)}</li>" for w in report.warnings]
    return f'<h2>Notes</h2><ul class="notes">{"".join(items)}</ul>' if items else ""


def patch_html(report: PatchReport) -> str:
    """The patch report as a self-contained HTML page (inline CSS and SVG, no scripts)."""
    title = f"surgeon patch: {report.model} with policy {report.policy}"
    points = _points(report)
    shape = report.input_shapes[0] if report.input_shapes else (1, 1, 1)
    dims = report.sites[0].dims if report.sites else max(1, len(shape) - 2)
    start = (_channels(shape, dims), _spatial(shape, dims))
    legend = (
        '<p class="legend">'
        f'<span><i class="sw" style="background:{BEFORE}"></i>before</span>'
        f'<span><i class="sw" style="background:{AFTER}"></i>after</span>'
        f"<span>○ inside a patched site (hover for sizes)</span></p>"
    )
    charts = ""
    if points:
        charts = (
            "<h2>Where the network downsamples</h2>"
            "<p>Sites in model order; the label above each is the cumulative stride after it. "
            "A dashed blue line means the output is unchanged.</p>"
            + legend
            + '<div class="chart"><b>spatial size of each site\'s output</b><br>'
            + _line_chart(points, start, "spatial", "spatial size by depth")
            + '</div><div class="chart"><b>channels of each site\'s output</b><br>'
            + _line_chart(points, start, "channels", "channels by depth")
            + '</div><div class="chart"><b>MACs per site</b><br>'
            + _macs_chart(points, "MACs per site")
            + "</div>"
        )
    inputs = ", ".join("×".join(map(str, s)) for s in report.input_shapes)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='sub'>example input {_e(inputs)}</p>"
        f"{_totals(report)}{charts}<h2>Sites</h2>{_table(report)}{_padding(report)}"
        f"{_notes(report)}"
        "</body></html>\n"
    )
