"""The Python API in a few calls: scan, patch, save and load a patched checkpoint.

model, report = surgeon.patch(model, "spd", example_input=torch.randn(1, 3, 224, 224))
surgeon.save("out/", model, report, spec=...)   # or use `surgeon patch ... --out out/`
model = surgeon.load("out/")
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon import __version__
from surgeon.checkpoint import (
    check_state_dict_fits,
    read_checkpoint,
    require_trusted_import,
    write_checkpoint,
)
from surgeon.errors import CheckpointError
from surgeon.layers.spd import SpaceToDepthConv, phase_major_kernel
from surgeon.models import LoadedModel, ModelSpec, build_model, example_inputs, load_state
from surgeon.patch import PatchReport, patch
from surgeon.policy_loader import policy_from_dict
from surgeon.report import patch_markdown
from surgeon.rewrites import action_schemas, load_plugin

if TYPE_CHECKING:  # surgeon.fold is imported by `load` only for folded checkpoints
    from surgeon.fold import FoldRecord

__all__ = ["SPD_CHANNEL_ORDER", "build_manifest", "load", "save", "versions"]

SPD_CHANNEL_ORDER = "phase-major where groups=1, else channel-major"
"""What surgery.json's `spd_channel_order` says: the input-channel order of SPD-Conv kernels."""


def versions() -> dict[str, str]:
    """Versions that decide whether a checkpoint replays identically."""
    import torchvision

    return {
        "surgeon": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        # from the installed metadata: importing timm costs ~0.5-1 s a torchvision model never needs
        "timm": importlib.metadata.version("timm"),
        "python": platform.python_version(),
    }


def build_manifest(
    loaded: LoadedModel,
    report: PatchReport,
    policy: dict[str, Any],
    *,
    seed: int = 0,
    plugins: Sequence[str] = (),
    created: str | None = None,
    fold: FoldRecord | None = None,
) -> dict[str, Any]:
    """The surgery.json content: enough to rebuild the patched model without unpickling."""
    manifest: dict[str, Any] = {
        "model": {
            **loaded.spec.to_dict(),
            "input_size": list(loaded.input_size),
            "task": loaded.task,
        },
        "policy": policy,
        "plugins": list(plugins),
        "seed": seed,
        "sites": [s.to_dict() for s in report.sites],
        "decisions": [d.to_dict() for d in report.decisions],
        "edits": [
            {
                "site": r.site,
                "status": r.status,
                "replacement": r.replacement,
                "transfer": r.transfer,
            }
            for r in report.rows
        ],
        "summary": {
            "params_before": report.params_before,
            "params_after": report.params_after,
            "macs_before": report.macs_before,
            "macs_after": report.macs_after,
            "output_max_abs_diff": report.output_max_abs_diff,
            "output_rel_diff": report.output_rel_diff,
            "keys_added": list(report.keys_added),
            "keys_removed": list(report.keys_removed),
            "keys_renamed": [list(p) for p in report.keys_renamed],
        },
        "versions": versions(),
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # SPD-Conv kernels of ungrouped convs take input channels phase-major (phase * C + c);
        # checkpoints without this field hold them channel-major, and `load` converts them
        "spd_channel_order": SPD_CHANNEL_ORDER,
    }
    if fold is not None:  # replayed by `load` with the same form per layer
        manifest["fold"] = fold.to_dict()
    return manifest


def save(
    directory: str | Path,
    model: nn.Module,
    loaded: LoadedModel,
    report: PatchReport,
    policy: dict[str, Any],
    *,
    seed: int = 0,
    plugins: Sequence[str] = (),
    force: bool = False,
    created: str | None = None,
    fold: FoldRecord | None = None,
) -> Path:
    """Write model.safetensors, surgery.json and report.md atomically into `directory`.

    `fold` is the record of `surgeon.fold.fold` when `model` was folded after patching: the
    manifest keeps it, so `load` folds the same layers before loading the weights."""
    manifest = build_manifest(
        loaded, report, policy, seed=seed, plugins=plugins, created=created, fold=fold
    )
    return write_checkpoint(
        Path(directory),
        model.state_dict(),
        manifest,
        {"report.md": patch_markdown(report)},
        force=force,
    )


def load(
    directory: str | Path,
    *,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> nn.Module:
    """Rebuild the patched model of a checkpoint: build the source model, replay the surgery,
    then load the weights with strict=True. Nothing is unpickled; a model from a user factory
    (`pkg.mod:fn`) is only imported when that spec is passed in `trust_import`, and plugins
    only when named in `plugins`."""
    manifest, state = read_checkpoint(Path(directory))
    require_trusted_import(manifest, trust_import)
    for plugin in manifest.get("plugins", []):
        if plugin not in plugins:
            raise CheckpointError(
                f"{directory} was patched with plugin {plugin!r}; pass --plugin {plugin} "
                "to allow importing it"
            )
        load_plugin(plugin)
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
            f"(recorded with {manifest['versions']}, running {versions()}); "
            "use the recorded versions or re-create the checkpoint"
        )
    if "fold" in manifest:
        from surgeon.fold import fold as fold_model

        model, _ = fold_model(model, example, forms=_fold_forms(manifest["fold"], directory))
    if manifest.get("spd_channel_order") != SPD_CHANNEL_ORDER:
        state = _phase_major_spd(model, state)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict_fits(expected, state, source=Path(directory) / "model.safetensors")
    load_state(model, state)
    model.eval()
    return model


def _phase_major_spd(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before SPD-Conv of ungrouped convs went phase-major, made phase-major."""
    state = dict(state)
    for name, module in model.named_modules():
        key = f"{name}.conv.weight" if name else "conv.weight"
        if isinstance(module, SpaceToDepthConv) and module.phase_major and key in state:
            state[key] = phase_major_kernel(state[key], module.block)
    return state


def _fold_forms(record: Any, directory: str | Path) -> dict[str, str]:
    """{layer: form} from a manifest's fold record, or a CheckpointError naming what is wrong."""
    layers = record.get("layers") if isinstance(record, dict) else None
    if not isinstance(layers, list) or not all(
        isinstance(layer, dict)
        and isinstance(layer.get("name"), str)
        and layer.get("form") in ("folded", "kept")
        for layer in layers
    ):
        raise CheckpointError(
            f"{directory}/surgery.json: field 'fold.layers' must be a list of "
            "{name, form: folded|kept} objects; re-create the checkpoint"
        )
    return {layer["name"]: layer["form"] for layer in layers}
