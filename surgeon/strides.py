"""The stride algebra: the stage (cumulative stride) of every node of a traced graph.

Two readings of one model of stages, both in this module: `measured_stages` reads them from the
traced shapes (what a site's `stage_in`/`stage_out` report, per spatial dimension, dividing
where a map grows), and `StrideGraph` computes them from the layers' strides, so that a change
of strides (dilate, relocate, a placement) can be checked without running the model: every join
(a residual add, a concatenation) must receive maps of one stage, every flatten the stage it was
built for, and the model's outputs keep their size. Nodes whose size does not follow their input
(adaptive pools, an interpolation to a constant size) have no stage and join anything.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from torch import fx, nn

from surgeon.calls import meta_shape, resampling
from surgeon.errors import AnalysisError
from surgeon.neighbours import GraphView
from surgeon.trace import Analysis, Region

__all__ = [
    "UNIT_STAGE",
    "Layer",
    "LayerOp",
    "Problem",
    "Stage",
    "StageVector",
    "StrideGraph",
    "join_stage",
    "layer_op",
    "measured_stages",
    "ranked",
    "stage_vector",
    "upsamples",
]

# ---------------------------------------------------------------------------------------------
# Stages read from the traced shapes (per spatial dimension)


def upsamples(src: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """True when a node maps an image-like (N, C, *spatial) tensor to a larger map: same batch,
    no spatial dim smaller, and both trailing dims larger. A linear layer or a transpose on
    token tensors ((B, N, C), (B, H, W, C)) grows only the last dim or swaps two, so it is not
    mistaken for upsampling (that reset the stage of every site after a transformer MLP)."""
    if len(out) != len(src) or len(out) < 4 or out[0] != src[0]:
        return False
    if any(o < i for o, i in zip(out[2:], src[2:], strict=True)):
        return False
    return out[-1] > src[-1] > 0 and out[-2] > src[-2] > 0


# A stage is the cumulative stride per spatial dim, aligned to the trailing dims (T, H, W):
# a 2-d site's stride (s_h, s_w) counts as (1, s_h, s_w). Per dim, because factorised video
# blocks stride one dim at a time: R(2+1)D's (1,2,2) then (2,1,1) convs reach (2,2,2), the
# stage of their (2,2,2) shortcut, where a product of per-site maxima would say 4.
StageVector = tuple[float, float, float]
UNIT_STAGE: StageVector = (1.0, 1.0, 1.0)


def stage_vector(stride: tuple[int, ...]) -> StageVector:
    padded = (1,) * max(0, 3 - len(stride)) + tuple(stride)
    return (float(padded[-3]), float(padded[-2]), float(padded[-1]))


def join_stage(inputs: list[fx.Node], stage: dict[fx.Node, StageVector]) -> StageVector:
    """The stage a node inherits: the largest stage among its inputs with the most elements.
    A join keeps the layout of its biggest operand (attention's queries over keys pooled
    8× more, `x * se_scale`, `x + pos_embed`), so a smaller operand's stage does not leak in."""
    if not inputs:
        return UNIT_STAGE
    sized = [(math.prod(shape) if (shape := meta_shape(i)) else 0, stage[i]) for i in inputs]
    top = max(n for n, _ in sized)
    tied = [value for n, value in sized if n == top]
    return (max(v[0] for v in tied), max(v[1] for v in tied), max(v[2] for v in tied))


def measured_stages(
    view: GraphView, site_strides: dict[fx.Node, tuple[int, ...]]
) -> dict[fx.Node, StageVector]:
    """Cumulative stride per spatial dim at each node's output: products of site strides along
    the graph, divided where the spatial size grows (upsampling); the region's inputs are 1."""
    stage: dict[fx.Node, StageVector] = {}
    for node in view.nodes:
        inputs = [i for i in node.all_input_nodes if i in stage]
        value = join_stage(inputs, stage)
        if node in site_strides:
            step = stage_vector(site_strides[node])
            value = (value[0] * step[0], value[1] * step[1], value[2] * step[2])
        elif inputs and node.op in ("call_function", "call_module", "call_method"):
            out = meta_shape(node)
            # the largest input: a 1×1 map broadcast into a product (squeeze-excitation's
            # `x * scale`) is not upsampling
            shapes = [s for s in map(meta_shape, inputs) if s and out and len(s) == len(out)]
            src = max(shapes, key=lambda s: s[-1], default=None)
            if out and src and upsamples(src, out):
                dims = min(3, len(out) - 2)
                growth = [1.0, 1.0, 1.0]
                for k in range(1, dims + 1):
                    growth[-k] = max(1.0, out[-k] / src[-k])
                value = (value[0] / growth[0], value[1] / growth[1], value[2] / growth[2])
        stage[node] = value
    return stage


# ---------------------------------------------------------------------------------------------
# Stages computed from strides (for any choice of strides)

Stage = Fraction | None
LayerOp = Literal["conv", "max_pool", "avg_pool"]
_Kind = Literal[
    "input", "const", "layer", "scale", "resize_to", "fixed", "flatten", "pass", "output"
]
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm"}


def ranked(node: Any) -> bool:
    """True for a tensor with spatial dims (N, C, *spatial)."""
    shape = meta_shape(node)
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
        if meta_shape(node) is not None:
            return node
        node = node.args[0] if node.args else None
    return None


def layer_op(module: nn.Module) -> LayerOp | None:
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
        owner = self.region.owner(node)
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
                op = layer_op(module)
                name = self.region.qualify(str(node.target))
                if op is not None:
                    self.modules.append((node, module))
                single = uses[node.target] == 1 and len(analysis.calls.get(name, ())) <= 1
                if op is not None and single and len(set(res.stride)) == 1:
                    self.layers[name] = Layer(name, op, stride, node, module)
                    return _Rule("layer", Fraction(stride), layer=name)
            return _Rule("layer", Fraction(stride))
        out, first = meta_shape(node), meta_shape(node.args[0] if node.args else None)
        spatial_in = any(ranked(i) for i in node.all_input_nodes)
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
                if self.original and ranked(item) and before is not None and after != before:
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
        seen = {stage_of(i) for i in node.all_input_nodes if ranked(i)} - {None}
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
