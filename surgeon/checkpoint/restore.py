"""Loading a checkpoint: build the source model, apply the recorded edits, load the weights.

A version-2 checkpoint is rebuilt from its edits alone: no tracing (except the modules whose
functional calls were replaced, which become GraphModules again), no policy, no forward pass,
so it loads the same under a newer torch or timm whose tracer or policy would decide otherwise.
A version-1 checkpoint is rebuilt by replaying its surgery (`surgeon.checkpoint.replay`), with a
one-line note that `surgeon upgrade DIR` rewrites it as version 2.

`build_original` rebuilds the unpatched source model with the weights it was patched from (the
teacher of `surgeon heal`, the baseline of `surgeon eval --baseline`), checking them against
the SHA-256 the checkpoint recorded.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from surgeon.checkpoint.files import read_checkpoint, sha256_file
from surgeon.checkpoint.manifest import (
    FIX_MANIFEST,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    require_trusted_import,
)
from surgeon.checkpoint.replay import replay
from surgeon.checkpoint.weights import check_state_dict_fits
from surgeon.edits import EditError, op_from_dict, perform
from surgeon.errors import CheckpointError, WeightsError
from surgeon.models import LoadedModel, ModelSpec, build_model, load_state
from surgeon.rewrites import load_plugin

__all__ = [
    "LegacyCheckpointWarning",
    "apply_history",
    "build_original",
    "load_checkpoint",
    "rebuild",
]


class LegacyCheckpointWarning(UserWarning):
    """A version-1 checkpoint was loaded by replaying its surgery; `surgeon upgrade` fixes it."""


def load_checkpoint(
    directory: str | Path,
    *,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> nn.Module:
    """The patched model of a checkpoint, weights loaded with strict=True, in eval mode.

    Nothing is unpickled; a model from a user factory (`pkg.mod:fn`) is only imported when
    that spec is in `trust_import`, and plugins only when named in `plugins`."""
    directory = Path(directory)
    manifest, state = read_checkpoint(directory)
    if manifest["format_version"] == 1:
        warnings.warn(
            f"{directory} is a version-1 checkpoint, loaded by replaying its surgery; "
            f"`surgeon upgrade {directory}` rewrites it as version 2, which loads without it",
            LegacyCheckpointWarning,
            stacklevel=2,
        )
        model, weights, _, _ = replay(
            directory, manifest, state, trust_import=trust_import, plugins=plugins
        )
    else:
        model, weights = rebuild(manifest, trust_import=trust_import, plugins=plugins), state
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict_fits(expected, weights, source=directory / WEIGHTS_FILE)
    load_state(model, weights)
    return model.eval()


def rebuild(
    manifest: Mapping[str, Any],
    *,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> nn.Module:
    """The source model of a version-2 manifest with every recorded edit applied; its
    parameters are left uninitialised (not drawn at random): load the checkpoint's next."""
    require_trusted_import(manifest, trust_import)
    for entry in manifest["history"]:
        for plugin in entry.get("plugins", []):
            if plugin not in plugins:
                raise CheckpointError(
                    f"this checkpoint was patched with plugin {plugin!r}, whose layers it may "
                    f"hold; pass --plugin {plugin} to allow importing it"
                )
            load_plugin(plugin)
    info = manifest["model"]
    spec = ModelSpec(info["source"], info["name"], dict(info["kwargs"]))
    # parameters are left as allocated, not drawn at random: the weights are loaded next
    with torch.no_grad(), _NoRandomParameters():
        return apply_history(build_model(spec).model, manifest["history"])


class _NoRandomParameters(TorchFunctionMode):
    """Random initialisation of parameters is skipped: `load` overwrites every parameter with
    strict=True, so drawing them first is wasted time (half of building resnet50). Only draws
    into an `nn.Parameter` are skipped; buffers (a fixed filter, a random projection kept as a
    non-persistent buffer) are initialised as the model's code says."""

    _DRAWS = frozenset(
        {
            torch.Tensor.uniform_,
            torch.Tensor.normal_,
            nn.init.uniform_,
            nn.init.normal_,
            nn.init.trunc_normal_,
            nn.init.kaiming_uniform_,
            nn.init.kaiming_normal_,
            nn.init.xavier_uniform_,
            nn.init.xavier_normal_,
            nn.init.orthogonal_,
        }
    )

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in self._DRAWS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, nn.Parameter):
                return target  # left as allocated: the checkpoint's value replaces it
        return func(*args, **kwargs)


def apply_history(model: nn.Module, history: list[Mapping[str, Any]]) -> nn.Module:
    """Apply the edits of every history entry in order; returns the model's root (a new
    GraphModule only when a call in the root's own forward was replaced). CheckpointError
    naming the field (`history[0].edits[3].path`) when an edit does not apply."""
    for h, entry in enumerate(history):
        for i, data in enumerate(entry.get("edits", [])):
            where = f"history[{h}].edits[{i}]"
            try:
                model, _ = perform(model, op_from_dict(data))
            except EditError as exc:
                field = f"{where}.{exc.field}" if exc.field else where
                raise CheckpointError(
                    f"{MANIFEST_FILE}: field '{field}': {exc}; the checkpoint does not fit the "
                    f"model this surgeon builds: {FIX_MANIFEST}"
                ) from exc
    return model


def build_original(
    manifest: Mapping[str, Any],
    *,
    weights_file: str | Path | None = None,
    trust_import: Collection[str] = (),
) -> LoadedModel:
    """The unpatched source model of a version-2 manifest, with the weights it was patched
    from (`model.weights`), in eval mode:

    - `random`: built again from the recorded seed (the same weights);
    - `file`: loaded from the recorded path, whose SHA-256 must still match; `weights_file`
      stands in for a file that has moved, and must match too;
    - `pretrained`: the library's weights of the recorded name (tag or enum member) from its
      cache or the network; when the checkpoint recorded their SHA-256, the file read must
      match it (or `weights_file` stands in for it, and must match);
    - `unrecorded` (a checkpoint upgraded from version 1): only `weights_file`, unchecked.

    A mismatch or a missing file is a one-line WeightsError."""
    require_trusted_import(manifest, trust_import)
    info = manifest["model"]
    spec = ModelSpec(info["source"], info["name"], dict(info["kwargs"]))
    record = dict(info.get("weights") or {"kind": "unrecorded"})
    kind = record.get("kind")
    recorded = record.get("sha256")
    if weights_file is not None:
        path = Path(weights_file)
        if kind == "random":
            raise WeightsError(
                f"the original {spec.text} had random weights (seed {record.get('seed')}), "
                "which are rebuilt from the seed; --teacher-weights stands in for a weights "
                "file that moved"
            )
        if not path.is_file():
            raise WeightsError(f"--teacher-weights {path}: no such file")
        if kind == "pretrained" and not recorded:
            raise WeightsError(
                f"the checkpoint recorded no SHA-256 for the original's pretrained weights "
                f"({record.get('name')}), so {path} cannot be checked; drop --teacher-weights "
                "to use the library's"
            )
        if recorded:
            digest = sha256_file(path)
            if digest != recorded:
                raise WeightsError(
                    f"{path} has SHA-256 {digest[:16]}..., but the original was patched from "
                    f"weights with {recorded[:16]}... ({record.get('path') or record.get('file')});"
                    " pass the file the checkpoint was patched from"
                )
        return build_model(spec, weights=path)
    if kind == "random":
        return build_model(spec, seed=int(record["seed"]))
    if kind == "file":
        path = Path(record["path"])
        if not path.is_file():
            raise WeightsError(
                f"the original's weights file {path} is gone; pass --teacher-weights FILE "
                f"(SHA-256 {str(recorded)[:16]}...)"
            )
        digest = sha256_file(path)
        if digest != recorded:
            raise WeightsError(
                f"the original's weights file {path} changed since the checkpoint was patched "
                f"(SHA-256 {digest[:16]}..., recorded {str(recorded)[:16]}...); pass the "
                "original file with --teacher-weights FILE"
            )
        return build_model(spec, weights=path)
    if kind == "pretrained":
        loaded = build_model(_pinned(spec, str(record.get("name") or "")), pretrained=True)
        loaded.spec = spec
        got = loaded.weights.get("sha256")
        if recorded and got and got != recorded:
            raise WeightsError(
                f"the library's pretrained weights {record.get('name')} changed since the "
                f"checkpoint was patched (SHA-256 {got[:16]}..., recorded {recorded[:16]}...); "
                "pass the original file with --teacher-weights FILE"
            )
        return loaded
    raise WeightsError(
        "the checkpoint does not record where the original's weights came from (it was "
        "upgraded from version 1); pass them with --teacher-weights FILE"
    )


def _pinned(spec: ModelSpec, name: str) -> ModelSpec:
    """The spec naming exactly the pretrained weights recorded as `name`: timm's `arch.tag`,
    or torchvision's `Enum.MEMBER` as the `arch.MEMBER` tag (the default may move on)."""
    if spec.source == "timm" and name and not spec.hub:
        return ModelSpec("timm", name, spec.kwargs)
    if spec.source == "torchvision" and "." in name:
        member = name.rpartition(".")[2]
        return ModelSpec("torchvision", f"{spec.architecture}.{member}", spec.kwargs)
    return spec
