"""Layer geometry: a convolution or pooling module's stride, dilation and padding, and the new
geometry that runs it at another stride on a denser map (`regeometry`, "algorithme à trous").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from surgeon.calls import SAME_PADDING_TYPES
from surgeon.strides import LayerOp, layer_op

__all__ = ["Geometry", "Resize", "regeometry"]


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
        op = layer_op(module)
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
            type(module).__name__ in SAME_PADDING_TYPES,
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
