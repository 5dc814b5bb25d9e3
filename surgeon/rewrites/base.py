"""What every rewrite shares: the Edit record, SkipSite, and the two kinds of rewrite.

A rewrite turns (site, params) into an edit of the user's model, made through the
`ModelEditor` (`surgeon.edits`), the single mutation point that logs every change so that a
failed patch can be undone and a checkpoint can record the edits. Module sites are replaced on
their parent, so the model keeps its class, methods and all other state-dict keys; functional
sites (`F.max_pool2d` in a forward) are replaced in a GraphModule of the module that makes the
call (the whole model only when the call is in the model's own forward; the report says so).

A model-level rewrite (`ModelRewrite`: dilate, relocate) plans every site it was given at once
from the analysis, then applies the plan; a site-level rewrite (`Rewrite`) edits one site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from surgeon.edits import ModelEditor
from surgeon.geometry import Geometry, Resize
from surgeon.layers.stride_pad import StridePad
from surgeon.schema import ActionSchema
from surgeon.sites import Site
from surgeon.trace import Analysis

__all__ = [
    "Edit",
    "LayerChange",
    "ModelEditor",
    "ModelPlan",
    "ModelRewrite",
    "Rewrite",
    "SkipSite",
    "Target",
    "Transfer",
    "change_geometry",
    "unchanged",
]

Transfer = Literal["exact", "approximate", "random", "kept"]


class SkipSite(Exception):
    """Raised by a rewrite that cannot apply at a site; the message is the reason reported."""


@dataclass(frozen=True)
class Edit:
    """What one rewrite did at one site."""

    site: str
    action: str
    replacement: str  # short description, e.g. "SpaceToDepthConv(b2, k3, 512→128)"
    transfer: Transfer
    modules: tuple[str, ...]  # qualified paths of the new or changed modules
    output_module: str | None = None  # module whose output is the site's output, if one is
    note: str = ""


class Rewrite(Protocol):
    """An action a policy can name: a schema for its parameters and the edit itself."""

    schema: ActionSchema

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit: ...


@dataclass(frozen=True)
class Target:
    """A site a policy selected for a model-level rewrite, with its rule's parameters."""

    site: Site
    params: Mapping[str, Any] = field(hash=False)


@dataclass(frozen=True)
class LayerChange:
    """A conv or pool module's new geometry: `resize` of its geometry as built (`geometry`).
    A resize with an explicit `pad` puts a `StridePad` before the layer, at the same path."""

    path: str
    geometry: Geometry
    resize: Resize


@dataclass(frozen=True)
class ModelPlan:
    """What a model-level rewrite will do: for every target site an `Edit` or the reason it is
    skipped, and the layer changes that make those edits."""

    outcomes: Mapping[str, Edit | str] = field(hash=False)
    layers: tuple[LayerChange, ...] = ()


@runtime_checkable
class ModelRewrite(Protocol):
    """An action planned for the whole model at once (its sites interact: dilate, relocate).

    `plan` sees every site the policy gave the action (in site order) and the analysis, and
    changes nothing; `apply` makes the plan's changes through the editor."""

    schema: ActionSchema

    def plan(self, analysis: Analysis, targets: Sequence[Target]) -> ModelPlan: ...

    def apply(self, editor: ModelEditor, plan: ModelPlan) -> None: ...


_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def change_geometry(editor: ModelEditor, change: LayerChange) -> None:
    """Set a layer's new stride, dilation and padding; behind a `StridePad` (max pools pad with
    -inf, as their own padding does; convs per their padding_mode) when the padding is
    asymmetric."""
    g, r = change.geometry, change.resize
    attrs: dict[str, Any] = {"stride": r.stride, "padding": r.padding}
    if g.op != "avg_pool":  # average pooling has no dilation
        attrs["dilation"] = r.dilation
    editor.set_attrs(change.path, **attrs)
    if r.pad is None:
        return
    if g.op == "max_pool":
        pad = StridePad(r.pad, "constant", -math.inf)
    else:
        pad = StridePad(r.pad, _PAD_MODES.get(g.padding_mode, "constant"))
    editor.wrap(change.path, before=[pad])


def unchanged(g: Geometry, r: Resize) -> bool:
    """True when `r` is the geometry the layer already has."""
    return (r.stride, r.dilation, r.padding, r.pad) == (g.stride, g.dilation, g.padding, None)
