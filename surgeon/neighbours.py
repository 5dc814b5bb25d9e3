"""Neighbours of a site in the analysis graph: what feeds it and the chain that follows it.

Rewrites use them to place layers (an anti-aliasing blur after the activation that follows a
strided conv, as in Zhang 2019).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.calls import FUNCTION_OPS
from surgeon.trace import Analysis, Region

__all__ = ["GraphView", "Neighbour", "NeighbourKind", "function_kind", "module_kind"]

NeighbourKind = Literal["norm", "act", "conv", "pool", "dropout", "add", "other"]


@dataclass(frozen=True)
class Neighbour:
    """A node next to a site in the analysis graph (a module call or a function call)."""

    node: str  # fx node name (unique within its region)
    target: str  # model-level qualified module path for module calls, function name otherwise
    type_name: str  # e.g. "BatchNorm2d", "ReLU", "relu", "add"
    kind: NeighbourKind
    is_module: bool
    shared: bool  # the module object is called at more than one place
    has_params: bool


_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
_ACT_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softplus,
)
_ACT_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardtanh,
    torch.tanh,
    F.softplus,
}
_ACT_METHODS = {"relu", "relu_", "tanh", "tanh_"}
_TIMM_ACT_MODULE_NAMES = {
    "Swish",
    "SwishMe",
    "Mish",
    "MishMe",
    "HardSwish",
    "HardSwishMe",
    "HardMish",
    "HardMishMe",
    "GELU",
    "GELUTanh",
    "QuickGELU",
    "PReLU",
}


def module_kind(module: nn.Module) -> NeighbourKind:
    if isinstance(module, _ACT_TYPES) or type(module).__name__ in _TIMM_ACT_MODULE_NAMES:
        return "act"
    act = getattr(module, "act", None)
    if isinstance(module, _NORM_TYPES):
        # timm's BatchNormAct2d & co. end with an activation
        if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
            return "act"
        return "norm"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        return "pool"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "dropout"
    return "other"


def function_kind(node: fx.Node) -> NeighbourKind:
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            return "act"
        if node.target in (operator.add, operator.iadd, torch.add):
            return "add"
        if node.target in FUNCTION_OPS:
            return "conv" if FUNCTION_OPS[node.target][0] == "conv" else "pool"
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return "act"
    if node.op == "call_method" and node.target in ("add", "add_"):
        return "add"
    return "other"


class GraphView:
    """One fx region with the per-node facts site finding needs."""

    def __init__(self, region: Region, analysis: Analysis) -> None:
        assert region.graph is not None
        self.region = region
        self.root = region.graph_module if region.graph_module is not None else region.module
        self.nodes = list(region.graph.nodes)
        self.module_uses = Counter(n.target for n in self.nodes if n.op == "call_module")
        self.analysis = analysis

    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(str(node.target))

    def shared(self, node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        name = self.region.qualify(str(node.target))
        hook_calls = len(self.analysis.calls.get(name, ()))
        return self.module_uses[node.target] > 1 or hook_calls > 1

    def neighbour(self, node: fx.Node) -> Neighbour:
        if node.op == "call_module":
            module = self.module(node)
            return Neighbour(
                node.name,
                self.region.qualify(str(node.target)),
                type(module).__name__,
                module_kind(module),
                True,
                self.shared(node),
                any(True for _ in module.parameters()),
            )
        target = (
            node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        )
        return Neighbour(
            node.name, str(target), str(target), function_kind(node), False, False, False
        )

    def after(self, node: fx.Node) -> tuple[Neighbour, ...]:
        chain: list[Neighbour] = []
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if user.op == "output":
                break
            item = self.neighbour(user)
            chain.append(item)
            if item.kind not in ("norm", "act", "dropout") or len(chain) >= 4:
                break
            current = user
        return tuple(chain)

    def before(self, node: fx.Node) -> tuple[Neighbour, ...]:
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first.op not in ("placeholder", "get_attr"):
            return (self.neighbour(first),)
        return ()
