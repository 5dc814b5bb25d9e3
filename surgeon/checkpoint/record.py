"""What a checkpoint records about a surgery: the manifest (format version 2) of a patch.

The manifest names the source model and where its weights came from, then lists every surgery
in `history`, in order: a `patch` entry (the policy, every site and decision, the report's rows
and the edits made) and, after `--fold`, a `fold` entry (its choices and edits). Edits are data:
module paths, registered layer types and constructor arguments (`surgeon.edits.op_to_dict`),
so loading needs neither the tracer nor the policy.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import torch

from surgeon import __version__
from surgeon.edits import EditOp, op_to_dict
from surgeon.errors import CheckpointError
from surgeon.fold import FoldRecord
from surgeon.models import LoadedModel
from surgeon.patch import PatchReport

__all__ = ["build_manifest", "fold_entry", "patch_entry", "record_edits", "versions"]


def versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint (for people: loading needs none)."""
    import torchvision

    return {
        "surgeon": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        # from the installed metadata: importing timm costs ~0.5-1 s a torchvision model never needs
        "timm": importlib.metadata.version("timm"),
        "python": platform.python_version(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_edits(ops: Sequence[EditOp]) -> list[dict[str, Any]]:
    """The edits as JSON data; CheckpointError (one line) when a new module's type is not in
    the layer registry, before anything is written."""
    out = []
    for op in ops:
        try:
            out.append(op_to_dict(op))
        except TypeError as exc:
            where = getattr(op, "path", None) or getattr(op, "owner", "") or "the model"
            raise CheckpointError(
                f"cannot record the edit at {where}: {exc}; a plugin's layer needs "
                "surgeon.layers.register_layer (with a config() method) to be saved"
            ) from exc
    return out


def _finite(value: Any) -> Any:
    """JSON data without NaN or infinity (a measured difference can be either)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def patch_entry(
    report: PatchReport,
    policy: Mapping[str, Any],
    *,
    seed: int = 0,
    plugins: Sequence[str] = (),
    created: str | None = None,
) -> dict[str, Any]:
    """The history entry of one patch: policy, sites, decisions, report rows and edits."""
    return {
        "kind": "patch",
        "created": created or _now(),
        "versions": versions(),
        "policy": dict(policy),
        "plugins": list(plugins),
        "seed": seed,
        "sites": [s.to_dict() for s in report.sites],
        "decisions": [d.to_dict() for d in report.decisions],
        "rows": [_finite(asdict(row)) for row in report.rows],
        "summary": _finite(
            {
                "params_before": report.params_before,
                "params_after": report.params_after,
                "macs_before": report.macs_before,
                "macs_after": report.macs_after,
                "output_max_abs_diff": report.output_max_abs_diff,
                "output_rel_diff": report.output_rel_diff,
                "keys_added": list(report.keys_added),
                "keys_removed": list(report.keys_removed),
                "keys_renamed": [list(p) for p in report.keys_renamed],
                "padding": [asdict(change) for change in report.padding],
            }
        ),
        "edits": record_edits(report.ops),
    }


def fold_entry(record: FoldRecord, *, created: str | None = None) -> dict[str, Any]:
    """The history entry of a fold: per layer the form kept and its timings, and the edits."""
    return {
        "kind": "fold",
        "created": created or _now(),
        "versions": versions(),
        **_finite(record.to_dict()),
        "edits": record_edits(record.ops),
    }


def build_manifest(
    loaded: LoadedModel,
    report: PatchReport,
    policy: Mapping[str, Any],
    *,
    seed: int = 0,
    plugins: Sequence[str] = (),
    created: str | None = None,
    fold: FoldRecord | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The surgery.json content (less what `write_checkpoint` adds: format, version, weights).

    `loaded` is the source model as built (its spec, example input size, task and where its
    weights came from); `history` holds the entries of surgeries made before this one (a
    checkpoint patched again), which are kept in front of this patch's entry."""
    created = created or _now()
    entries = [dict(entry) for entry in history]
    entries.append(patch_entry(report, policy, seed=seed, plugins=plugins, created=created))
    if fold is not None:
        entries.append(fold_entry(fold, created=created))
    return {
        "created": created,
        "model": {
            **loaded.spec.to_dict(),
            "input_size": list(loaded.input_size),
            "task": loaded.task,
            "weights": dict(loaded.weights),
        },
        "history": entries,
    }
