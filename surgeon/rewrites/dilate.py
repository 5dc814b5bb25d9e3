"""`dilate`: a dilated encoder with a target output stride (DeepLab, Chen et al. 2017, arXiv
1606.00915 and 1706.05587; used by BTS, arXiv 1907.10326, and "Detail Preserving Depth
Estimation from a Single Image Using Attention Guided Networks", arXiv 1809.00646).

Every downsampling site whose output stride (`stage_out`) exceeds `output_stride` runs at the
stride that reaches the target (1 once it is reached), and every convolution and max pool after
it is dilated by the factor its input map has grown by, with its padding scaled the same way, so
each layer reads the same inputs as before, only on a denser grid ("algorithme à trous"). On
every f-th position the feature maps equal the original ones, and the weights are kept. Sizes
stay consistent: a site whose stride is removed pads to keep its input's size, as the 3×3
stride-2 conv with padding 1 of a ResNet does, so residual joins and their shortcuts agree.

It is a model-level rewrite (`ModelRewrite`): `plan` walks the sites it was given in order on the
analysis graph (`StrideGraph`), each adding its stride change, then sets every conv and pool of
the graph from its *original* geometry and the factor of its input map for the final strides, so
a layer after several rewritten sites is dilated once, by the product of their factors; `apply`
makes those layer changes through the editor. Matches
torchvision's `replace_stride_with_dilation` on ResNets: the conv at a rewritten site keeps the
dilation of the maps before it and the layers after it get the new one.

Average pools (no dilation in PyTorch), functional convolutions and transposed convolutions
after a rewritten site keep their geometry; the row's note lists them. A site whose output
stride is within the target keeps its stride and is reported as skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from torch import fx, nn

from surgeon.calls import resampling
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
from surgeon.sites import Site, find_sites
from surgeon.strides import StrideGraph
from surgeon.trace import Analysis

__all__ = ["DilateRewrite", "DilationPlan"]


@dataclass
class DilationPlan:
    """The stride changes planned so far in one fx region."""

    graph: StrideGraph
    strides: dict[str, int] = field(default_factory=dict)  # layer name -> new stride
    sites: frozenset[str] = frozenset()  # layers that are downsampling sites (rules see them)
    pending: dict[str, int] = field(default_factory=dict)  # site layer -> stride dilate gives it

    def partners(self, name: str, stride: int, *, sites: bool = False) -> list[str]:
        """Strided layers parallel to `name` (same input stage and stride) not changed yet: by
        default those no downsampling rule sees (a 2×2 shortcut pool that covers a 2×2 map
        reads as a global pool), with `sites` the downsampling sites (a block's shortcut)."""
        layer = self.graph.layers[name]
        src = self.graph.input_of(layer.node)
        stage = self.graph.original.get(src) if src is not None else None
        return [
            other.name
            for other in self.graph.layers.values()
            if other.name != name
            and (other.name in self.sites) == sites
            and other.name not in self.strides
            and other.stride == stride
            and (i := self.graph.input_of(other.node)) is not None
            and self.graph.original.get(i) == stage
        ]

    def left_alone(self, stages: Mapping[fx.Node, Fraction | None]) -> list[str]:
        """Layers after a rewritten site that this plan cannot dilate."""
        root = self.graph.region.graph_module or self.graph.region.module
        out = []
        for node in self.graph.nodes:
            if self.graph.factor(stages, node) == 1:
                continue
            if node.op == "call_module":
                module = root.get_submodule(str(node.target))
                kernel = getattr(module, "kernel_size", 1)
                big = max(kernel) if isinstance(kernel, tuple) else kernel
                if isinstance(module, nn.modules.pooling._AvgPoolNd) and big > 1:
                    out.append(f"{self.graph.region.qualify(str(node.target))} (average pool)")
                elif isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
                    out.append(f"{self.graph.region.qualify(str(node.target))} (transposed conv)")
            elif node.op == "call_function":
                res = resampling(node, root)
                if res is not None and res.op in ("conv", "max_pool", "avg_pool"):
                    out.append(f"{self.graph.where(node)} (functional)")
        return out

    def whole_factor(self, strides: Mapping[str, int], node: fx.Node) -> int:
        """How many times denser the map entering `node` is with `strides` (1 if not whole)."""
        factor = self.graph.factor(self.graph.stages(strides)[0], node)
        return int(factor) if factor.denominator == 1 and factor >= 1 else 1

    def changes(self) -> list[LayerChange]:
        """Every conv and pool of the region set from its original geometry and its input's
        factor for the planned strides (layers that stay as they are left out)."""
        stages, _ = self.graph.stages(self.strides)
        out: list[LayerChange] = []
        done: set[int] = set()
        for node, module in self.graph.modules:
            if id(module) in done:
                continue
            done.add(id(module))
            factor = self.graph.factor(stages, node)
            rule = self.graph.rules[node]
            g = Geometry.of(module)
            stride = self.strides.get(rule.layer, g.stride[0]) if rule.layer else g.stride[0]
            whole = int(factor) if factor.denominator == 1 and factor >= 1 else 1
            resize = regeometry(g, stride, whole)
            if not unchanged(g, resize):
                out.append(LayerChange(self.graph.region.qualify(str(node.target)), g, resize))
        return out


def _plan_strides(
    plan: DilationPlan, site: Site, keep: int, stride: int
) -> tuple[dict[str, int], dict[fx.Node, Fraction | None], list[str]]:
    """The plan's strides with `site` at `keep` (and the parallel layers that must go with it),
    their stages and those parallel layers; SkipSite if the model could not run that way."""
    if site.module not in plan.graph.layers:
        raise SkipSite("not a single-call convolution or pooling module of the graph")
    src = plan.graph.input_of(plan.graph.layers[site.module].node)
    if src is None or plan.graph.original.get(src) is None:
        raise SkipSite(
            "the stride graph cannot follow the map sizes before it (a join of branches "
            "with unequal strides per dimension, or an op it does not model)"
        )
    strides = {**plan.strides, site.module: keep}
    stages, problems = plan.graph.stages(strides)
    # joins may disagree until the parallel sites (a shortcut) are rewritten too; a parallel
    # layer that is no downsampling site at this input size goes with this one
    also = []
    for partner in plan.partners(site.module, stride):
        joins = sum(p.kind == "join" for p in problems)
        trial = {**strides, partner: keep}
        trial_stages, trial_problems = plan.graph.stages(trial)
        if sum(p.kind == "join" for p in trial_problems) < joins:
            strides, stages, problems = trial, trial_stages, trial_problems
            also.append(partner)
    # an output or a flatten that would change size cannot be fixed by later sites
    fatal = [p for p in problems if p.kind != "join"]
    if fatal:
        raise SkipSite(f"{fatal[0]}; choose a larger output_stride")
    # the parallel sites (a block's shortcut) come later and must be able to follow: if
    # changing them too would break a flatten or an output, leave the whole block alone
    siblings = plan.partners(site.module, stride, sites=True)
    if siblings:
        _, together = plan.graph.stages({**strides, **dict.fromkeys(siblings, keep)})
        fatal = [p for p in together if p.kind != "join"]
        if fatal:
            raise SkipSite(
                f"its parallel branch {siblings[0]} could not follow ({fatal[0]}); "
                "choose a larger output_stride"
            )
    # a join this change breaks must be mended by the sites dilate will change later (a
    # block's shortcut); a branch it cannot change (a functional call, unequal strides per
    # dimension) would leave the join broken: then the whole block keeps its strides
    _, earlier = plan.graph.stages(plan.strides)
    known = {p.where for p in earlier if p.kind == "join"}
    later = {name: k for name, k in plan.pending.items() if name not in strides}
    _, everything = plan.graph.stages({**strides, **later})
    stuck = [p for p in everything if p.kind == "join" and p.where not in known]
    if stuck:
        raise SkipSite(
            f"{stuck[0]} whatever the later sites do: one of its branches cannot follow (a "
            "functional call, unequal strides per dimension, a fixed-factor upsampling, or a "
            "site skipped above)"
        )
    return strides, stages, also


def _kept_stride(site: Site, target: int) -> int:
    """The stride a site runs at once dilated: what reaches `target` exactly, else 1."""
    return max(1, target // site.stage_in) if site.stage_in < target else 1


class DilateRewrite:
    """Trade a site's stride for dilation of every later layer, down to a target output stride."""

    schema = ActionSchema(
        "dilate",
        {
            "output_stride": ParamSpec(
                "output_stride",
                int,
                8,
                min=1,
                max=1024,
                help="the largest output stride to keep: later sites run at stride 1 and the "
                "layers after them are dilated (DeepLab uses 8 or 16)",
            ),
        },
        "dilated encoder: strides past the target output stride become dilation of later layers",
    )

    def plan(self, analysis: Analysis, targets: Sequence[Target]) -> ModelPlan:
        """Each target's stride change in site order, then every layer's new geometry."""
        plans: dict[str, DilationPlan] = {}
        outcomes: dict[str, Edit | str] = {}
        for target in targets:
            try:
                outcomes[target.site.name] = self._site(analysis, plans, target)
            except SkipSite as exc:
                outcomes[target.site.name] = str(exc)
        layers = tuple(change for plan in plans.values() for change in plan.changes())
        return ModelPlan(outcomes, layers)

    def apply(self, editor: ModelEditor, plan: ModelPlan) -> None:
        """Set every planned layer's geometry through the editor."""
        for change in plan.layers:
            change_geometry(editor, change)

    def _site(self, analysis: Analysis, plans: dict[str, DilationPlan], target: Target) -> Edit:
        site = target.site
        output_stride = int(target.params["output_stride"])
        if site.op not in ("conv", "max_pool", "avg_pool"):
            raise SkipSite(
                f"dilate changes convolutions and pools, not {site.op.replace('_', ' ')}"
            )
        if site.stage_out <= output_stride:
            raise SkipSite(
                f"keeps its stride: its output stride {site.stage_out} "
                f"is within the target {output_stride}"
            )
        if site.functional:
            raise SkipSite("functional call: its stride is not a module attribute")
        if len(set(site.stride)) != 1:
            raise SkipSite(f"unequal strides {site.stride} per dimension")
        stride = site.stride[0]
        keep = _kept_stride(site, output_stride)
        if site.stage_in < output_stride and (
            stride % keep or site.stage_in * keep != output_stride
        ):
            raise SkipSite(
                f"stride {stride} from output stride {site.stage_in} cannot stop at {output_stride}"
            )
        region = analysis.region_of(site.module)
        if region is None or region.method != "fx":
            raise SkipSite("needs a torch.fx graph of the layers after the site to dilate them")
        if region.path not in plans:
            try:
                graph = StrideGraph(region, analysis)
            except AnalysisError as exc:
                raise SkipSite(str(exc)) from exc
            found = [s for s in find_sites(analysis) if s.role == "downsample"]
            pending = {
                s.module: _kept_stride(s, output_stride)
                for s in found
                if s.module in graph.layers
                and s.stage_out > output_stride
                and len(set(s.stride)) == 1
            }
            plans[region.path] = DilationPlan(
                graph, sites=frozenset(s.module for s in found), pending=pending
            )
        plan = plans[region.path]
        try:
            strides, stages, also = _plan_strides(plan, site, keep, stride)
        except SkipSite:
            plan.pending.pop(site.module, None)  # it keeps its stride: later checks must know
            raise
        node = plan.graph.layers[site.module].node
        module = plan.graph.layers[site.module].module
        before = plan.whole_factor(plan.strides, node)
        plan.strides = strides
        before_after = plan.graph.original.get(node), stages.get(node)
        denser = (
            before_after[0] / before_after[1]
            if before_after[0] is not None and before_after[1]
            else stride // keep
        )
        g = Geometry.of(module)
        dilation = (
            f", dilation {before}"
            if before > 1 and g.op != "avg_pool" and g.kernel != (1,) * site.dims
            else ""
        )
        description = (
            f"stride {stride}→{keep}{dilation} (output stride {output_stride}: map {denser}× "
            "larger per side, on purpose)"
        )
        alone = plan.left_alone(stages)
        note = f"the layers after it run {denser}× denser and are dilated to match"
        if also:
            note += f"; {', '.join(also)} (parallel, not a downsampling site here) also at stride 1"
        if alone:
            note += f"; not dilated: {', '.join(alone[:4])}" + (" …" if len(alone) > 4 else "")
        path = site.module  # a StridePad wrapper stands at the layer's path
        return Edit(site.name, "dilate", description, "kept", (path,), path, note=note)
