"""Replacement layers: plain nn.Modules, one per file, each with its arithmetic in its docstring
and registered by name (`surgeon.layers.registry`) so that checkpoints rebuild them as data."""

from __future__ import annotations

from surgeon.layers.blur import PAD_MODES, BlurPool, binomial_filter
from surgeon.layers.folded import FoldedSpaceToDepthConv
from surgeon.layers.pool_pad import PoolPad
from surgeon.layers.rearrange import pad_space_to_depth, space_to_depth
from surgeon.layers.registry import (
    build_module,
    layer_config,
    module_spec,
    register_layer,
    registered_layers,
)
from surgeon.layers.resize_conv import ResizeConv
from surgeon.layers.source_ops import pool_arguments
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.stride_pad import StridePad
from surgeon.layers.sub_pixel import SubPixelConv, shuffle
from surgeon.layers.transfer import Transfer

__all__ = [
    "PAD_MODES",
    "BlurPool",
    "FoldedSpaceToDepthConv",
    "PoolPad",
    "ResizeConv",
    "SpaceToDepthConv",
    "StridePad",
    "SubPixelConv",
    "Transfer",
    "binomial_filter",
    "build_module",
    "layer_config",
    "module_spec",
    "pad_space_to_depth",
    "pool_arguments",
    "register_layer",
    "registered_layers",
    "shuffle",
    "space_to_depth",
]
