"""The ops SPD-Conv stands in for: which convolution and pooling modules it can read, and their
numbers (kernel, stride, padding, dilation, ceil_mode, ...).

timm's TF-"same" layers (Conv2dSame, Conv2dSameExport, MaxPool2dSame, AvgPool2dSame) pad at run
time; they are recognised without importing timm when the model never did.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from torch import nn

from surgeon.layers.shapes import per_dim

__all__ = ["conv_kind", "pool_arguments"]

_CONV_TYPES: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def pool_arguments(module: nn.Module) -> dict[str, Any]:
    """The arguments `SpaceToDepthConv.from_pool` needs (all but `channels`) from a pool module.

    Accepts nn.MaxPool1d/2d/3d, nn.AvgPool1d/2d/3d and timm's MaxPool2dSame/AvgPool2dSame
    (reported with padding="same"); anything else, or a max pool with return_indices, raises
    ValueError.
    """
    same_types = _timm_types("MaxPool2dSame", "AvgPool2dSame")
    same = isinstance(module, same_types) if same_types else False
    max_types = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
    avg_types = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
    for pool_type, dims in max_types.items():
        if isinstance(module, pool_type):
            # timm's MaxPool2dSame passes ceil_mode into nn.MaxPool2d's return_indices slot; its
            # forward reads neither, so only a real return_indices counts
            if module.return_indices and not same:
                raise ValueError(
                    f"{type(module).__name__} returns indices; SPD-Conv cannot replace it"
                )
            return {
                "pool_kind": "max",
                "dims": dims,
                "kernel": per_dim(module.kernel_size, dims, "kernel"),
                "stride": per_dim(module.stride, dims, "stride"),
                "padding": "same" if same else per_dim(module.padding, dims, "padding"),
                "dilation": per_dim(module.dilation, dims, "dilation"),
                "ceil_mode": bool(module.ceil_mode),
            }
    for avg_type, dims in avg_types.items():
        if isinstance(module, avg_type):
            pool: Any = module
            return {
                "pool_kind": "avg",
                "dims": dims,
                "kernel": per_dim(pool.kernel_size, dims, "kernel"),
                "stride": per_dim(pool.stride, dims, "stride"),
                "padding": "same" if same else per_dim(pool.padding, dims, "padding"),
                "ceil_mode": bool(pool.ceil_mode),
                "count_include_pad": bool(pool.count_include_pad),
                "divisor_override": getattr(pool, "divisor_override", None),
            }
    raise ValueError(
        f"{type(module).__name__} is not a max or average pooling module SPD-Conv can replace"
    )


def _timm_types(*names: str) -> tuple[type, ...]:
    # No module can be an instance of a timm class before timm is imported: skip the import.
    if "timm" not in sys.modules:
        return ()
    # timm.layers re-exports a *function* named conv2d_same, so import the modules by path.
    try:
        modules = [
            importlib.import_module(f"timm.layers.{m}") for m in ("conv2d_same", "pool2d_same")
        ]
    except ImportError:  # timm is optional for the layers themselves
        return ()
    return tuple(getattr(m, n) for n in names for m in modules if hasattr(m, n))


def conv_kind(conv: nn.Module) -> tuple[int, bool]:
    """(spatial dims, uses dynamic TF-same padding) of a supported convolution, else ValueError."""
    same_types = _timm_types("Conv2dSame", "Conv2dSameExport")
    dims = next((d for t, d in _CONV_TYPES.items() if isinstance(conv, t)), 0)
    if not dims:
        raise ValueError(
            f"{type(conv).__name__} is not an nn.Conv1d/2d/3d; SPD-Conv cannot transfer it"
        )
    same = bool(same_types) and isinstance(conv, same_types)
    known_forwards = {t.forward for t in _CONV_TYPES} | {t.forward for t in same_types}  # type: ignore[attr-defined]
    if type(conv).forward not in known_forwards:
        raise ValueError(
            f"{type(conv).__name__} overrides Conv{dims}d.forward, so its effective weight or "
            "padding may differ from .weight/.padding and a transfer could not be exact"
        )
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{type(conv).__name__} uses padding_mode={conv.padding_mode!r}; SPD-Conv pads with "
            "zeros, so only padding_mode='zeros' transfers"
        )
    return dims, same
