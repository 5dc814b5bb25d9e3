"""Replacement layers: plain nn.Modules, each with its arithmetic in its docstring."""

from __future__ import annotations

from surgeon.layers.blur import PAD_MODES, BlurPool, binomial_filter
from surgeon.layers.spd import SpaceToDepthConv, Transfer, pool_arguments, space_to_depth

__all__ = [
    "PAD_MODES",
    "BlurPool",
    "SpaceToDepthConv",
    "Transfer",
    "binomial_filter",
    "pool_arguments",
    "space_to_depth",
]
