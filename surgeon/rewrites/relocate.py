"""`relocate`: move where a model downsamples (Balanced Mixture of SuperNets, Javan et al.,
arXiv 2306.11982: the placement of the downsampling layers matters).

Two forms, both checked on the analysis graph before anything is edited (`StrideGraph`):

- `to: layer2.0.conv1` on a rule that matches one site: the site runs at stride 1 and the named
  layer takes its stride. In torchvision's ResNet-50 (v1.5, stride in the 3×3 conv2) moving
  `layer2.0.conv2` to `layer2.0.conv1` gives the original ResNet v1 block.
- `placement: "conv1 maxpool layer2.0.conv1 layer2.0.downsample.0 ..."`: the whole set of layers
  that downsample (×2), e.g. one of `PlacementSpace.placements()`. It is checked as a whole at the
  first site the rule reaches; every site then takes its part (a listed site keeps its stride and
  is reported skipped, an unlisted one runs at stride 1), and each layer that gains a stride is
  edited with the site whose step it takes over. Use it on a rule that matches every
  downsampling site (`placement_policy` writes one): a site held back by a keep rule keeps its
  stride and the patched model then fails verification.

A move is refused, with a one-line reason in the report (the site is skipped and nothing is
edited), when a residual join or concatenation would get maps of different resolutions, a
flatten would see another size, or the model's output would change size. Moves that are only
legal together (a block's main path and its shortcut) are refused one by one: give them as a
`placement`. A site whose stride is removed pads to keep its input's size (see `regeometry`);
the layer that takes the stride keeps its padding. Weights are kept.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from surgeon.errors import AnalysisError
from surgeon.geometry import Geometry, regeometry
from surgeon.rewrites.base import (
    Edit,
    LayerChange,
    ModelEditor,
    ModelPlan,
    SkipSite,
    Target,
    change_geometry,
    unchanged,
)
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site
from surgeon.strides import Layer, StrideGraph
from surgeon.trace import Analysis

__all__ = ["RelocateRewrite"]


@dataclass
class _Placement:
    chosen: frozenset[str]
    refusal: str | None
    owner: dict[str, list[str]]  # site -> layers gaining a stride, edited with it
    strides: dict[str, int]


@dataclass
class _Plan:
    """The strides planned so far in one fx region."""

    graph: StrideGraph
    strides: dict[str, int] = field(default_factory=dict)
    placements: dict[str, _Placement] = field(default_factory=dict)

    def stride(self, layer: Layer) -> int:
        return self.strides.get(layer.name, layer.stride)

    def changes(self) -> list[LayerChange]:
        out = []
        for name, stride in self.strides.items():
            g = Geometry.of(self.graph.layers[name].module)
            resize = regeometry(g, stride, 1)
            if not unchanged(g, resize):
                out.append(LayerChange(name, g, resize))
        return out


def _names(text: str) -> list[str]:
    return [name for name in re.split(r"[\s,]+", text.strip()) if name]


class RelocateRewrite:
    """Move a site's stride to another layer, or apply a whole placement of strides."""

    schema = ActionSchema(
        "relocate",
        {
            "to": ParamSpec(
                "to", str, None, help="the layer (module path) that takes this site's stride"
            ),
            "placement": ParamSpec(
                "placement",
                str,
                None,
                help="every layer that should downsample ×2, separated by spaces or commas",
            ),
        },
        "move where the model downsamples; moves that break a residual join are refused",
    )

    def plan(self, analysis: Analysis, targets: Sequence[Target]) -> ModelPlan:
        """Each target's move in site order (refused moves change nothing), then the new
        geometry of every layer whose stride changed."""
        plans: dict[str, _Plan] = {}
        outcomes: dict[str, Edit | str] = {}
        for target in targets:
            try:
                outcomes[target.site.name] = self._site(analysis, plans, target)
            except SkipSite as exc:
                outcomes[target.site.name] = str(exc)
        layers = tuple(change for plan in plans.values() for change in plan.changes())
        return ModelPlan(outcomes, layers)

    def apply(self, editor: ModelEditor, plan: ModelPlan) -> None:
        """Set every planned layer's stride and padding through the editor."""
        for change in plan.layers:
            change_geometry(editor, change)

    def _site(self, analysis: Analysis, plans: dict[str, _Plan], target: Target) -> Edit:
        site, params = target.site, target.params
        to, placement = params.get("to"), params.get("placement")
        if (to is None) == (placement is None):
            raise SkipSite(
                "relocate needs either `to` (the layer that takes this site's stride) or "
                "`placement` (the layers that downsample), not both"
                if to is not None
                else "relocate needs `to` (the layer that takes this site's stride) or "
                "`placement` (the layers that downsample)"
            )
        if site.functional:
            raise SkipSite("functional call: its stride is not a module attribute")
        region = analysis.region_of(site.module)
        if region is None or region.method != "fx":
            raise SkipSite("needs a torch.fx graph around the site to check its joins")
        if region.path not in plans:
            try:
                plans[region.path] = _Plan(StrideGraph(region, analysis))
            except AnalysisError as exc:
                raise SkipSite(str(exc)) from exc
        plan = plans[region.path]
        layer = plan.graph.layers.get(site.module)
        if layer is None:
            raise SkipSite("not a convolution or pooling module called once in the graph")
        if to is not None:
            return self._move(plan, layer, site, str(to))
        return self._place(plan, layer, site, str(placement))

    def _move(self, plan: _Plan, layer: Layer, site: Site, to: str) -> Edit:
        target = plan.graph.layers.get(to)
        if target is None:
            close = difflib.get_close_matches(to, list(plan.graph.layers), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SkipSite(f"{to!r} is not a convolution or pooling module called once here{hint}")
        if target is layer:
            raise SkipSite("`to` names the site itself")
        stride = plan.stride(layer)
        if stride == 1:
            raise SkipSite("has no stride left to move")
        new_stride = plan.stride(target) * stride
        strides = {**plan.strides, layer.name: 1, target.name: new_stride}
        _, problems = plan.graph.stages(strides)
        if problems:
            raise SkipSite(f"moving its stride to {to} is refused: {problems[0]}")
        plan.strides = strides
        path = layer.name  # a StridePad wrapper stands at the layer's path
        description = f"stride {stride}→1; {to} takes it (stride {new_stride})"
        return Edit(site.name, "relocate", description, "kept", (path,), path)

    def _place(self, plan: _Plan, layer: Layer, site: Site, text: str) -> Edit:
        placement = plan.placements.get(text)
        if placement is None:
            placement = plan.placements[text] = self._check(plan, text)
        if placement.refusal is not None:
            raise SkipSite(placement.refusal)
        if layer.stride not in (1, 2):
            raise SkipSite(f"stride {layer.stride}: placements move ×2 steps only")
        gains = placement.owner.get(layer.name, [])
        loses = layer.name not in placement.chosen and layer.stride == 2
        if not loses and not gains:
            raise SkipSite("listed in the placement: keeps its stride")
        if loses:
            plan.strides[layer.name] = 1
        for name in gains:
            plan.strides[name] = 2
        path = layer.name if loses else site.module
        parts = [f"stride {layer.stride}→1" if loses else f"keeps stride {layer.stride}"]
        if gains:
            parts.append(f"stride 2 at {', '.join(gains)}")
        return Edit(site.name, "relocate", "; ".join(parts), "kept", (path,), path)

    def _check(self, plan: _Plan, text: str) -> _Placement:
        graph = plan.graph
        names = _names(text)
        movable = [layer for layer in graph.layers.values() if layer.stride in (1, 2)]
        known = {layer.name for layer in movable}
        chosen = frozenset(names)
        strides = {layer.name: 2 if layer.name in chosen else 1 for layer in movable}
        unknown = [name for name in names if name not in known]
        if unknown:
            refusal = (
                f"placement names {unknown[0]!r}, which is not a convolution or pooling module "
                "called once with stride 1 or 2"
            )
            return _Placement(chosen, refusal, {}, strides)
        stages, problems = graph.stages(strides)
        if problems:
            return _Placement(chosen, f"placement refused: {problems[0]}", {}, strides)
        removed = [layer for layer in movable if layer.stride == 2 and layer.name not in chosen]
        gained = [layer for layer in movable if layer.stride == 1 and layer.name in chosen]
        kept = [layer for layer in movable if layer.stride == 2 and layer.name in chosen]
        owner: dict[str, list[str]] = {}
        for layer in gained:
            src = graph.input_of(layer.node)
            stage = stages.get(src) if src is not None else None
            same_step = [
                x
                for x in removed
                if (i := graph.input_of(x.node)) is not None and graph.original.get(i) == stage
            ]
            pick = (same_step or removed or kept or [layer])[0]
            owner.setdefault(pick.name, []).append(layer.name)
        return _Placement(chosen, None, owner, strides)
