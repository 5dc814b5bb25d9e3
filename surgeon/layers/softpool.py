"""SoftPool (Stergiou, Poppe & Kalliatakis, "Refining activation downsampling with SoftPool",
ICCV 2021, arXiv 2101.00440): every window's softmax-weighted mean.

Between average pooling (all weights equal) and max pooling (all weight on the largest), with
no parameters; the weights follow the activations, so the gradient reaches every position.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.layers.shapes import per_dim
from surgeon.layers.transfer import Transfer

__all__ = ["SoftPool"]


class SoftPool(nn.Module):
    """y = sum_W e^x x / sum_W e^x over each pooling window W, computed stably.

    Windows are a max pool's (`kernel_size`, `stride`, `padding`, `dilation`, `ceil_mode`), so
    the output size is `pool_output_size(i, k, s, p, d, ceil_mode)`. Padded positions and a
    ceil_mode window's overhang are not part of the window (weight 0), as in the paper's
    implementation, where they add zero to both sums.

    Stable form: with m the window's maximum (the max pool of the input),

        y = sum_W e^(x - m) x / sum_W e^(x - m)

    which is the same value, but every exponent is <= 0 and the maximum contributes e^0 = 1,
    so nothing overflows and the denominator is at least 1, for activations of any magnitude;
    a maximum over the whole map instead would underflow every window far below it to 0/0.
    m does not change the value, so it is held constant for the gradient (detached), which
    then is SoftPool's own. Padded positions are zeros with weight 0 (a 0/1 mask of the
    spatial size).

    Parameter-free (no state). Scripts, traces and exports (ONNX: MaxPool, Pad, Gather).
    """

    def __init__(
        self,
        *,
        dims: int = 2,
        kernel_size: int | Sequence[int] = 2,
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        self.dims = dims
        self.kernel_size = per_dim(kernel_size, dims, "kernel_size")
        self.stride = (
            self.kernel_size
            if stride is None or (isinstance(stride, Sequence) and not stride)
            else per_dim(stride, dims, "stride")
        )
        self.padding = per_dim(padding, dims, "padding")
        self.dilation = per_dim(dilation, dims, "dilation")
        for p, k, d in zip(self.padding, self.kernel_size, self.dilation, strict=True):
            if p < 0 or 2 * p > d * (k - 1) + 1:
                raise ValueError(
                    f"padding {self.padding} must be between 0 and half the effective kernel "
                    f"{self.kernel_size} (dilation {self.dilation}), as PyTorch's pools require"
                )
        self.ceil_mode = bool(ceil_mode)
        # every window tap's offset per dim, row-major
        self.taps = [
            [j * d for j, d in zip(tap, self.dilation, strict=True)]
            for tap in itertools.product(*(range(k) for k in self.kernel_size))
        ]

    def _max(self, x: Tensor) -> Tensor:
        k, s, p, d = (
            list(self.kernel_size),
            list(self.stride),
            list(self.padding),
            list(self.dilation),
        )
        if self.dims == 1:
            return F.max_pool1d(x, k, s, p, d, self.ceil_mode)
        if self.dims == 2:
            return F.max_pool2d(x, k, s, p, d, self.ceil_mode)
        return F.max_pool3d(x, k, s, p, d, self.ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        peak = self._max(x).detach()
        # pad left by p and right by p + s - 1: room for a ceil_mode overhang
        pads: list[int] = []
        for i in range(self.dims):
            pads = [self.padding[i], self.padding[i] + self.stride[i] - 1] + pads  # noqa: RUF005
        padded = F.pad(x, pads)
        inside = F.pad(torch.ones_like(x[:1, :1]), pads)  # 1 on the input, 0 on the padding
        numerator = torch.zeros_like(peak)
        denominator = torch.zeros_like(peak)
        for tap in self.taps:
            window = padded
            mask = inside
            for i in range(self.dims):
                positions = torch.arange(peak.shape[2 + i], device=x.device) * self.stride[i]
                window = window.index_select(2 + i, positions + tap[i])
                mask = mask.index_select(2 + i, positions + tap[i])
            # <= 0 inside every window; the clamp only keeps padding (0 - m) from overflowing
            weight = torch.exp(torch.clamp(window - peak, max=0.0)) * mask
            numerator = numerator + weight * window
            denominator = denominator + weight
        return numerator / denominator

    def extra_repr(self) -> str:
        text = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if max(self.dilation) > 1:
            text += f", dilation={self.dilation}"
        return text + (", ceil_mode=True" if self.ceil_mode else "")

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable) that rebuild this layer."""
        return {
            "dims": self.dims,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "ceil_mode": self.ceil_mode,
        }

    @classmethod
    def from_pool(
        cls,
        pool_kind: str,
        dims: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] | None,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> tuple[SoftPool, Transfer]:
        """A SoftPool over a max or average pool's windows, and "approximate".

        Takes `pool_arguments(module)` as it is (no channels: SoftPool has no parameters).
        Padding never counts (count_include_pad and divisor_override have no SoftPool
        counterpart); 'same' padding raises ValueError. SoftPool lies between the average
        and the maximum of each window, so it approximates either pool.
        """
        if pool_kind not in ("max", "avg"):
            raise ValueError(f"pool_kind must be 'max' or 'avg', got {pool_kind!r}")
        if isinstance(padding, str):
            raise ValueError("SoftPool needs explicit padding; 'same' pools are not supported")
        layer = cls(
            dims=dims,
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            ceil_mode=ceil_mode,
        )
        return layer, "approximate"
