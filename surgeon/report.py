"""Rendering: scan tables and patch diff reports as rich tables, JSON and Markdown.

Renderers take plain records (ScanResult, PatchReport) and never reach back into the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from surgeon.scan import ScanResult
from surgeon.sites import Site

__all__ = ["format_count", "render_scan", "scan_json", "shape_text", "site_params_text"]


def format_count(n: int) -> str:
    """Human-readable count: 1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def shape_text(shape: Sequence[int]) -> str:
    """`(1, 64, 56, 56)` -> `64×56×56` (batch dropped)."""
    return "×".join(str(s) for s in shape[1:]) if len(shape) > 1 else "×".join(map(str, shape))


def _tuple_text(values: Sequence[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "×".join(map(str, values))


def site_params_text(site: Site) -> str:
    """Kernel/stride/padding in one compact cell, e.g. `k3 s2 p1 g32`."""
    pad = site.padding if isinstance(site.padding, str) else _tuple_text(site.padding)
    parts = [f"k{_tuple_text(site.kernel)}", f"s{_tuple_text(site.stride)}", f"p{pad}"]
    if any(d > 1 for d in site.dilation):
        parts.append(f"d{_tuple_text(site.dilation)}")
    if site.groups > 1:
        parts.append("dw" if site.is_depthwise else f"g{site.groups}")
    if site.ceil_mode:
        parts.append("ceil")
    return " ".join(parts)


def _op_text(site: Site) -> str:
    op = f"{site.type_name}" if not site.functional else f"F.{site.type_name}"
    return op if site.role == "downsample" else f"{op} [{site.role.replace('_', ' ')}]"


def render_scan(result: ScanResult, console: Console, title: str = "") -> None:
    """The scan as a rich table plus a one-line summary."""
    table = Table(title=title or None, show_lines=False, header_style="bold")
    for column, justify in (
        ("site", "left"),
        ("op", "left"),
        ("k/s/p", "left"),
        ("in → out", "left"),
        ("stage", "right"),
        ("MACs", "right"),
        ("found by", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for site in result.sites:
        table.add_row(
            site.name,
            _op_text(site),
            site_params_text(site),
            f"{shape_text(site.in_shape)} → {shape_text(site.out_shape)}",
            f"{site.stage_in}→{'·' if site.role == 'global_pool' else site.stage_out}",
            format_count(site.macs),
            site.found_by,
        )
    console.print(table)
    console.print(result.summary())
    for path, method, reason in result.failures:
        console.print(f"  {method} failed on {path or '<model>'}: {reason}", style="dim")


def scan_json(result: ScanResult, **extra: Any) -> str:
    """The scan as stable JSON (same rows as the table)."""
    return json.dumps({**extra, **result.to_dict()}, indent=2, sort_keys=True)
