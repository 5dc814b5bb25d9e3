"""What `aps` and `lps` share: each strided site runs at stride 1 and a polyphase sampler picks,
per sample, which of its s^d components to keep; parallel sites that meet at a join share it.

Placement, per site (as the papers' ResNets and antialias place their layers, keeping
state-dict keys where they can):

- a conv followed (through a batch norm) by an activation module called once: the activation
  becomes `Sequential(act, sampler)` (timm's `BatchNormAct2d`: its `act`); a shared activation
  (torchvision's BasicBlock calls one ReLU twice): its consumer becomes
  `Sequential(sampler, consumer)`, when the consumer takes that one tensor;
- a pointwise conv (kernel 1, no padding) with no activation after it (a ResNet shortcut): the
  conv becomes `Sequential(sampler, conv)`, sampling its input, which commutes with it and
  costs s^d times less;
- any other conv: `Sequential(conv, sampler)`;
- a max or average pool runs at stride 1 and becomes `Sequential(pool, sampler)` (a functional
  `F.max_pool2d` call becomes a call of that Sequential).

Batch norms, dropout and activations work per position and channel, so taking a component
commutes with them and the sampler may follow them (a group norm's statistics span the map:
after one, the sampler follows the conv); the conv keeps its weights.

**Shared components.** A residual block's shortcut must take the component its main path took,
or the join adds maps sampled on different grids and the network is not shift-invariant. The
plan reads the analysis graph (`StrideGraph`): from each strided site it walks forward to the
next strided layers and collects the joins it reaches (adds, concatenations); target sites
that reach a common join from the same input stage with the same stride form a group. The one
whose sampler runs first in the forward (graph order) leads, the others follow it
(`share_phase`); the checkpoint records the link as a `Link` edit. A join that a target site
shares with a strided layer this action does not sample (a keep rule, a skipped site, another
action's site) is reported: the two need not take the same component, so it is not invariant.
So is a join of two samplers whose batches differ in the analysis (one folds the samples with
attention heads): a selection is per row, so they select alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Literal

from torch import fx, nn

from surgeon.errors import AnalysisError
from surgeon.layers.aps import AdaptivePolyphaseSampling
from surgeon.layers.lps import LearnablePolyphaseSampling
from surgeon.rewrites.base import (
    Edit,
    ModelEditor,
    ModelPlan,
    SkipSite,
    Target,
    Transfer,
)
from surgeon.schema import ActionSchema
from surgeon.sites import Neighbour, Site
from surgeon.strides import StrideGraph, ranked
from surgeon.trace import Analysis, Region

__all__ = ["Placement", "PolyphasePlan", "PolyphaseRewrite"]

Where = Literal["after_act", "before_consumer", "before_conv", "after_conv", "pool", "call"]

_POOLS: dict[str, dict[int, type[nn.Module]]] = {
    "max_pool": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "avg_pool": {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d},
}


@dataclass(frozen=True)
class Placement:
    """Where one site's sampler goes and what it is: `config` are its constructor arguments
    but the role; `position` is where it runs in the forward (graph order, for the leader)."""

    site: Site
    where: Where
    target: str  # the module wrapped (the site's own, an activation, a consumer)
    sampler: str  # the path the sampler will have
    config: Mapping[str, Any] = field(hash=False)
    transfer: Transfer
    description: str
    position: float
    # a functional pool's stride-1 form, which the call is replaced by (with the sampler)
    dense: nn.Module | None = field(default=None, compare=False)
    role: str = "alone"
    note: str = ""


@dataclass(frozen=True)
class PolyphasePlan(ModelPlan):
    """A `ModelPlan` with every placement (roles decided) and the links: (leader's sampler
    path, its followers' sampler paths)."""

    placements: tuple[Placement, ...] = ()
    links: tuple[tuple[str, tuple[str, ...]], ...] = ()


class PolyphaseRewrite:
    """A model-level rewrite placing one `layer` per site (`aps`, `lps`): every parameter of
    `schema` is a keyword argument of `layer.from_conv` and `layer.from_pool`."""

    schema: ActionSchema
    layer: type[AdaptivePolyphaseSampling] | type[LearnablePolyphaseSampling]
    short: str  # "APS", "LPS": the sampler in the report

    def layer_text(self, params: Mapping[str, Any], stride: Sequence[int]) -> str:
        """The sampler in the report: `APS(s2)`, `LPS(s2×3, tau=0.5)` (parameters that differ
        from their defaults)."""
        steps = str(stride[0]) if len(set(stride)) == 1 else "×".join(map(str, stride))
        changed = [
            f"{k}={params[k]}"
            for k, spec in self.schema.params.items()
            if params[k] != spec.default
        ]
        return f"{self.short}({', '.join([f's{steps}', *changed])})"

    # ------------------------------------------------------------------ plan

    def plan(self, analysis: Analysis, targets: Sequence[Target]) -> ModelPlan:
        """A placement per target (or the reason it is skipped), then the groups of parallel
        sites that share one component; nothing is edited."""
        outcomes: dict[str, Edit | str] = {}
        placed: list[Placement] = []
        claimed: set[str] = set()
        sites = {t.site.module for t in targets if t.site.module}
        graphs = _Graphs(analysis)
        for target in targets:
            try:
                placement = self._place(analysis, graphs, target, claimed, sites)
            except SkipSite as exc:
                outcomes[target.site.name] = str(exc)
                continue
            claimed.add(placement.target)
            placed.append(placement)
        groups, notes = graphs.groups(placed)
        by_site = {p.site.name: p for p in placed}
        links = []
        for group in groups:
            leader, *followers = sorted(group, key=lambda p: p.position)
            by_site[leader.site.name] = replace(
                leader,
                role="leader",
                note=f"its component is also taken by {', '.join(f.site.name for f in followers)}",
            )
            for follower in followers:
                by_site[follower.site.name] = replace(
                    follower,
                    role="follower",
                    note=f"takes the component of {leader.site.name} (their maps meet at a join)",
                )
            links.append((leader.sampler, tuple(f.sampler for f in followers)))
        for name, why in notes.items():
            p = by_site[name]
            by_site[name] = replace(p, note="; ".join(filter(None, [p.note, why])))
        final = tuple(by_site[p.site.name] for p in placed)
        for p in final:
            outcomes[p.site.name] = self._edit(p)
        return PolyphasePlan(outcomes, (), final, tuple(links))

    def _edit(self, p: Placement) -> Edit:
        site = p.site
        # a linked sampler run on its own would take (or leave) a selection out of turn, so
        # only samplers that select alone are compared layer by layer
        alone = p.role == "alone"
        if p.where in ("after_act", "before_consumer"):
            modules: tuple[str, ...] = (site.module, p.sampler)
            output = None
        else:
            path = p.sampler.rpartition(".")[0]
            modules, output = (path,), (path if alone else None)
        return Edit(site.name, self.schema.name, p.description, p.transfer, modules, output, p.note)

    def _place(
        self,
        analysis: Analysis,
        graphs: _Graphs,
        target: Target,
        claimed: set[str],
        sites: set[str],
    ) -> Placement:
        site = target.site
        if site.op not in ("conv", "max_pool", "avg_pool"):
            raise SkipSite(
                f"{self.schema.name} follows convolutions and pools, not "
                f"{site.op.replace('_', ' ')} layers"
            )
        args = {key: target.params[key] for key in self.schema.params}
        text = self.layer_text(target.params, site.stride)
        if site.op == "conv":
            return self._conv(analysis, graphs, site, args, text, claimed, sites)
        return self._pool(analysis, graphs, site, args, text)

    def _conv(
        self,
        analysis: Analysis,
        graphs: _Graphs,
        site: Site,
        args: dict[str, Any],
        text: str,
        claimed: set[str],
        sites: set[str],
    ) -> Placement:
        if site.functional:
            raise SkipSite("functional convolution: its stride is not a module attribute")
        conv = analysis.model.get_submodule(site.module)
        try:
            probe, transfer = self.layer.from_conv(conv, **args)
        except ValueError as exc:
            raise SkipSite(str(exc)) from exc
        config = probe.config()
        position = graphs.position(site, None, 0.5)
        chain = list(site.after)
        act_at = next((i for i, n in enumerate(chain) if n.kind == "act"), None)
        # the sampler may follow the norm and activation only where taking a component commutes
        # with them: batch norms (per channel) and dropout, not a group norm's spatial statistics
        if act_at is not None and not all(_pointwise(analysis, n) for n in chain[:act_at]):
            act_at = None
        if act_at is not None:
            act = chain[act_at]
            module = analysis.model.get_submodule(act.target) if act.is_module else None
            # a norm-act layer (timm's BatchNormAct2d) normalises first: a batch norm only
            norm_ok = not act.has_params or isinstance(module, _BATCH_NORMS)
            path = act.target if not act.has_params else f"{act.target}.act"
            if (
                norm_ok
                and act.is_module
                and not act.shared
                and path not in claimed
                and (not act.has_params or _parameter_free(getattr(module, "act", None)))
            ):
                return Placement(
                    site,
                    "after_act",
                    path,
                    f"{path}.1",
                    config,
                    transfer,
                    f"conv s1 → {act.type_name} → {text}",
                    graphs.position(site, act.node, 0.5),
                )
            consumer = chain[act_at + 1] if act_at + 1 < len(chain) else None
            if (
                norm_ok
                and consumer is not None
                and consumer.is_module
                and not consumer.shared
                and consumer.target not in sites
                and consumer.target not in claimed
                and graphs.one_input(site, consumer.node)
            ):
                return Placement(
                    site,
                    "before_consumer",
                    consumer.target,
                    f"{consumer.target}.0",
                    config,
                    transfer,
                    f"conv s1 → {act.type_name} → {text} → {consumer.type_name}",
                    graphs.position(site, consumer.node, -0.5),
                )
        pointwise = site.max_kernel == 1 and not isinstance(site.padding, str)
        if act_at is None and pointwise and not any(site.padding):
            # sampling the input of a 1×1 conv equals sampling its output, for s^d less work
            config = {**config, "channels": site.in_channels}
            return Placement(
                site,
                "before_conv",
                site.module,
                f"{site.module}.0",
                config,
                transfer,
                f"{text} → conv s1",
                graphs.position(site, None, -0.5),
            )
        return Placement(
            site,
            "after_conv",
            site.module,
            f"{site.module}.1",
            config,
            transfer,
            f"conv s1 → {text}",
            position,
        )

    def _pool(
        self, analysis: Analysis, graphs: _Graphs, site: Site, args: dict[str, Any], text: str
    ) -> Placement:
        kind = "max" if site.op == "max_pool" else "avg"
        if site.functional and isinstance(site.padding, str):
            raise SkipSite("functional pooling with 'same' padding")
        if not site.functional:
            pool = analysis.model.get_submodule(site.module)
            if getattr(pool, "return_indices", False):
                raise SkipSite("the pool returns indices, which a sampler cannot follow")
        try:
            probe, transfer = self.layer.from_pool(
                kind,
                site.in_channels,
                site.dims,
                site.kernel,
                site.stride,
                site.padding,
                site.dilation,
                site.ceil_mode,
                site.count_include_pad,
                site.divisor_override,
                **args,
            )
        except ValueError as exc:
            raise SkipSite(str(exc)) from exc
        k = "×".join(map(str, sorted(set(site.kernel))))
        position = graphs.position(site, None, 0.5)
        if not site.functional:
            name = type(analysis.model.get_submodule(site.module)).__name__
            return Placement(
                site,
                "pool",
                site.module,
                f"{site.module}.1",
                probe.config(),
                transfer,
                f"{name}(k{k}, s1) + {text}",
                position,
            )
        cls = _POOLS[site.op][site.dims]
        if site.op == "max_pool":
            dense = cls(site.kernel, stride=1, padding=site.padding, dilation=site.dilation)
        else:
            extra = {} if site.dims == 1 else {"divisor_override": site.divisor_override}
            dense = cls(
                site.kernel,
                stride=1,
                padding=site.padding,
                count_include_pad=site.count_include_pad,
                **extra,
            )
        owner, _, node = site.name.partition(":")
        attr = f"{node}_{self.schema.name}".replace(".", "_")
        path = f"{owner}.{attr}" if owner else attr
        return Placement(
            site,
            "call",
            path,
            f"{path}.1",
            probe.config(),
            transfer,
            f"{cls.__name__}(k{k}, s1) + {text}",
            position,
            dense,
        )

    # ------------------------------------------------------------------ apply

    def apply(self, editor: ModelEditor, plan: ModelPlan) -> None:
        """Run each site at stride 1 with its sampler, through the editor; then link groups."""
        assert isinstance(plan, PolyphasePlan)
        for p in plan.placements:
            site = p.site
            sampler = self.layer(**{**p.config, "role": p.role})
            sampler.train(editor.model.training)  # patch verifies in evaluation mode
            if p.where == "call":
                assert p.dense is not None
                editor.replace_site(site, nn.Sequential(p.dense, sampler), self.schema.name)
                continue
            editor.set_attrs(site.module, stride=(1,) * site.dims)
            if p.where in ("before_consumer", "before_conv"):
                editor.wrap(p.target, before=[sampler])
            else:
                editor.wrap(p.target, after=[sampler])
        for leader, followers in plan.links:
            editor.link(leader, followers)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _parameter_free(module: Any) -> bool:
    return isinstance(module, nn.Module) and not any(True for _ in module.parameters())


def _pointwise(analysis: Analysis, neighbour: Neighbour) -> bool:
    """Whether taking a component commutes with this layer of the chain after a conv."""
    if neighbour.kind == "dropout":
        return True
    if neighbour.kind != "norm" or not neighbour.is_module:
        return False
    return isinstance(analysis.model.get_submodule(neighbour.target), _BATCH_NORMS)


class _Graphs:
    """The analysis graphs of the fx regions the sites are in: positions and joins."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self._graphs: dict[str, StrideGraph | None] = {}
        self._order: dict[str, dict[str, int]] = {}

    def region(self, site: Site) -> Region | None:
        path = site.module or site.name.partition(":")[0]
        region = self.analysis.region_of(path)
        return region if region is not None and region.method == "fx" else None

    def graph(self, region: Region) -> StrideGraph | None:
        if region.path not in self._graphs:
            try:
                graph: StrideGraph | None = StrideGraph(region, self.analysis)
            except AnalysisError:
                graph = None
            self._graphs[region.path] = graph
            if graph is not None:
                self._order[region.path] = {n.name: i for i, n in enumerate(graph.nodes)}
        return self._graphs[region.path]

    def node(self, site: Site) -> fx.Node | None:
        """The call of the site in its region's graph."""
        region = self.region(site)
        graph = self.graph(region) if region is not None else None
        if region is None or graph is None:
            return None
        if site.functional:
            name = site.name.partition(":")[2]
            return next((n for n in graph.nodes if n.name == name), None)
        return next(
            (
                n
                for n in graph.nodes
                if n.op == "call_module" and region.qualify(str(n.target)) == site.module
            ),
            None,
        )

    def one_input(self, site: Site, node: str) -> bool:
        """Whether the call at `node` (in the site's graph) takes one tensor and nothing else,
        so that `Sequential(sampler, module)` can stand for it."""
        region = self.region(site)
        graph = self.graph(region) if region is not None else None
        if graph is None:
            return False
        call = next((n for n in graph.nodes if n.name == node), None)
        return call is not None and len(call.args) == 1 and not call.kwargs

    def position(self, site: Site, node: str | None, offset: float) -> float:
        """Where a sampler placed just after (`offset` 0.5) or before (-0.5) the node named
        `node` (a neighbour of the site; None: the site's own call) runs, in graph order."""
        region = self.region(site)
        if region is None or self.graph(region) is None:
            return float("inf")
        order = self._order[region.path]
        if node is None:
            call = self.node(site)
            node = call.name if call is not None else ""
        return order.get(node, len(order)) + offset

    def groups(
        self, placements: Sequence[Placement]
    ) -> tuple[list[list[Placement]], dict[str, str]]:
        """Groups (of two or more) of target sites that meet at a join, coming from one input
        stage with one stride; and per site, a note on a join it shares with a strided layer
        that is not a target."""
        targets: dict[fx.Node, Placement] = {}
        for p in placements:
            node = self.node(p.site)
            if node is not None:
                targets[node] = p
        parent = {p.site.name: p.site.name for p in placements}

        def find(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        notes: dict[str, str] = {}
        graphs = {id(g): g for g in self._graphs.values() if g is not None}
        for graph in graphs.values():
            strided = [
                n for n, rule in graph.rules.items() if rule.kind == "layer" and rule.factor != 1
            ]
            reached: dict[fx.Node, list[fx.Node]] = {}
            for node in strided:
                for join in _joins(node, set(strided)):
                    reached.setdefault(join, []).append(node)
            for join, nodes in reached.items():
                for a in nodes:
                    for b in nodes:
                        if a is b or a not in targets or _key(graph, a) != _key(graph, b):
                            continue
                        site = targets[a].site
                        if b not in targets:
                            kept = (
                                graph.region.qualify(str(b.target))
                                if b.op == "call_module"
                                else graph.where(b)
                            )
                            notes[site.name] = (
                                f"the join at {graph.where(join)} also takes {kept}, which "
                                "does not share this component: that join is not shift-invariant"
                            )
                        elif not _same_rows(targets[b].site, site):
                            other = targets[b].site
                            notes[site.name] = (
                                f"the join at {graph.where(join)} also takes {other.name}, whose "
                                f"input batch is {_batch(other)} against {_batch(site)} here (its "
                                "samples folded with another dimension, such as attention heads): "
                                "they cannot share a component, so that join is not "
                                "shift-invariant"
                            )
                        elif targets[b].site.stride == site.stride:
                            parent[find(site.name)] = find(targets[b].site.name)
        members: dict[str, list[Placement]] = {}
        for p in placements:
            members.setdefault(find(p.site.name), []).append(p)
        return [g for g in members.values() if len(g) > 1], notes


def _batch(site: Site) -> int | None:
    """The batch the site saw in the analysis (None: unknown)."""
    return site.in_shape[0] if site.in_shape else None


def _same_rows(a: Site, b: Site) -> bool:
    """Whether two samplers may share a selection: it is made per row of the batch, so their
    rows must be the same samples (MViT's attention pools see batch x heads, its skip pool the
    batch); where a batch is unknown, as before."""
    return _batch(a) is None or _batch(b) is None or _batch(a) == _batch(b)


def _key(graph: StrideGraph, node: fx.Node) -> tuple[Fraction | None, Fraction]:
    """What parallel samplers must share: the stage of their input and their stride."""
    src = graph.input_of(node)
    stage = graph.original.get(src) if src is not None else None
    return stage, graph.rules[node].factor


def _joins(start: fx.Node, stops: set[fx.Node]) -> set[fx.Node]:
    """The joins (nodes taking two or more maps) reachable from `start` before the next
    strided layer."""
    seen: set[fx.Node] = set()
    found: set[fx.Node] = set()
    todo = list(start.users)
    while todo:
        node = todo.pop()
        if node in seen or node in stops or node.op == "output":
            continue
        seen.add(node)
        if sum(ranked(i) for i in set(node.all_input_nodes)) >= 2:
            found.add(node)
        todo.extend(node.users)
    return found
