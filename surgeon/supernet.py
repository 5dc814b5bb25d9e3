"""A mixture of weight-sharing supernets whose downsampling layers move (Balanced Mixture of
SuperNets, Javan et al., arXiv 2306.11982).

    mixture = SupernetMixture(model, space, candidates, supernets=4, seed=0)
    mixture.select(i)                     # every supernet now downsamples at candidates[i]
    outputs = mixture(images)             # one output per supernet

A *supernet* is a copy of the model whose strides are switched per step: moving a ×2 step
changes only the stride, padding and dilation of convolution and pooling layers, never a
weight's shape, so every placement shares the supernet's weights. `select` sets those
attributes through a `ModelEditor` (the same `SetAttrs` edits and the same geometry,
`regeometry`, that `relocate` applies when `surgeon patch` runs the placement's policy) and
rolls the previous placement back first. The asymmetric pads that `relocate` puts in a
`StridePad` wrapper are applied by a forward pre-hook instead, so the supernets' module tree and
state-dict keys never change while they train.

The mixture holds K supernets and an *assignment*: one row of K logits per candidate
placement, whose softmax says how much each supernet is that placement's. It is a buffer, not a
parameter: `update_assignment` moves it (see its docstring and docs/search.md) and it is saved
with the weights in every state checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from surgeon.edits import ModelEditor
from surgeon.geometry import Geometry, regeometry
from surgeon.layers.stride_pad import StridePad
from surgeon.placements import Placement

__all__ = [
    "LayerSetting",
    "MovableStrides",
    "SupernetMixture",
    "balance_penalty",
    "balanced_routes",
    "layer_settings",
    "update_assignment",
]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}
_PAD_MODES["circular"] = "circular"

LayerSetting = tuple[dict[str, Any], StridePad | None]
"""A layer's attributes (stride, padding, dilation) in one placement, and its explicit pad."""


def layer_settings(
    geometries: Mapping[str, Geometry], placement: Placement
) -> dict[str, LayerSetting]:
    """What every candidate layer that `placement` changes gets: the attributes `relocate` sets
    (`regeometry` of its built geometry at stride 2 if it downsamples, 1 if not) and the pad
    `relocate` would wrap it in. Layers at their built stride are left out."""
    chosen = set(placement.layers)
    out: dict[str, LayerSetting] = {}
    for name, g in geometries.items():
        stride = 2 if name in chosen else 1
        if g.stride == (stride,) * len(g.stride):
            continue
        r = regeometry(g, stride, 1)
        attrs: dict[str, Any] = {"stride": r.stride, "padding": r.padding}
        if g.op != "avg_pool":
            attrs["dilation"] = r.dilation
        pad = None
        if r.pad is not None:
            if g.op == "max_pool":
                pad = StridePad(r.pad, "constant", -math.inf)
            else:
                pad = StridePad(r.pad, _PAD_MODES.get(g.padding_mode, "constant"))
        out[name] = (attrs, pad)
    return out


class MovableStrides:
    """One model whose candidate layers take the strides of any placement, in place."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        self.geometries = {name: Geometry.of(model.get_submodule(name)) for name in layers}
        self.pads: dict[str, StridePad | None] = dict.fromkeys(layers)
        self.editor = ModelEditor(model)
        self.hooks = [
            model.get_submodule(name).register_forward_pre_hook(partial(self._pad, name))
            for name in layers
        ]

    def _pad(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        pad = self.pads[name]
        return None if pad is None else (pad(args[0]), *args[1:])

    def apply(self, settings: Mapping[str, LayerSetting]) -> None:
        """Undo the previous placement's edits, then set this one's (from `layer_settings`)."""
        self.editor.rollback()
        self.pads = dict.fromkeys(self.pads)
        for name, (attrs, pad) in settings.items():
            self.editor.set_attrs(name, **attrs)
            self.pads[name] = pad

    def close(self) -> None:
        """Back to the built strides, hooks removed."""
        self.editor.rollback()
        for hook in self.hooks:
            hook.remove()


class SupernetMixture(nn.Module):
    """K supernets (copies of `model`'s weights) and the placement→supernet assignment.

    `forward` returns the K supernets' outputs for the placement `select` set. The assignment
    logits start as seeded noise of standard deviation `init_scale`: the supernets start as
    identical copies, so the noise is what gives the first routes (`assigned`) a random
    balanced partition of the placements to specialise on."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        placements: Sequence[Placement],
        *,
        supernets: int,
        seed: int = 0,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if supernets < 1:
            raise ValueError("a mixture needs at least one supernet")
        self.placements = tuple(placements)
        self.supernets = nn.ModuleList(copy.deepcopy(model) for _ in range(supernets))
        self.movable = [MovableStrides(net, layers) for net in self.supernets]
        geometries = self.movable[0].geometries
        self.settings = [layer_settings(geometries, p) for p in self.placements]
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(len(self.placements), supernets, generator=gen) * init_scale
        self.assignment: Tensor
        self.register_buffer("assignment", logits if supernets > 1 else torch.zeros_like(logits))
        self.selected: int | None = None

    def select(self, index: int) -> None:
        """Make every supernet downsample at placement `index`."""
        if index == self.selected:
            return
        for movable in self.movable:
            movable.apply(self.settings[index])
        self.selected = index

    def forward(self, images: Tensor) -> tuple[Any, ...]:
        return tuple(net(images) for net in self.supernets)

    def probabilities(self) -> Tensor:
        """(placements, supernets): how much each supernet is each placement's."""
        return torch.softmax(self.assignment.float(), dim=-1)

    def assigned(self) -> list[int]:
        """The supernet each placement is scored with: `balanced_routes` of the assignment, so
        that each supernet scores at most ⌈placements / K⌉ of them."""
        capacity = math.ceil(len(self.placements) / len(self.supernets))
        return balanced_routes(self.probabilities(), capacity)

    def shares(self) -> list[float]:
        """The fraction of placements each supernet scores (`assigned`)."""
        counts = torch.bincount(torch.tensor(self.assigned()), minlength=len(self.supernets))
        return [float(c) / max(1, len(self.placements)) for c in counts]

    def close(self) -> None:
        """Every supernet back at its built strides, hooks removed."""
        for movable in self.movable:
            movable.close()
        self.selected = None


def balanced_routes(probabilities: Tensor, capacity: int) -> list[int]:
    """One supernet per placement, at most `capacity` placements per supernet: the most probable
    (placement, supernet) pairs first, each placement taken once, each supernet until full.

    The penalty of `balance_penalty` balances the *expected* shares, which a row that spreads
    evenly over every supernet also satisfies; this capacity constraint makes the hard
    assignment balanced too, whatever the logits."""
    placements, supernets = probabilities.shape
    if capacity * supernets < placements:
        raise ValueError(f"{supernets} supernets of capacity {capacity} cannot take {placements}")
    order = torch.argsort(probabilities.flatten(), descending=True, stable=True).tolist()
    routes: list[int | None] = [None] * placements
    load = [0] * supernets
    for flat in order:
        i, k = divmod(int(flat), supernets)
        if routes[i] is None and load[k] < capacity:
            routes[i] = k
            load[k] += 1
    return [int(k) for k in routes if k is not None]


def balance_penalty(probabilities: Tensor) -> Tensor:
    """K·Σₖ P̄ₖ² − 1, where P̄ₖ is supernet k's mean probability over all placements: 0 when
    every supernet carries an equal share, K − 1 when one carries every placement."""
    usage = probabilities.mean(0)
    return usage.numel() * (usage**2).sum() - 1


def update_assignment(
    assignment: Tensor, row: int, losses: Tensor, *, lr: float, balance: float
) -> Tensor:
    """One gradient step on the assignment logits, in place; returns the balance penalty.

    The objective is J = Σₖ pₖ(row)·Lₖ + balance·B(P): the expected loss of placement `row`
    when it is routed to supernet k with probability pₖ (its gradient moves the row towards
    the supernets that fit it best: ∂J/∂αₖ = pₖ(Lₖ − Σⱼ pⱼLⱼ)), plus the balance penalty of
    `balance_penalty` over every placement, which pulls the shares back towards equal so that
    no supernet takes every placement. `losses` are the K supernets' losses on the batch
    (detached, and the same on every process)."""
    logits = assignment.detach().float().clone().requires_grad_(True)
    probabilities = torch.softmax(logits, dim=-1)
    expected = (probabilities[row] * losses.detach().float().to(logits.device)).sum()
    penalty = balance_penalty(probabilities)
    (grad,) = torch.autograd.grad(expected + balance * penalty, logits)
    with torch.no_grad():
        assignment -= (lr * grad).to(assignment.dtype)
    return penalty.detach()
