"""Rendering: scan tables and patch diff reports as rich tables, JSON and Markdown.

Renderers take plain records (ScanResult, PatchReport) and never reach back into the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from surgeon.patch import PatchReport, SiteRow
from surgeon.scan import ScanResult
from surgeon.sites import Site

__all__ = [
    "check_report_path",
    "format_count",
    "patch_json",
    "patch_markdown",
    "render_patch",
    "render_scan",
    "scan_json",
    "shape_text",
    "site_params_text",
    "write_report",
]


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


# ---------------------------------------------------------------------------------------------
# Patch reports
# ---------------------------------------------------------------------------------------------


def _diff_text(row: SiteRow) -> str:
    if row.transfer is None:
        return ""
    if row.rel_diff is None:
        return row.transfer
    return f"{row.transfer} ({row.rel_diff:.1e})"


def _status_text(row: SiteRow) -> str:
    if row.status == "patched":
        return row.replacement
    if row.status == "skipped":
        return f"skipped: {row.note}"
    if row.status == "kept":
        return "kept"
    if row.status == "not-a-site":
        return f"left alone ({row.role.replace('_', ' ')})"
    return "no rule matched"


def _shape_pair(row: SiteRow) -> str:
    after = row.out_shape_after
    same = after is None or after == row.out_shape_before
    out = (
        shape_text(row.out_shape_before)
        if same
        else f"{shape_text(row.out_shape_before)}⇒{shape_text(after or ())}"
    )
    return f"{shape_text(row.in_shape)} → {out}"


def _pair(before: int, after: int) -> str:
    return (
        format_count(before)
        if before == after
        else f"{format_count(before)} → {format_count(after)}"
    )


def _patch_rows(report: PatchReport) -> list[list[str]]:
    return [
        [
            row.site,
            row.op,
            _status_text(row),
            _shape_pair(row),
            _pair(row.params_before, row.params_after),
            _pair(row.macs_before, row.macs_after),
            row.rule or "—",
            _diff_text(row),
        ]
        for row in report.rows
    ]


_PATCH_COLUMNS = ("site", "op", "replacement", "in → out", "params", "MACs", "rule", "transfer")


def _totals_lines(report: PatchReport) -> list[str]:
    lines = [
        f"{report.patched} patched, {report.skipped} skipped, "
        f"{sum(r.status == 'kept' for r in report.rows)} kept, "
        f"{sum(r.status == 'unmatched' for r in report.rows)} unmatched "
        f"of {len(report.rows)} sites",
        f"params {_pair(report.params_before, report.params_after)}"
        f" ({_ratio(report.params_after, report.params_before)}), "
        f"MACs {_pair(report.macs_before, report.macs_after)}"
        f" ({_ratio(report.macs_after, report.macs_before)})",
        f"output vs original: max abs diff {report.output_max_abs_diff:.3g}, "
        f"relative {report.output_rel_diff:.3g}",
        f"state-dict keys: {len(report.keys_added)} added, {len(report.keys_removed)} removed, "
        f"{len(report.keys_renamed)} renamed",
    ]
    return lines


def _ratio(after: int, before: int) -> str:
    return f"×{after / before:.2f}" if before else "—"


def _key_lines(report: PatchReport, limit: int) -> list[str]:
    lines = []
    for label, keys in (("added", report.keys_added), ("removed", report.keys_removed)):
        if keys:
            shown = ", ".join(keys[:limit]) + (
                f", … ({len(keys) - limit} more)" if len(keys) > limit else ""
            )
            lines.append(f"{label}: {shown}")
    if report.keys_renamed:
        pairs = [f"{a} → {b}" for a, b in report.keys_renamed]
        shown = ", ".join(pairs[:limit]) + (
            f", … ({len(pairs) - limit} more)" if len(pairs) > limit else ""
        )
        lines.append(f"renamed: {shown}")
    return lines


def _padding_lines(report: PatchReport, limit: int) -> list[str]:
    """With the policy's `padding: circular`: a count, the layers changed (up to `limit`) and
    every layer kept with its reason."""
    if not report.padding:
        return []
    changed = [c for c in report.padding if c.changed]
    kept = [c for c in report.padding if not c.changed]
    lines = [f"padding: circular at {len(changed)} of {len(report.padding)} padded layers"]
    if changed:
        shown = [f"{c.layer} ({c.before})" for c in changed]
        more = f", … ({len(shown) - limit} more)" if len(shown) > limit else ""
        lines.append(f"circular: {', '.join(shown[:limit])}{more}")
    lines += [f"kept: {c.layer} ({c.before}): {c.reason}" for c in kept]
    return lines


def render_patch(report: PatchReport, console: Console, *, key_limit: int = 6) -> None:
    """The layer-by-layer diff as a rich table, then totals, key changes, the layers whose
    padding changed, notes and warnings."""
    table = Table(title=f"{report.model} · policy {report.policy}", header_style="bold")
    for column in _PATCH_COLUMNS:
        table.add_column(
            column,
            justify="right" if column in ("params", "MACs") else "left",
            overflow="fold",
            no_wrap=column == "site",
        )
    for row, cells in zip(report.rows, _patch_rows(report), strict=True):
        table.add_row(*cells, style=None if row.status == "patched" else "dim")
    console.print(table)
    for line in _totals_lines(report):
        console.print(line, highlight=False)
    for line in _key_lines(report, key_limit):
        console.print(f"  {line}", style="dim", highlight=False)
    for i, line in enumerate(_padding_lines(report, key_limit)):
        console.print(
            line if i == 0 else f"  {line}", style=None if i == 0 else "dim", highlight=False
        )
    for note in report.notes:
        console.print(f"note: {note}", style="yellow", highlight=False)
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow", highlight=False)


def patch_markdown(report: PatchReport) -> str:
    """The same report as Markdown (written beside checkpoints and by `--report FILE.md`)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        f"# surgeon patch: {report.model} with policy `{report.policy}`",
        "",
        f"Example input: {', '.join('×'.join(map(str, s)) for s in report.input_shapes)}",
        "",
        "| " + " | ".join(_PATCH_COLUMNS) + " |",
        "|" + "---|" * len(_PATCH_COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(c) for c in cells) + " |" for cells in _patch_rows(report)]
    lines += ["", *[f"- {line}" for line in _totals_lines(report)]]
    key_lines = _key_lines(report, limit=10_000)
    if key_lines:
        lines += ["", "## State-dict keys", "", *[f"- {line}" for line in key_lines]]
    if report.padding:
        changed = sum(c.changed for c in report.padding)
        lines += [
            "",
            "## Padding",
            "",
            f"Circular padding at {changed} of {len(report.padding)} padded layers.",
            "",
            "| layer | op | before | after |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {cell(c.layer)} | {cell(c.op)} | {cell(c.before)} | "
            f"{cell(c.after if c.changed else f'kept: {c.reason}')} |"
            for c in report.padding
        ]
    if report.notes or report.warnings:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in report.notes] + [f"- warning: {w}" for w in report.warnings]
    lines += ["", "## Decisions", ""]
    lines += [f"- `{row.site}`: {row.reason}" for row in report.rows]
    return "\n".join(lines) + "\n"


def patch_json(report: PatchReport) -> str:
    """The report as stable JSON (fields documented in docs/report.md)."""
    return json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str)


def _renderer(path: Path) -> Callable[[PatchReport], str]:
    from surgeon.errors import OutputError
    from surgeon.report_html import patch_html

    renderers = {".md": patch_markdown, ".json": patch_json, ".html": patch_html}
    render = renderers.get(path.suffix.lower())
    if render is None:
        raise OutputError(f"cannot write a report to {path}: use a .md, .json or .html file name")
    return render


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden file next to `path`, opened for writing, mode 0666 minus the umask: the
    report is read like any other output the user's tools write (mkstemp would make it 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def check_report_path(path: Path) -> None:
    """Fail before any slow work if `write_report` could not write `path`: the suffix must name
    a format, and the temporary file it writes first is created and removed again (with any
    missing parent directory)."""
    from surgeon.errors import OutputError

    _renderer(path)
    if path.is_dir():
        raise OutputError(f"cannot write the report to {path}: it is a directory; pass a file")
    missing = [p for p in path.absolute().parents if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise OutputError(
            f"cannot write the report to {path}: {exc.strerror or exc}; choose another file"
        ) from exc
    finally:
        for parent in missing:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()


def write_report(report: PatchReport, path: Path) -> None:
    """Write the report as Markdown, JSON or HTML (by suffix), atomically."""
    from surgeon.errors import OutputError

    text = _renderer(path)(report)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise OutputError(
            f"cannot write the report to {path}: {exc.strerror or exc}; choose another file"
        ) from exc
