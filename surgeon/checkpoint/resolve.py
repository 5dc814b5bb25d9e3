"""Models given as inputs: a model spec or a checkpoint directory, and a checkpoint's original.

Every command that takes a model takes either (`surgeon scan|patch|eval|export|placements`).
`resolve_model` builds a spec (seeded random initialisation, pretrained weights or a weights
file) or loads a checkpoint (its recorded edits applied, its weights verified), and returns
both as one `ModelInput`. `load_original` builds the unpatched model a checkpoint was made
from, with the weights it was patched from: `surgeon eval --baseline` compares a checkpoint
with it, and `surgeon heal` distils from it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from surgeon.checkpoint.files import read_manifest, sha256_file
from surgeon.checkpoint.manifest import require_trusted_import, summarize
from surgeon.checkpoint.restore import load_checkpoint
from surgeon.errors import Argument, CheckpointError, UsageError, WeightsError
from surgeon.models import (
    HF_HUB_PREFIX,
    LoadedModel,
    ModelSpec,
    build_model,
    describe_weights,
    load_model,
)

__all__ = ["ModelInput", "is_checkpoint", "load_original", "resolve_checkpoint", "resolve_model"]

UNRECORDED: Mapping[str, Any] = {"kind": "unrecorded"}
"""The source weights of a checkpoint that does not record them (version 1, or upgraded)."""


@dataclass
class ModelInput:
    """A model ready to use, and what it is.

    `loaded` holds the model (for a checkpoint: the patched model in eval mode, its weights
    loaded), the source model's spec, task and example input size, and the record of the
    weights the source model had (for a checkpoint, its manifest's `model.weights`).
    `checkpoint` and `manifest` are set when the input was a checkpoint directory."""

    loaded: LoadedModel
    checkpoint: Path | None = None
    manifest: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def label(self) -> str:
        """How the user named it: the checkpoint directory, or the canonical spec."""
        return str(self.checkpoint) if self.checkpoint is not None else self.loaded.spec.text

    @property
    def policy(self) -> str | None:
        """The policies a checkpoint was patched with (`spd + antialias`); None for a spec."""
        return summarize(self.manifest).policy if self.manifest is not None else None

    @property
    def surgeries(self) -> tuple[str, ...]:
        """The kinds of a checkpoint's history entries (`patch`, `fold`, `heal`); () for a spec."""
        return summarize(self.manifest).surgeries if self.manifest is not None else ()

    def history(self) -> list[dict[str, Any]]:
        """The surgeries already made, to keep in front of a new one (empty for a spec).

        CheckpointError for a version-1 checkpoint, which records its recipe, not its edits."""
        if self.manifest is None:
            return []
        if self.manifest["format_version"] == 1:
            raise CheckpointError(
                f"{self.checkpoint} is a version-1 checkpoint, which does not record its edits; "
                f"rewrite it as version 2 first (surgeon upgrade {self.checkpoint})"
            )
        return [dict(entry) for entry in self.manifest["history"]]

    def describe(self) -> str:
        """One line for people: what was built or loaded, from which weights, at which size."""
        size = "x".join(map(str, self.loaded.input_size))
        weights = describe_weights(self.loaded.weights)
        if self.checkpoint is None:
            return f"model {self.loaded.spec.text} ({weights}), input {size}"
        return (
            f"checkpoint {self.checkpoint}: {self.loaded.spec.text} ({weights}) patched with "
            f"{self.policy}, input {size}"
        )


def is_checkpoint(target: str | Path) -> bool:
    """Whether `target` names a checkpoint directory rather than a model spec: an existing
    directory, or a path (`out/r18-spd`, `./ck`) that is not a hub name."""
    text = str(target)
    if Path(text).is_dir():
        return True
    hub = text.startswith((HF_HUB_PREFIX, "timm:" + HF_HUB_PREFIX))
    return not hub and ("/" in text or text.startswith("."))


def resolve_model(
    target: str | Path,
    *,
    kwargs: Mapping[str, Any] | None = None,
    pretrained: bool | str = False,
    weights: Path | None = None,
    seed: int = 0,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> ModelInput:
    """The model `target` names: a spec built by `surgeon.models.load_model` (with `kwargs`,
    `pretrained`, `weights`, and `seed` for a random initialisation), or a checkpoint
    directory loaded by `surgeon.load` (`trust_import`, `plugins`). A checkpoint holds its own
    weights and model arguments: `kwargs`, `pretrained` and `weights` are refused with one."""
    if not is_checkpoint(target):
        loaded = load_model(
            str(target), kwargs=kwargs, pretrained=pretrained, weights=weights, seed=seed
        )
        return ModelInput(loaded)
    directory = Path(target)
    for name, value in (("kwargs", kwargs), ("pretrained", pretrained), ("weights", weights)):
        if value:
            raise UsageError(
                f"{directory} is a checkpoint, which holds its own weights and model arguments: ",
                Argument(name),
                " applies to model specs only",
            )
    return resolve_checkpoint(directory, trust_import=trust_import, plugins=plugins)


def resolve_checkpoint(
    directory: str | Path, *, trust_import: Collection[str] = (), plugins: Collection[str] = ()
) -> ModelInput:
    """A checkpoint directory as a `ModelInput`: its patched model as `surgeon.load` rebuilds
    it (eval mode, weights verified), its source spec, input size and weights record."""
    directory = Path(directory)
    model = load_checkpoint(directory, trust_import=trust_import, plugins=plugins)
    manifest = read_manifest(directory)
    info = manifest["model"]
    loaded = LoadedModel(
        model,
        _spec(info),
        summarize(manifest).task,  # type: ignore[arg-type]
        tuple(int(n) for n in info["input_size"]),
        dict(info.get("weights", UNRECORDED)),
    )
    return ModelInput(loaded, directory, manifest)


def _spec(info: Mapping[str, Any], name: str | None = None) -> ModelSpec:
    return ModelSpec(info["source"], name or info["name"], dict(info["kwargs"]))


def load_original(
    directory: str | Path,
    *,
    weights_override: str | Path | None = None,
    trust_import: Collection[str] = (),
    override_name: Literal["weights_override", "teacher_weights"] = "weights_override",
) -> LoadedModel:
    """The unpatched model a checkpoint was made from, with the weights it was patched from
    (its manifest's `model` and `model.weights`), in eval mode, at the checkpoint's input size.

    A random initialisation is rebuilt from its seed; a weights file is read again after
    checking its SHA-256; pretrained weights are read from the library's cache (or fetched)
    and checked against the recorded SHA-256 where one was recorded. `weights_override` stands
    in for a weights file that has moved and must have the recorded SHA-256; for a checkpoint
    that does not record its weights it is the only way, unchecked. WeightsError when a file is
    gone or differs, CheckpointError when nothing was recorded; each names the fix, the
    override named as the caller calls it (`override_name`: heal's `teacher_weights`)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    require_trusted_import(manifest, trust_import)
    info = manifest["model"]
    record = dict(info.get("weights", UNRECORDED))
    kind, recorded = record["kind"], record.get("sha256")
    override = (
        Argument("teacher_weights", metavar="FILE")
        if override_name == "teacher_weights"
        else Argument("weights_override", metavar="FILE")
    )
    if weights_override is not None:
        path = Path(weights_override)
        if kind == "random":
            raise WeightsError(
                f"{directory} was patched from random weights (seed {record['seed']}), which "
                "are rebuilt from the seed; drop ",
                override,
            )
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file; check ", override)
        if kind == "pretrained" and not recorded:
            raise WeightsError(
                f"{directory} records no SHA-256 for the pretrained weights {record['name']}, "
                f"so {path} cannot be checked against them; drop ",
                override,
                " to read the library's",
            )
        if recorded and (digest := sha256_file(path)) != recorded:
            raise WeightsError(
                f"{path} has SHA-256 {digest[:12]}…, but the original was patched from weights "
                f"with {recorded[:12]}…; pass ",
                override,
                " with the weights it was patched from",
            )
        loaded = build_model(_spec(info), weights=path)
    elif kind == "random":
        loaded = build_model(_spec(info), seed=int(record["seed"]))
    elif kind == "file":
        path = Path(record["path"])
        if not path.is_file():
            raise WeightsError(
                f"{directory} was patched from the weights file {path}, which no longer "
                "exists; pass ",
                override,
                " to build the original from a copy of it",
            )
        if sha256_file(path) != recorded:
            raise WeightsError(
                f"{path} has changed since {directory} was patched from it (its SHA-256 "
                "differs from the recorded one); pass ",
                override,
                " with the weights it was patched from",
            )
        loaded = build_model(_spec(info), weights=path)
    elif kind == "pretrained":
        loaded = build_model(_pretrained_spec(info, record), pretrained=True)
        found = loaded.weights.get("sha256")
        if recorded and found != recorded:
            raise WeightsError(
                f"the pretrained weights {record['name']} read from {loaded.weights.get('file')} "
                f"are not those {directory} was patched from (recorded SHA-256 {recorded[:12]}…); "
                "pass ",
                override,
                " with the weights it was patched from",
            )
        loaded.spec = _spec(info)
    else:
        raise CheckpointError(
            f"{directory} does not record the weights it was patched from (it was written in "
            "format version 1 or upgraded from it); pass ",
            override,
            " to build the original with them",
        )
    loaded.input_size = tuple(int(n) for n in info["input_size"])
    return loaded


def _pretrained_spec(info: Mapping[str, Any], record: Mapping[str, Any]) -> ModelSpec:
    """The spec that loads the pretrained weights a record names: torchvision's enum member
    (`ResNet50_Weights.IMAGENET1K_V2` → `resnet50.IMAGENET1K_V2`), timm's `arch.tag`, or the
    hub name, so that the weights are those the checkpoint was patched from even when the
    library's default has changed since."""
    spec = _spec(info)
    if spec.source == "torchvision":
        return _spec(info, f"{spec.architecture}.{str(record['name']).rpartition('.')[2]}")
    if spec.source == "timm" and not spec.hub:
        return _spec(info, str(record["name"]))
    return spec
