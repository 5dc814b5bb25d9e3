"""Result records on disk, and the provenance part of every page rendered from them.

    from provenance import provenance
    from records import RECORDS, write_json, read_record, commit_table, judged_line
    write_json(RECORDS / "bench" / "latency.json", {"rows": rows, "provenance": provenance(argv)})

A record is one JSON file (benchmarks: one per section, replaced by the next run of that
section; the sweep keeps one JSON line per model in its own file) holding the measurement and
its `provenance` (scripts/provenance.py). Pages are rendered from records alone: each states
the commit it judged staleness against (`judged_line`), shows which commit every record ran
on (`commit_table`) and marks the records that predate the last change to surgeon/ or
configs/, so the same records render to the same page in any checkout.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import CODE_PATHS, ROOT, staleness

__all__ = [
    "RECORDS",
    "commit_table",
    "judged_against",
    "judged_line",
    "read_record",
    "script_command",
    "short",
    "stale_reason",
    "write_json",
]

RECORDS = ROOT / "docs" / "records"
_JUDGED = re.compile(r"Staleness is judged against `([0-9a-f]{7,40}|none)`")


def short(commit: str | None) -> str:
    """A commit as pages show it: its first 10 hex digits, or a dash when none was recorded."""
    return commit[:10] if commit else "—"


def script_command(script: str | Path, argv: Sequence[str] | None = None) -> list[str]:
    """The command a record names: the script's path from the repository root, then its
    arguments (`argv`, or this process's own)."""
    path = Path(script).resolve()
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [str(name), *(sys.argv[1:] if argv is None else argv)]


def write_json(path: Path, data: Any) -> None:
    """Write `data` as sorted, indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict[str, Any] | None:
    """The record in `path`, or None when there is none yet."""
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no record (a JSON object)")
    return data


def stale_reason(prov: Mapping[str, Any] | None, current: str) -> str | None:
    """Why a record with provenance `prov` is stale against the code commit `current`, or None
    while it is current; a record without provenance is stale."""
    if not prov:
        return "no provenance recorded"
    return staleness(prov, current=current)


def judged_line(current: str) -> str:
    """The sentence every page carries: the commit its staleness marks were judged against."""
    paths = " or ".join(f"{p}/" for p in CODE_PATHS)
    return (
        f"Staleness is judged against `{current}`, the last commit that changed {paths} when "
        "this page was rendered: a record is *stale* unless it ran on that code with no "
        "uncommitted change to it."
    )


def judged_against(page: str) -> str | None:
    """The commit a rendered page states it judged staleness against (None: no such line)."""
    found = _JUDGED.search(page)
    return found.group(1) if found else None


def commit_table(
    provs: Iterable[Mapping[str, Any] | None], current: str, *, what: str = "records"
) -> list[str]:
    """Markdown: how many records ran on each commit, with what command and when (the days of
    their `recorded` times), and whether that commit's code is the current one."""
    groups: dict[tuple[str, str, bool, str, str], list[str]] = {}
    for prov in provs:
        prov = prov or {}
        reason = stale_reason(prov, current)
        key = (
            short(prov.get("commit")),
            short(prov.get("code_commit")),
            bool(prov.get("dirty")),
            str(prov.get("command") or "—"),
            "current" if reason is None else f"stale: {reason}",
        )
        groups.setdefault(key, []).append(str(prov.get("recorded") or "")[:10])
    lines = [
        f"| commit | code commit | uncommitted code changes | {what} | when (UTC) | command | "
        "status |",
        "|---|---|---|---:|---|---|---|",
    ]
    for (commit, code, dirty, command, status), days in sorted(groups.items()):
        known = sorted(d for d in days if d)
        when = "—" if not known else known[0]
        if known and known[-1] != known[0]:
            when = f"{known[0]} – {known[-1]}"
        command_cell = f"`{command}`" if command != "—" else command
        lines.append(
            f"| {commit} | {code} | {'yes' if dirty else 'no'} | {len(days)} | {when} | "
            f"{_cell(command_cell)} | {_cell(status)} |"
        )
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
