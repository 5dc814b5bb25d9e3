"""Replacement layers: plain nn.Modules, each with its arithmetic in its docstring."""

from __future__ import annotations

from surgeon.layers.aps import AdaptivePolyphaseSampling
from surgeon.layers.blur import PAD_MODES, BlurPool, binomial_filter
from surgeon.layers.haar import HaarConv, haar_transform
from surgeon.layers.lip import LocalImportancePool
from surgeon.layers.lps import LearnablePolyphaseSampling
from surgeon.layers.msau import AdaptiveUpsampling
from surgeon.layers.polyphase import PolyphaseSampling, share_phase
from surgeon.layers.sfm import AdaptiveResampling
from surgeon.layers.softpool import SoftPool
from surgeon.layers.spd import SpaceToDepthConv, Transfer, pool_arguments, space_to_depth

__all__ = [
    "PAD_MODES",
    "AdaptivePolyphaseSampling",
    "AdaptiveResampling",
    "AdaptiveUpsampling",
    "BlurPool",
    "HaarConv",
    "LearnablePolyphaseSampling",
    "LocalImportancePool",
    "PolyphaseSampling",
    "SoftPool",
    "SpaceToDepthConv",
    "Transfer",
    "binomial_filter",
    "haar_transform",
    "pool_arguments",
    "share_phase",
    "space_to_depth",
]
