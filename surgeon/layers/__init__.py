"""Replacement layers: plain nn.Modules, one per file, each with its arithmetic in its docstring
and registered by name (`surgeon.layers.registry`) so that checkpoints rebuild them as data."""

from __future__ import annotations

from surgeon.layers.aps import AdaptivePolyphaseSampling
from surgeon.layers.blur import EXPORT_FORMS, PAD_MODES, BlurPool, binomial_filter
from surgeon.layers.folded import FoldedSpaceToDepthConv
from surgeon.layers.folded_blur import FoldedBlurConv
from surgeon.layers.haar import HaarConv, haar_transform
from surgeon.layers.lip import LocalImportancePool
from surgeon.layers.lps import LearnablePolyphaseSampling
from surgeon.layers.msau import AdaptiveUpsampling
from surgeon.layers.polyphase import PolyphaseSampling, share_phase
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
from surgeon.layers.sfm import AdaptiveResampling
from surgeon.layers.softpool import SoftPool
from surgeon.layers.source_ops import pool_arguments
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.stride_pad import StridePad
from surgeon.layers.sub_pixel import SubPixelConv, shuffle
from surgeon.layers.transfer import Transfer

__all__ = [
    "EXPORT_FORMS",
    "PAD_MODES",
    "AdaptivePolyphaseSampling",
    "AdaptiveResampling",
    "AdaptiveUpsampling",
    "BlurPool",
    "FoldedBlurConv",
    "FoldedSpaceToDepthConv",
    "HaarConv",
    "LearnablePolyphaseSampling",
    "LocalImportancePool",
    "PolyphaseSampling",
    "PoolPad",
    "ResizeConv",
    "SoftPool",
    "SpaceToDepthConv",
    "StridePad",
    "SubPixelConv",
    "Transfer",
    "binomial_filter",
    "build_module",
    "haar_transform",
    "layer_config",
    "module_spec",
    "pad_space_to_depth",
    "pool_arguments",
    "register_layer",
    "registered_layers",
    "share_phase",
    "shuffle",
    "space_to_depth",
]
