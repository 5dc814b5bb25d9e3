"""Provenance for every result record: which code, libraries, machine and command produced it.

    from provenance import provenance, staleness
    record = {"provenance": provenance(sys.argv, policies=policy_files), ...}
    staleness(record["provenance"])   # None while current, else why the record is stale

A record is current while the code that decides results (`surgeon/` and `configs/`) is the
same as when it ran: the last commit that changed them was the same then as now, and those
paths had no uncommitted change at the time. Pages generated from records mark the others
stale instead of passing them off as current. Scripts import this module directly (scripts/
is on their `sys.path`); it needs git only to fill in the commit fields.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["CODE_PATHS", "ROOT", "code_change", "git", "provenance", "staleness"]

ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = ("surgeon", "configs")
"""The paths whose changes can change a result."""

_LIBRARIES = ("torch", "torchvision", "timm", "onnxruntime", "numpy")


def git(*args: str, root: Path = ROOT) -> str | None:
    """Output of a git command in `root`, or None without git or outside a repository."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.rstrip()


def code_change(root: Path = ROOT) -> str | None:
    """The last commit that changed surgeon/ or configs/ (None without git history)."""
    return git("log", "-1", "--format=%H", "--", *CODE_PATHS, root=root) or None


def _dirty_paths(root: Path) -> list[str]:
    status = git("status", "--porcelain", "--", *CODE_PATHS, root=root)
    return sorted(line[3:] for line in (status or "").splitlines() if line.strip())


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("surgeon", *_LIBRARIES):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(
    command: Sequence[str] | str,
    *,
    policies: Iterable[Path] = (),
    root: Path = ROOT,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance fields of one record: commit and dirty state of the code paths, library
    versions, machine, the command line and the sha256 of every policy file it used."""
    text = command if isinstance(command, str) else shlex.join(command)
    dirty = _dirty_paths(root)
    return {
        "commit": git("rev-parse", "HEAD", root=root),
        "code_commit": code_change(root),
        "dirty": bool(dirty),
        "dirty_paths": dirty,
        "versions": _versions(),
        "machine": _machine(),
        "command": text,
        "policies": {Path(p).stem: _sha256(Path(p)) for p in sorted(map(Path, policies))},
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dict(extra or {}),
    }


def staleness(
    record: Mapping[str, Any], *, current: str | None = None, root: Path = ROOT
) -> str | None:
    """Why a record's results may not hold for the code now, or None while they do.

    `current` is the last commit that changed the code paths (`code_change()` by default). A
    record is current when it ran, with no uncommitted change to those paths, on a commit whose
    last code change is `current`. The answer needs no git history once `current` is given, so
    a page rendered from records is the same in any checkout, shallow or not."""
    commit = record.get("commit")
    if not commit:
        return "no commit recorded"
    if record.get("dirty"):
        return (
            f"ran with uncommitted changes to {', '.join(record.get('dirty_paths') or CODE_PATHS)}"
        )
    latest = current or code_change(root)
    if latest is None:
        return "no git history to compare with"
    if record.get("code_commit") == latest:
        return None
    code = str(record.get("code_commit") or "")[:10] or "unknown"
    return f"ran on {commit[:10]} (code of {code}); the code last changed in {latest[:10]}"
