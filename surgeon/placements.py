"""Where a model downsamples: stages along the graph, legal placements, and layer geometry.

A *placement* is the set of layers that downsample (stride 2). It is legal when every join of
the graph (a residual add, a concatenation, a multiplication) still receives maps of one
resolution, every flatten sees the resolution it was built for, and the model's outputs keep
their size. Balanced Mixture of SuperNets (Javan et al., arXiv 2306.11982) shows that
where these layers sit matters; `PlacementSpace` lists the legal placements so that a search can
train them with its own loop, and `placement_policy` turns one into a policy for `patch`.

The same stage model serves the `relocate` and `dilate` rewrites: they check a change of strides
with `StrideGraph.stages` before editing, and use `resize_layer` to set a layer's stride,
dilation and padding so that spatial sizes stay consistent.

Stages are cumulative strides (1, 2, 4, ...) at each node of an fx graph, computed from the
layers' strides rather than from shapes, so that a change can be checked without running the
model. Nodes whose size does not follow their input (adaptive pools, an interpolation to a
constant size) have no stage and join anything.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _reverse_repeat_tuple

from surgeon.errors import AnalysisError
from surgeon.sites import resampling
from surgeon.trace import Analysis, Region, analyse

if TYPE_CHECKING:
    from surgeon.policy import Policy

__all__ = [
    "Geometry",
    "Layer",
    "Placement",
    "PlacementSpace",
    "Problem",
    "Resize",
    "StrideGraph",
    "StridePad",
    "placement_policy",
    "regeometry",
    "resize_layer",
]

Stage = Fraction | None
LayerOp = Literal["conv", "max_pool", "avg_pool"]
_Kind = Literal[
    "input", "const", "layer", "scale", "resize_to", "fixed", "flatten", "pass", "output"
]
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm"}
_SAME_TYPES = ("Conv2dSame", "StdConv2dSame", "MaxPool2dSame", "AvgPool2dSame")


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _ranked(node: Any) -> bool:
    """True for a tensor with spatial dims (N, C, *spatial)."""
    shape = _shape(node)
    return shape is not None and len(shape) >= 3


def _text(stage: Stage) -> str:
    return "a fixed size" if stage is None else f"output stride {stage}"


@dataclass(frozen=True)
class Layer:
    """A convolution or pooling module, called once, whose stride can be changed."""

    name: str  # qualified module path in the model
    op: LayerOp
    stride: int
    node: fx.Node = field(compare=False, repr=False)
    module: nn.Module = field(compare=False, repr=False)


@dataclass(frozen=True)
class Problem:
    """Why a change of strides is refused: a join, a flatten or an output would not fit, or a
    named layer cannot carry a stride."""

    kind: Literal["join", "flatten", "output", "layer"]
    where: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class _Rule:
    kind: _Kind
    factor: Fraction = Fraction(1)  # layer: its stride; scale: the stage multiplier
    layer: str = ""  # a movable layer's name
    source: fx.Node | None = None  # resize_to: the tensor whose size is taken


def _tensor_source(node: Any) -> fx.Node | None:
    """The tensor an `x.shape[-2:]`-like size expression reads."""
    while isinstance(node, fx.Node):
        if _shape(node) is not None:
            return node
        node = node.args[0] if node.args else None
    return None


def _layer_op(module: nn.Module) -> LayerOp | None:
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return "conv"
    if isinstance(module, nn.modules.pooling._MaxPoolNd):
        return "max_pool"
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        return "avg_pool"
    return None


class StrideGraph:
    """The stage (cumulative stride) of every node of one fx region, for any choice of strides."""

    def __init__(self, region: Region, analysis: Analysis) -> None:
        if region.method != "fx" or region.graph is None:
            raise AnalysisError(
                f"{region.path or 'the model'} has no torch.fx graph ({region.method})"
            )
        self.region = region
        self.nodes = list(region.graph.nodes)
        root = region.graph_module if region.graph_module is not None else region.module
        uses = Counter(n.target for n in self.nodes if n.op == "call_module")
        self.layers: dict[str, Layer] = {}
        self.modules: list[tuple[fx.Node, nn.Module]] = []  # every conv/pool module call
        self.rules = {node: self._rule(node, root, uses, analysis) for node in self.nodes}
        self.original: dict[fx.Node, Stage] = {}
        self.original, _ = self.stages({})

    @classmethod
    def of(cls, analysis: Analysis, path: str = "") -> StrideGraph:
        """The graph of the fx region that covers the module at `path` (the model by default)."""
        region = (
            analysis.region_of(path)
            if path
            else next((r for r in analysis.regions if r.path == "" and r.method != "hooks"), None)
        )
        if region is None or region.method != "fx":
            how = region.method if region is not None else "hooks"
            raise AnalysisError(
                f"{path or 'the model'} is not covered by a torch.fx graph (found by {how}); "
                "stride changes need the graph to check every join"
            )
        return cls(region, analysis)

    def where(self, node: fx.Node) -> str:
        """`layer2.0 (add)`: the module whose forward makes the call, and the node."""
        stack = node.meta.get("nn_module_stack") or {}
        owner = self.region.qualify(str(list(stack.values())[-1][0])) if stack else self.region.path
        return f"{owner} ({node.name})" if owner else node.name

    def _rule(
        self, node: fx.Node, root: nn.Module, uses: Counter[Any], analysis: Analysis
    ) -> _Rule:
        if node.op == "placeholder":
            return _Rule("input")
        if node.op == "get_attr":
            return _Rule("const")
        if node.op == "output":
            return _Rule("output")
        res = resampling(node, root)
        if res is not None:
            if res.op.startswith("adaptive"):
                return _Rule("fixed")
            if res.op == "interpolate":
                if isinstance(res.size, fx.Node):
                    return _Rule("resize_to", source=_tensor_source(res.size))
                if res.size is not None or not res.scale:
                    return _Rule("fixed")
                return _Rule("scale", 1 / Fraction(max(res.scale)).limit_denominator(64))
            if res.op in ("conv_transpose", "pixel_shuffle"):
                return _Rule("scale", Fraction(1, max(res.stride)))
            stride = max(res.stride, default=1)
            if node.op == "call_module":
                module = root.get_submodule(str(node.target))
                op = _layer_op(module)
                name = self.region.qualify(str(node.target))
                if op is not None:
                    self.modules.append((node, module))
                single = uses[node.target] == 1 and len(analysis.calls.get(name, ())) <= 1
                if op is not None and single and len(set(res.stride)) == 1:
                    self.layers[name] = Layer(name, op, stride, node, module)
                    return _Rule("layer", Fraction(stride), layer=name)
            return _Rule("layer", Fraction(stride))
        out, first = _shape(node), _shape(node.args[0] if node.args else None)
        spatial_in = any(_ranked(i) for i in node.all_input_nodes)
        target = (
            node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        )
        if out is not None and spatial_in and first is not None:
            if target in _REDUCTIONS and (len(out) < 3 or math.prod(out[2:]) == 1):
                return _Rule("fixed")
            if len(out) < 3:
                return _Rule("flatten")
            if math.prod(out[2:]) == 1 and len(first) >= 3 and math.prod(first[2:]) > 1:
                return _Rule("fixed")
        return _Rule("pass")

    def evaluate(
        self,
        node: fx.Node,
        stage_of: Callable[[fx.Node], Stage],
        stride_of: Callable[[str, Fraction], Fraction],
    ) -> tuple[Stage, Problem | None]:
        """The stage at `node` from its inputs' stages, or the problem that stops it."""
        rule = self.rules[node]
        if rule.kind == "input":
            return Fraction(1), None
        if rule.kind in ("const", "fixed"):
            return None, None
        if rule.kind == "resize_to":
            return (stage_of(rule.source) if rule.source is not None else None), None
        if rule.kind == "output":
            for item in node.all_input_nodes:
                before, after = self.original.get(item), stage_of(item)
                if self.original and _ranked(item) and before is not None and after != before:
                    message = (
                        f"the model's output {item.name} would be at {_text(after)} instead of "
                        f"{before}: its size would change"
                    )
                    return None, Problem("output", item.name, message)
            return None, None
        if rule.kind in ("layer", "scale"):
            src = node.args[0] if node.args else None
            value = stage_of(src) if isinstance(src, fx.Node) else None
            if value is None:
                return None, None
            if rule.kind == "scale":
                return value * rule.factor, None
            return value * (stride_of(rule.layer, rule.factor) if rule.layer else rule.factor), None
        # a map broadcast into a product after a global pool has no stage and joins anything
        seen = {stage_of(i) for i in node.all_input_nodes if _ranked(i)} - {None}
        if len(seen) > 1:
            low, high = sorted(seen)[:2]  # type: ignore[type-var]
            where = self.where(node)
            message = f"the join at {where} would get maps at output strides {low} and {high}"
            return None, Problem("join", where, message)
        joined: Stage = seen.pop() if seen else None
        if joined is None:
            joined = next((s for s in map(stage_of, node.all_input_nodes) if s is not None), None)
        if rule.kind == "flatten":
            before = self.original.get(node.args[0]) if node.args else None  # type: ignore[arg-type]
            if self.original and joined is not None and before is not None and joined != before:
                where = self.where(node)
                message = (
                    f"{where} flattens a map made for output stride {before}; it would get "
                    f"output stride {joined}"
                )
                return None, Problem("flatten", where, message)
            return None, None
        return joined, None

    def stages(self, strides: Mapping[str, int]) -> tuple[dict[fx.Node, Stage], list[Problem]]:
        """Stages with the movable layers named in `strides` set to those strides, and every
        problem found (joins of different stages, flattens and outputs that would change)."""
        stage: dict[fx.Node, Stage] = {}
        problems: list[Problem] = []

        def stride_of(name: str, default: Fraction) -> Fraction:
            return Fraction(strides[name]) if name in strides else default

        for node in self.nodes:
            value, problem = self.evaluate(node, lambda n: stage.get(n), stride_of)
            stage[node] = value
            if problem is not None:
                problems.append(problem)
        return stage, problems

    def input_of(self, node: fx.Node) -> fx.Node | None:
        src = node.args[0] if node.args else None
        return src if isinstance(src, fx.Node) else None

    def factor(self, stages: Mapping[fx.Node, Stage], node: fx.Node) -> Fraction:
        """How much larger the map entering `node` is than originally (1 when unknown)."""
        src = self.input_of(node)
        before, after = self.original.get(src) if src else None, stages.get(src) if src else None
        if before is None or after is None or after == 0:
            return Fraction(1)
        return before / after


# ---------------------------------------------------------------------------------------------
# Placements: which sets of layers may downsample


@dataclass(frozen=True)
class Placement:
    """The layers that downsample (stride 2), in execution order, and the steps they make."""

    layers: tuple[str, ...]
    steps: int  # the number of ×2 downsampling steps; the output stride is 2**steps

    @property
    def output_stride(self) -> int:
        return 2**self.steps

    def text(self) -> str:
        """The form `relocate`'s `placement` parameter takes: names separated by spaces."""
        return " ".join(self.layers)


class PlacementSpace:
    """The legal placements of ×2 downsampling layers in a model (one torch.fx graph).

    Candidates are the convolution and max/average pooling modules called once, with stride 1
    or 2, on a map whose resolution follows the input (not inside a squeeze-excitation branch
    after a global pool); a candidate only downsamples where its map, in that placement and at
    the example input's size, is at least 2×2. Layers with other strides stay as they are.
    A placement counts `steps` as the largest number of ×2 steps on any path (output stride
    2**steps); parallel layers of one step (a residual branch and its strided shortcut) are
    listed together.
    """

    def __init__(self, graph: StrideGraph) -> None:
        self.graph = graph
        self.candidates: tuple[Layer, ...] = tuple(
            layer
            for layer in graph.layers.values()
            if layer.stride in (1, 2) and self._may_downsample(layer)
        )
        self._candidate_names = {layer.name for layer in self.candidates}
        current = tuple(layer.name for layer in self.candidates if layer.stride == 2)
        top = max((s for n, s in graph.original.items() if s is not None and _ranked(n)), default=1)
        self.current = Placement(current, round(math.log2(top)))

    @classmethod
    def of(cls, model: nn.Module, example_input: Any) -> PlacementSpace:
        """The placement space of `model` on `example_input` (a tensor or a tuple of args)."""
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        return cls(StrideGraph.of(analyse(model, args)))

    def _may_downsample(self, layer: Layer) -> bool:
        # the map must follow the input; whether it is large enough to halve depends on the
        # placement and is checked per placement (`_min_size`)
        src = self.graph.input_of(layer.node)
        stage = self.graph.original.get(src) if src is not None else None
        return stage is not None and _ranked(src)

    def _min_size(self, layer: Layer, stage: Fraction) -> float:
        src = self.graph.input_of(layer.node)
        shape, before = _shape(src), self.graph.original.get(src) if src else None
        if shape is None or before is None:
            return math.inf
        return min(shape[2:]) * float(before / stage)

    def check(self, layers: Sequence[str]) -> list[Problem]:
        """Why the placement `layers` is illegal (empty when it is legal)."""
        unknown = [n for n in layers if n not in self._candidate_names]
        if unknown:
            where = unknown[0]
            return [
                Problem(
                    "layer",
                    where,
                    f"{where} is not a candidate layer (a conv or pool "
                    "module called once, with stride 1 or 2, on a map that follows the input)",
                )
            ]
        chosen = set(layers)
        strides = {layer.name: 2 if layer.name in chosen else 1 for layer in self.candidates}
        return self.graph.stages(strides)[1]

    def _branches(
        self, node: fx.Node, stage_of: Callable[[fx.Node], Stage], limit: Fraction
    ) -> list[tuple[Stage, bool]]:
        """The stages `node` may take (with whether it downsamples); [] when none is legal."""
        rule = self.graph.rules[node]
        strides: tuple[int, ...] = (1,)
        if rule.kind == "layer" and rule.layer in self._candidate_names:
            strides = (1, 2)
        out: list[tuple[Stage, bool]] = []
        for stride in strides:

            def stride_of(name: str, default: Fraction, stride: int = stride) -> Fraction:
                return Fraction(stride) if name in self._candidate_names else default

            value, problem = self.graph.evaluate(node, stage_of, stride_of)
            if problem is not None or (value is not None and value > limit):
                continue
            if stride == 2:
                layer = self.graph.layers[rule.layer]
                src_stage = stage_of(self.graph.input_of(node))  # type: ignore[arg-type]
                if src_stage is None or self._min_size(layer, src_stage) < 2:
                    continue
            out.append((value, stride == 2))
        return out

    def _last_use(self) -> dict[fx.Node, int]:
        index = {node: i for i, node in enumerate(self.graph.nodes)}
        last = {node: i for node, i in index.items()}
        for node in self.graph.nodes:
            for src in node.all_input_nodes:
                last[src] = max(last[src], index[node])
            rule = self.graph.rules[node]
            if rule.source is not None:
                last[rule.source] = max(last[rule.source], index[node])
        return last

    def counts(self, max_steps: int = 8) -> dict[int, int]:
        """How many legal placements there are for each number of steps (up to `max_steps`).

        A dynamic programme over the graph in execution order whose state is the stage of every
        node still needed later, so residual blocks multiply counts instead of enumerating them.
        """
        limit = Fraction(2**max_steps)
        last = self._last_use()
        index = {node: j for j, node in enumerate(self.graph.nodes)}
        states: dict[tuple[tuple[tuple[int, Stage], ...], Fraction], int] = {((), Fraction(1)): 1}
        for i, node in enumerate(self.graph.nodes):
            following: defaultdict[tuple[tuple[tuple[int, Stage], ...], Fraction], int] = (
                defaultdict(int)
            )
            for (frontier, top), n in states.items():
                env = dict(frontier)

                def stage_of(x: fx.Node, env: dict[int, Stage] = env) -> Stage:
                    return env.get(index.get(x, -1))

                branches = self._branches(node, stage_of, limit)
                for value, _ in branches:
                    new_top = max(top, value) if value is not None and _ranked(node) else top
                    kept = tuple((j, s) for j, s in frontier if last[self.graph.nodes[j]] > i)
                    if last[node] > i:
                        kept += ((i, value),)
                    following[(kept, new_top)] += n
            states = dict(following)
        totals: defaultdict[int, int] = defaultdict(int)
        for (_, top), n in states.items():
            totals[round(math.log2(top))] += n
        return dict(sorted(totals.items()))

    def count(self, steps: int | None = None) -> int:
        """How many legal placements make `steps` ×2 steps (default: as many as now)."""
        steps = self.current.steps if steps is None else steps
        return self.counts(max_steps=steps).get(steps, 0)

    def placements(self, steps: int | None = None) -> Iterator[Placement]:
        """Every legal placement with `steps` steps (default: as many as now), depth first,
        layers that downsample earlier first."""
        steps = self.current.steps if steps is None else steps
        limit = Fraction(2**steps)
        last = self._last_use()
        nodes = self.graph.nodes
        stack: list[tuple[int, dict[fx.Node, Stage], tuple[str, ...], Fraction]] = [
            (0, {}, (), Fraction(1))
        ]
        while stack:
            i, env, chosen, top = stack.pop()
            if i == len(nodes):
                if top == limit:
                    yield Placement(chosen, steps)
                continue
            node = nodes[i]
            branches = self._branches(node, env.get, limit)
            for value, down in branches:  # pushed last, popped first: early strides first
                following = {n: s for n, s in env.items() if last[n] > i}
                if last[node] > i:
                    following[node] = value
                new_top = max(top, value) if value is not None and _ranked(node) else top
                name = (self.graph.rules[node].layer,) if down else ()
                stack.append((i + 1, following, chosen + name, new_top))


def placement_policy(placement: Placement | Sequence[str], name: str = "placement") -> Policy:
    """A policy that applies `placement` with the `relocate` action: the listed layers downsample,
    every other candidate layer runs at stride 1."""
    from surgeon.policy_loader import policy_from_dict
    from surgeon.rewrites import action_schemas

    layers = placement.layers if isinstance(placement, Placement) else tuple(placement)
    data = {
        "name": name,
        "description": f"downsample at {len(layers)} layers: {' '.join(layers)}",
        "rules": [
            {
                "name": "placement",
                "match": {"role": ["downsample", "patchify"]},
                "action": "relocate",
                "params": {"placement": " ".join(layers)},
            }
        ],
    }
    return policy_from_dict(data, action_schemas())


# ---------------------------------------------------------------------------------------------
# Geometry: setting a layer's stride, dilation and padding


@dataclass(frozen=True)
class Geometry:
    """A convolution or pooling module's stride, dilation and padding, as built."""

    op: LayerOp
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...] | str
    dynamic_same: bool  # timm's *Same layers compute 'SAME' padding in their forward
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, module: nn.Module) -> Geometry:
        op = _layer_op(module)
        if op is None:
            raise TypeError(f"{type(module).__name__} is not a convolution or pooling layer")
        attrs = vars(module)
        kernel = attrs["kernel_size"]
        dims = len(kernel) if isinstance(kernel, tuple) else _pool_dims(module)

        def tup(value: Any) -> tuple[int, ...]:
            return (
                tuple(int(v) for v in value)
                if isinstance(value, (tuple, list))
                else (int(value),) * dims
            )

        padding = attrs.get("padding", 0)
        return cls(
            op,
            tup(kernel),
            tup(attrs.get("stride") or kernel),
            tup(attrs.get("dilation", 1)),
            padding if isinstance(padding, str) else tup(padding),
            type(module).__name__ in _SAME_TYPES,
            str(attrs.get("padding_mode", "zeros")),
        )


def _pool_dims(module: nn.Module) -> int:
    name = type(module).__name__
    return int(name[-2]) if name[-2:-1].isdigit() else 2


@dataclass(frozen=True)
class Resize:
    """A layer's new geometry: module attributes, plus an explicit pad (low, high per dimension)
    when the padding has to be asymmetric, and whether the dilation could be applied."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...] | str
    pad: tuple[tuple[int, int], ...] | None
    dilated: bool


def regeometry(g: Geometry, stride: int, factor: int = 1) -> Resize:
    """The geometry of layer `g` run at `stride` on a map `factor` times denser than it was built
    for: dilation ×factor and padding ×factor (so it reads the same inputs, `algorithme à trous`).

    A layer whose stride is removed keeps its left padding and pads the right so that its output
    has its input's size ("same"), as a 3×3 stride-2 conv with padding 1 does; then parallel
    branches (a conv and a 2×2 average-pool shortcut) still agree. Average pooling has no
    dilation: it is left undilated (`dilated` False).
    """
    dims = len(g.kernel)
    dilates = g.op != "avg_pool"
    f = factor if dilates else 1
    dilation = tuple(d * f if k > 1 else d for k, d in zip(g.kernel, g.dilation, strict=True))
    strides = (stride,) * dims
    if g.dynamic_same:
        return Resize(strides, dilation, g.padding, None, dilates or factor == 1)
    spans = [d * (k - 1) for k, d in zip(g.kernel, dilation, strict=True)]
    if g.padding == "same":
        if stride == 1:
            return Resize(strides, dilation, "same", None, dilates or factor == 1)
        lo = tuple(s // 2 for s in spans)
        hi = tuple(s - s // 2 for s in spans)
    else:
        padding = (0,) * dims if g.padding == "valid" else g.padding
        assert not isinstance(padding, str)
        lo = tuple(p * (f if k > 1 else 1) for p, k in zip(padding, g.kernel, strict=True))
        unstrided = max(g.stride) > 1 and stride == 1
        hi = tuple(
            s - low if unstrided and s >= low else low for s, low in zip(spans, lo, strict=True)
        )
    if lo == hi and not (
        g.op == "max_pool" and any(p > k // 2 for p, k in zip(lo, g.kernel, strict=True))
    ):
        return Resize(strides, dilation, lo, None, dilates or factor == 1)
    same = tuple((s // 2, s - s // 2) for s in spans)
    if g.op == "conv" and stride == 1 and tuple(zip(lo, hi, strict=True)) == same:
        return Resize(strides, dilation, "same", None, dilates or factor == 1)
    return Resize(
        strides, dilation, (0,) * dims, tuple(zip(lo, hi, strict=True)), dilates or factor == 1
    )


class StridePad(nn.Module):
    """Pads a map (low, high per spatial dimension) before a layer whose padding is asymmetric.

    Max pooling pads with -inf (as its own padding does), convolutions per their padding_mode,
    average pooling with zeros. No parameters, so nothing is added to the state dict.
    """

    def __init__(
        self, pad: tuple[tuple[int, int], ...], mode: str = "constant", value: float = 0.0
    ) -> None:
        super().__init__()
        self.pad = pad
        self.mode = mode
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = tuple(v for low_high in reversed(self.pad) for v in low_high)
        if self.mode == "constant":
            return F.pad(x, flat, value=self.value)
        return F.pad(x, flat, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode}" + (
            f", value={self.value}" if self.mode == "constant" else ""
        )


_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _set_at(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def resize_layer(model: nn.Module, module: nn.Module, g: Geometry, resize: Resize) -> str:
    """Set `resize` on `module` inside `model`; wraps it as `Sequential(StridePad, module)` when
    the padding is asymmetric (and unwraps it when no longer needed). Returns the path of what
    now stands where the layer was."""
    module.stride = resize.stride  # type: ignore[assignment]
    if g.op != "avg_pool":
        module.dilation = resize.dilation  # type: ignore[assignment]
    module.padding = resize.padding  # type: ignore[assignment]
    if g.op == "conv" and hasattr(module, "_reversed_padding_repeated_twice"):
        if isinstance(resize.padding, str):
            pairs = [(0, 0)] * len(g.kernel)
            if resize.padding == "same":
                spans = [d * (k - 1) for k, d in zip(g.kernel, resize.dilation, strict=True)]
                pairs = [(s // 2, s - s // 2) for s in spans]
            module._reversed_padding_repeated_twice = [  # type: ignore[assignment]
                v for low_high in reversed(pairs) for v in low_high
            ]
        else:
            module._reversed_padding_repeated_twice = list(  # type: ignore[assignment]
                _reverse_repeat_tuple(resize.padding, 2)
            )
    path = _path_of(model, module)
    if path is None:
        raise ValueError(f"{type(module).__name__} is no longer part of the model")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    wrapped = (
        isinstance(parent, nn.Sequential)
        and attr == "1"
        and len(parent) == 2
        and isinstance(parent[0], StridePad)
    )
    if resize.pad is None:
        if wrapped:
            _set_at(model, parent_path, module)
            return parent_path
        return path
    if wrapped:
        pad = parent[0]  # type: ignore[index]
        pad.pad = resize.pad
        return parent_path
    if g.op == "max_pool":
        pad = StridePad(resize.pad, "constant", -math.inf)
    else:
        pad = StridePad(resize.pad, _PAD_MODES.get(g.padding_mode, "constant"))
    _set_at(model, path, nn.Sequential(pad, module))
    return path
