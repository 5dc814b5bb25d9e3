"""The Python API in a few calls: scan, patch, save, load and upgrade a patched checkpoint,
and build the original it was patched from.

model, report = surgeon.patch(model, "spd", example_input=torch.randn(1, 3, 224, 224))
surgeon.save("out/", model, loaded, report, policy)   # or `surgeon patch ... --out out/`
model = surgeon.load("out/")
original = surgeon.load_original("out/").model   # the unpatched model, with the same weights
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from surgeon.checkpoint.files import write_checkpoint
from surgeon.checkpoint.record import build_manifest
from surgeon.checkpoint.replay import upgrade_checkpoint
from surgeon.checkpoint.resolve import load_original
from surgeon.checkpoint.restore import load_checkpoint
from surgeon.fold import FoldRecord
from surgeon.models import LoadedModel
from surgeon.patch import PatchReport, resolve_policy
from surgeon.policy import Policy
from surgeon.report import patch_markdown

__all__ = ["load", "load_original", "save", "upgrade"]


def save(
    directory: str | Path,
    model: nn.Module,
    loaded: LoadedModel,
    report: PatchReport,
    policy: Policy | Mapping[str, Any] | str | Path,
    *,
    seed: int = 0,
    plugins: Sequence[str] = (),
    force: bool = False,
    created: str | None = None,
    fold: FoldRecord | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write model.safetensors, surgery.json (format version 2) and report.md atomically.

    `loaded` is the source model as `surgeon.models.load_model` built it (spec, input size,
    task, where its weights came from), `report` what `patch` returned (its `ops` are the edits
    recorded), `policy` the policy applied (a Policy, its dict, a built-in name or a YAML
    path) and `seed` the patch's seed. `fold` is the record of `surgeon.fold.fold` when
    `model` was folded after patching; `history` the entries of earlier surgeries when `model`
    was loaded from a checkpoint and patched again. An existing checkpoint is only replaced
    with `force`."""
    if isinstance(policy, (str, Path)):
        policy = resolve_policy(policy)
    policy_data = policy.to_dict() if isinstance(policy, Policy) else dict(policy)
    manifest = build_manifest(
        loaded,
        report,
        policy_data,
        seed=seed,
        plugins=plugins,
        created=created,
        fold=fold,
        history=history,
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
    train: bool = False,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> nn.Module:
    """Rebuild the patched model of a checkpoint: build the source model, apply the recorded
    edits, then load the weights with strict=True (no forward pass).

    The model is returned in eval mode, ready for inference as a loaded model usually is;
    `train=True` returns it in training mode instead (to fine-tune it). Nothing is unpickled;
    a model from a user factory (`pkg.mod:fn`) is only imported when that spec is passed in
    `trust_import`, and plugins only when named in `plugins`. A version-1 checkpoint is
    rebuilt by replaying its surgery, with a `LegacyCheckpointWarning`."""
    model = load_checkpoint(directory, trust_import=trust_import, plugins=plugins)
    return model.train(train)


def upgrade(
    directory: str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> Path:
    """Rewrite a version-1 checkpoint as version 2 (in place, or into `out`; an existing
    non-empty `out` needs `force`); returns the directory written."""
    return upgrade_checkpoint(
        directory, out, force=force, trust_import=trust_import, plugins=plugins
    )
