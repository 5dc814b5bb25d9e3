"""LIP: local importance-based pooling (Gao, Wang & Wu, "LIP: Local Importance-based Pooling",
ICCV 2019, arXiv 1908.04156).

Average pooling weighted by a learned, positive importance map: windows attend to the
positions that matter instead of averaging them all. With a constant importance it is the
average pool, which is how it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.layers.shapes import per_dim
from surgeon.layers.transfer import Transfer

__all__ = ["LocalImportancePool"]

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LocalImportancePool(nn.Module):
    """avgpool(x * w) / avgpool(w), w = exp(6 * tanh(z / 2)), z = logit(x): LIP.

    The logit module is the paper's simplified one: a 3-tap convolution (C -> C, `logit_groups`
    groups, no bias) and an affine instance normalisation (GroupNorm with one channel per
    group, which also accepts 1×1 maps). The importance w = exp(12 sigmoid(z) - 6) is the
    paper's SoftGate exp(12 sigmoid(z)) divided by the constant e^6, which cancels in the
    ratio: it keeps logits in (-6, 6), so w cannot overflow, and makes w = 1 at z = 0.

    The pool (`kernel_size`, `stride`, `padding`, `ceil_mode`) is PyTorch's average pool, so the
    output size is `pool_output_size(i, k, s, p, ceil_mode=ceil_mode)`. Per window, with R its
    in-image positions:

        count_include_pad=False:  y = sum_R x w / sum_R w
        count_include_pad=True:   y = sum_R x w / (sum_R w + P)

    where P is the number of padded positions PyTorch's divisor counts (the window clipped to
    the padded input, so a ceil_mode overhang past the padding does not count): padded
    positions act as zeros of importance 1, the importance of logit 0.

    Exact at init: the normalisation's weight and bias are zero, so z = 0, w = 1 and y is
    nn.AvgPool of the same arguments, for both count_include_pad settings, padded and
    ceil_mode pools and odd sizes (bitwise without padding; with count_include_pad=True and
    padding the divisor is 1 to within one rounding). Scripts, traces and exports (ONNX).
    """

    def __init__(
        self,
        channels: int,
        *,
        dims: int = 2,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 2,
        padding: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        logit_groups: int = 1,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if channels < 1 or channels % logit_groups:
            raise ValueError(
                f"channels ({channels}) must be a positive multiple of logit_groups "
                f"({logit_groups})"
            )
        self.channels = channels
        self.dims = dims
        self.kernel_size = per_dim(kernel_size, dims, "kernel_size")
        self.stride = per_dim(stride, dims, "stride")
        self.padding = per_dim(padding, dims, "padding")
        for p, k in zip(self.padding, self.kernel_size, strict=True):
            if p < 0 or 2 * p > k:
                raise ValueError(
                    f"padding {self.padding} must be between 0 and half the kernel "
                    f"{self.kernel_size}, as PyTorch's pools require"
                )
        self.ceil_mode = bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        self.pads_count = self.count_include_pad and max(self.padding) > 0
        self.logit_groups = logit_groups
        conv: Any = _CONVS[dims - 1]
        norm = nn.GroupNorm(channels, channels)
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)
        self.logit = nn.Sequential(
            conv(channels, channels, 3, padding=1, groups=logit_groups, bias=False), norm
        )

    def _pool(self, x: Tensor) -> Tensor:
        k, s, p = list(self.kernel_size), list(self.stride), list(self.padding)
        cip = self.count_include_pad
        if self.dims == 1:
            return F.avg_pool1d(x, k, s, p, self.ceil_mode, cip)
        if self.dims == 2:
            return F.avg_pool2d(x, k, s, p, self.ceil_mode, cip)
        return F.avg_pool3d(x, k, s, p, self.ceil_mode, cip)

    def forward(self, x: Tensor) -> Tensor:
        importance = torch.exp(12.0 * torch.sigmoid(self.logit(x)) - 6.0)
        numerator = self._pool(x * importance)
        denominator = self._pool(importance)
        if self.pads_count:
            # PyTorch divides by the window including padding: add the padded share
            # P / divisor = 1 - avgpool(ones), i.e. padding of importance 1
            denominator = denominator + (1.0 - self._pool(torch.ones_like(x[:1, :1])))
        return numerator / denominator

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, ceil_mode={self.ceil_mode}, "
            f"count_include_pad={self.count_include_pad}"
        )

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable) that rebuild this layer."""
        return {
            "channels": self.channels,
            "dims": self.dims,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "ceil_mode": self.ceil_mode,
            "count_include_pad": self.count_include_pad,
            "logit_groups": self.logit_groups,
        }

    @classmethod
    def from_pool(
        cls,
        pool_kind: str,
        channels: int,
        dims: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] | None,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        *,
        logit_groups: int = 1,
    ) -> tuple[LocalImportancePool, Transfer]:
        """A LIP layer with the pool's windows and output size, and its transfer.

        Takes `SpaceToDepthConv.from_pool`'s arguments (`pool_arguments(module)` plus
        `channels`; stride None means the kernel). An average pool gives "exact" (LIP starts
        as that pool), unless divisor_override is set ("approximate": LIP divides by the
        window's importance, so it starts as the pool without the override). A max pool gives
        "approximate": LIP starts as the average over the same windows, its padding excluded
        (count_include_pad=False) as a max pool's -inf padding is. Dilated max pools and
        'same' padding raise ValueError.
        """
        if pool_kind not in ("max", "avg"):
            raise ValueError(f"pool_kind must be 'max' or 'avg', got {pool_kind!r}")
        if isinstance(padding, str):
            raise ValueError("LIP needs explicit padding; 'same' pools are not supported")
        if max(per_dim(dilation, dims, "dilation")) > 1:
            raise ValueError(f"LIP averages windows without gaps; got dilation {dilation}")
        k = per_dim(kernel, dims, "kernel")
        s = k if stride is None or (isinstance(stride, Sequence) and not stride) else stride
        layer = cls(
            channels,
            dims=dims,
            kernel_size=k,
            stride=s,
            padding=padding,
            ceil_mode=ceil_mode,
            count_include_pad=count_include_pad if pool_kind == "avg" else False,
            logit_groups=logit_groups,
        )
        exact = pool_kind == "avg" and divisor_override is None
        return layer, ("exact" if exact else "approximate")
