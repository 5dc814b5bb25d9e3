"""Loading a checkpoint: build the source model, apply the recorded edits, load the weights.

A version-2 checkpoint is rebuilt from its edits alone: no tracing (except the modules whose
functional calls were replaced, which become GraphModules again), no policy, no forward pass,
so it loads the same under a newer torch or timm whose tracer or policy would decide otherwise.
A version-1 checkpoint is rebuilt by replaying its surgery (`surgeon.checkpoint.replay`), with a
one-line note that `surgeon upgrade DIR` rewrites it as version 2.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from surgeon.checkpoint.files import read_checkpoint
from surgeon.checkpoint.manifest import (
    FIX_MANIFEST,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    require_trusted_import,
)
from surgeon.checkpoint.replay import replay
from surgeon.checkpoint.weights import check_state_dict_fits
from surgeon.edits import EditError, op_from_dict, perform
from surgeon.errors import Argument, CheckpointError
from surgeon.models import ModelSpec, build_model, load_state
from surgeon.rewrites import load_plugin

__all__ = ["LegacyCheckpointWarning", "apply_history", "load_checkpoint", "rebuild"]


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
                    "hold; pass ",
                    Argument("plugins", plugin, many=True),
                    " to allow importing it",
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
