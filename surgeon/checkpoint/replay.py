"""Version-1 checkpoints: rebuilt by replaying their surgery, and upgraded to version 2.

A version-1 surgery.json records the recipe (model, policy, seed, input size), not the edits:
loading one builds the source model, traces it, re-runs the policy and a forward pass at the
recorded input size, and refuses the checkpoint when this surgeon decides differently from the
one that wrote it. `upgrade_checkpoint` replays once and writes the edits that replay made as a
version-2 checkpoint with the same weights, which then loads without any of that.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.checkpoint.files import read_checkpoint, write_checkpoint
from surgeon.checkpoint.manifest import FORMAT_VERSION, require_trusted_import
from surgeon.checkpoint.record import fold_entry, record_edits
from surgeon.edits import EditOp
from surgeon.errors import Argument, CheckpointError
from surgeon.fold import FoldRecord
from surgeon.fold import fold as fold_model
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.transfer import phase_major_kernel
from surgeon.models import ModelSpec, build_model, example_inputs
from surgeon.patch import PatchReport, patch
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import action_schemas, load_plugin

__all__ = ["SPD_CHANNEL_ORDER", "replay", "upgrade_checkpoint"]

SPD_CHANNEL_ORDER = "phase-major where groups=1, else channel-major"
"""What a version-1 surgery.json's `spd_channel_order` says: the input-channel order of SPD-Conv
kernels; version-1 checkpoints without it hold channel-major kernels, converted on load."""


def _require_plugins(directory: Path, recorded: Collection[str], allowed: Collection[str]) -> None:
    for plugin in recorded:
        if plugin not in allowed:
            raise CheckpointError(
                f"{directory} was patched with plugin {plugin!r}; pass ",
                Argument("plugins", plugin, many=True),
                " to allow importing it",
            )
        load_plugin(plugin)


def replay(
    directory: Path,
    manifest: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    *,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> tuple[nn.Module, dict[str, torch.Tensor], PatchReport, FoldRecord | None]:
    """The patched model of a version-1 checkpoint, rebuilt by replaying its surgery, with its
    state dict (SPD kernels converted where the checkpoint predates their order), the replayed
    report and fold record. CheckpointError when the replay decides differently."""
    require_trusted_import(manifest, trust_import)
    _require_plugins(directory, manifest.get("plugins", []), plugins)
    info = manifest["model"]
    spec = ModelSpec(info["source"], info["name"], dict(info["kwargs"]))
    loaded = build_model(spec)
    input_size = tuple(int(s) for s in info["input_size"])
    policy = policy_from_dict(
        manifest["policy"], action_schemas(), source_name=f"{directory}/surgery.json"
    )
    example = example_inputs(loaded.task, input_size)
    model, report = patch(
        loaded.model, policy, example, seed=int(manifest.get("seed", 0)), model_name=spec.text
    )
    recorded = [(e["site"], e["status"]) for e in manifest.get("edits", [])]
    replayed = [(r.site, r.status) for r in report.rows]
    if recorded and recorded != replayed:
        raise CheckpointError(
            f"replaying the surgery recorded in {directory} gave different sites or decisions "
            f"(recorded with {manifest['versions']}); use the recorded versions or re-create "
            "the checkpoint"
        )
    record = None
    if "fold" in manifest:
        forms = {layer["name"]: layer["form"] for layer in manifest["fold"]["layers"]}
        model, record = fold_model(model, example, forms=forms)
    weights = dict(state)
    if manifest.get("spd_channel_order") != SPD_CHANNEL_ORDER:
        weights = _phase_major_spd(model, weights)
    return model, weights, report, record


def _phase_major_spd(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before SPD-Conv of ungrouped convs went phase-major, made phase-major."""
    for name, module in model.named_modules():
        key = f"{name}.conv.weight" if name else "conv.weight"
        if isinstance(module, SpaceToDepthConv) and module.phase_major and key in state:
            state[key] = phase_major_kernel(state[key], module.block)
    return state


def upgrade_checkpoint(
    directory: str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> Path:
    """Rewrite a version-1 checkpoint as version 2 (replaying it once); returns where it went.

    In place by default (the version-1 checkpoint is replaced atomically: asking to upgrade it
    is the permission); with `out`, an existing non-empty `out` is only replaced with `force`,
    as for `surgeon patch --out`. The weights are the same tensors (SPD kernels of checkpoints
    that predate their channel order converted, as loading them does). CheckpointError for a
    checkpoint that already is version 2."""
    source = Path(directory)
    manifest, state = read_checkpoint(source)
    if manifest["format_version"] >= FORMAT_VERSION:
        raise CheckpointError(
            f"{source} is already a version-{manifest['format_version']} checkpoint; "
            "nothing to upgrade"
        )
    model, weights, report, record = replay(
        source, manifest, state, trust_import=trust_import, plugins=plugins
    )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in weights.items()}:
        raise CheckpointError(
            f"replaying {source} gave a model whose state dict does not match its weights; "
            "use the recorded versions to upgrade it"
        )
    upgraded = _upgraded_manifest(manifest, report.ops, record)
    target = Path(out) if out is not None else source
    extra = {}
    report_md = source / "report.md"
    if report_md.is_file():
        extra["report.md"] = report_md.read_text(encoding="utf-8")
    return write_checkpoint(target, weights, upgraded, extra, force=force or out is None)


def _upgraded_manifest(
    v1: Mapping[str, Any], ops: tuple[EditOp, ...], record: FoldRecord | None
) -> dict[str, Any]:
    """The version-2 manifest of a replayed version-1 checkpoint: the same recipe fields in a
    `patch` entry, plus the edits the replay made (the source weights were not recorded)."""
    info = v1["model"]
    entry: dict[str, Any] = {
        "kind": "patch",
        "created": v1["created"],
        "versions": dict(v1["versions"]),
        "policy": dict(v1["policy"]),
        "plugins": list(v1.get("plugins", [])),
        "seed": int(v1.get("seed", 0)),
        "sites": list(v1["sites"]),
        "decisions": list(v1["decisions"]),
        "rows": list(v1.get("edits", [])),
        "summary": dict(v1.get("summary", {})),
        "edits": record_edits(ops),
    }
    history = [entry]
    if record is not None:
        history.append(fold_entry(record, created=v1["created"]))
    return {
        "created": v1["created"],
        "model": {
            "spec": info["spec"],
            "source": info["source"],
            "name": info["name"],
            "kwargs": dict(info["kwargs"]),
            "input_size": list(info["input_size"]),
            "task": info.get("task", "classification"),
            "weights": {"kind": "unrecorded"},
        },
        "history": history,
        "upgraded_from": {"format_version": v1["format_version"]},
    }
