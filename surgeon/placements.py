"""Legal placements of the downsampling layers: which sets of layers may run at stride 2.

A *placement* is the set of layers that downsample (stride 2). It is legal when every join of
the graph (a residual add, a concatenation, a multiplication) still receives maps of one
resolution, every flatten sees the resolution it was built for, and the model's outputs keep
their size (`StrideGraph.stages`). Balanced Mixture of SuperNets (Javan et al., arXiv
2306.11982) shows that where these layers sit matters; `PlacementSpace` lists the legal
placements so that a search can train them with its own loop, and `placement_policy` turns one
into a policy for `patch` (the `relocate` action).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from torch import fx, nn

from surgeon.calls import meta_shape
from surgeon.policy import Policy
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import action_schemas
from surgeon.strides import Layer, Problem, Stage, StrideGraph, ranked
from surgeon.trace import analyse

__all__ = ["Placement", "PlacementSpace", "placement_policy"]


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
        top = max((s for n, s in graph.original.items() if s is not None and ranked(n)), default=1)
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
        return stage is not None and ranked(src)

    def _min_size(self, layer: Layer, stage: Fraction) -> float:
        src = self.graph.input_of(layer.node)
        shape, before = meta_shape(src), self.graph.original.get(src) if src else None
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
                    new_top = max(top, value) if value is not None and ranked(node) else top
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
                new_top = max(top, value) if value is not None and ranked(node) else top
                name = (self.graph.rules[node].layer,) if down else ()
                stack.append((i + 1, following, chosen + name, new_top))


def placement_policy(placement: Placement | Sequence[str], name: str = "placement") -> Policy:
    """A policy that applies `placement` with the `relocate` action: the listed layers downsample,
    every other candidate layer runs at stride 1."""

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
