"""FoldedBlurConv: a BlurPool followed by a stride-1 pointwise convolution, as one strided
convolution.

The anti-aliased shortcut (Zhang 2019) blurs with stride s and then applies a 1×1 convolution.
Both are linear and the pointwise convolution mixes channels position by position, so the pair
is one f×f convolution with stride s on the padded input, whose kernel is the pointwise weight
times the blur filter:

    conv_1x1(blur_s(pad(x)), W)  ==  conv_{f×f, stride s}(pad(x), W[o, c] · h)

for every padding mode, as long as the input is padded the blur's way. `surgeon.fold` builds
these; each costs f^dims · C · C' MACs per output position against f^dims · C + C · C' for the
pair, so fold keeps the form only where it measures faster on the backend it times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.layers.blur import (
    PAD_MODES,
    BlurPool,
    binomial_filter,
    pad_for_blur,
    pad_for_blur_graph,
)
from surgeon.layers.shapes import per_dim
from surgeon.layers.transfer import padded_conv, strided_conv

__all__ = ["FoldedBlurConv"]


class FoldedBlurConv(nn.Module):
    """`BlurPool(stride=s, filter_size=f, pad_mode)` then a pointwise stride-1 convolution, as
    one f×f convolution with stride s (`conv`), exactly.

    The input is padded as BlurPool pads it (see `surgeon.layers.blur.pad_for_blur`: reflect
    falls back to replicate on maps too short to reflect), so the output length per dim is
    BlurPool's, ceil(L / s) (or the ceil_mode source's, `ceil_source`). With `pad_mode="zero"`
    (and no `ceil_source`) the padding is the constant [floor((f-1)/2), ceil((f-1)/2)], the
    convolution's own: an ONNX export is one Conv.

    Built from a reflect or replicate blur with `pad_mode="zero"` (`from_pair(...,
    pad_mode="zero")`) the layer differs from the pair at the outputs whose window reaches
    the border, and equals it in the interior: `surgeon.fold` makes that only when asked to
    (`interior_only=True`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dims: int = 2,
        filter_size: int = 4,
        stride: int | Sequence[int] = 2,
        pad_mode: str = "reflect",
        ceil_source: tuple[int | Sequence[int], int | Sequence[int], int | Sequence[int]]
        | None = None,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        binomial_filter(filter_size, dims)  # validates the size
        self.dims = dims
        self.filter_size = filter_size
        self.stride = per_dim(stride, dims, "stride")
        self.pad_mode = pad_mode
        self.ceil_mode = ceil_source is not None
        if ceil_source is None:
            self.source_kernel, self.source_padding, self.source_dilation = (
                (1,) * dims,
                (0,) * dims,
                (1,) * dims,
            )
        else:
            kernel, padding, dilation = ceil_source
            self.source_kernel = per_dim(kernel, dims, "ceil_source kernel")
            self.source_padding = per_dim(padding, dims, "ceil_source padding")
            self.source_dilation = per_dim(dilation, dims, "ceil_source dilation")
        conv_type: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.conv = conv_type(
            in_channels,
            out_channels,
            filter_size,
            stride=self.stride,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_pair(
        cls, blur: BlurPool, conv: nn.Module, *, pad_mode: str | None = None
    ) -> FoldedBlurConv:
        """The folded form of `Sequential(blur, conv)`; `conv` is a pointwise stride-1
        `nn.Conv1d/2d/3d` (no padding, no dilation) on the blur's channels. `pad_mode` other
        than the blur's own (only "zero" makes sense) gives the interior-only form."""
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ValueError(f"expected a convolution after the blur, got {type(conv).__name__}")
        pointwise = (
            all(k == 1 for k in conv.kernel_size)
            and all(s == 1 for s in conv.stride)
            and not isinstance(conv.padding, str)
            and not any(conv.padding)
            and conv.padding_mode == "zeros"
            and len(conv.kernel_size) == blur.dims
            and conv.in_channels == blur.channels
        )
        if not pointwise:
            raise ValueError(f"{conv} is not a pointwise stride-1 convolution on the blurred map")
        ceil_source = None
        if blur.ceil_mode:
            ceil_source = (blur.source_kernel, blur.source_padding, blur.source_dilation)
        folded = cls(
            conv.in_channels,
            conv.out_channels,
            dims=blur.dims,
            filter_size=blur.filter_size,
            stride=blur.stride,
            pad_mode=blur.pad_mode if pad_mode is None else pad_mode,
            ceil_source=ceil_source,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        taps = binomial_filter(blur.filter_size, blur.dims).to(conv.weight)
        with torch.no_grad():
            pointwise_weight = conv.weight.reshape(*conv.weight.shape[:2], *([1] * blur.dims))
            folded.conv.weight.copy_(pointwise_weight * taps)
            if conv.bias is not None:
                folded.conv.bias.copy_(conv.bias)
        return folded

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `FoldedBlurConv(**m.config())` has the same
        arithmetic and state-dict keys and shapes as `m`."""
        ceil_source = None
        if self.ceil_mode:
            ceil_source = [
                list(self.source_kernel),
                list(self.source_padding),
                list(self.source_dilation),
            ]
        return {
            "in_channels": self.conv.in_channels,
            "out_channels": self.conv.out_channels,
            "dims": self.dims,
            "filter_size": self.filter_size,
            "stride": list(self.stride),
            "pad_mode": self.pad_mode,
            "ceil_source": ceil_source,
            "groups": self.conv.groups,
            "bias": self.conv.bias is not None,
        }

    def extra_repr(self) -> str:
        text = f"filter_size={self.filter_size}, stride={self.stride}, pad_mode={self.pad_mode!r}"
        if self.ceil_mode:
            source = (self.source_kernel, self.source_padding, self.source_dilation)
            text += f", ceil_source={source}"
        return text

    def _arithmetic(self) -> tuple[list[int], list[int], list[int], list[int]]:
        stride: list[int] = []
        kernel: list[int] = []
        padding: list[int] = []
        dilation: list[int] = []
        for i in range(self.dims):
            stride.append(self.stride[i])
            kernel.append(self.source_kernel[i])
            padding.append(self.source_padding[i])
            dilation.append(self.source_dilation[i])
        return stride, kernel, padding, dilation

    def _conv(self, x: Tensor) -> Tensor:
        weight, bias, stride, groups = (
            self.conv.weight,
            self.conv.bias,
            self.conv.stride,
            self.conv.groups,
        )
        if self.dims == 1:
            return F.conv1d(x, weight, bias, stride, 0, 1, groups)
        if self.dims == 2:
            return F.conv2d(x, weight, bias, stride, 0, 1, groups)
        return F.conv3d(x, weight, bias, stride, 0, 1, groups)

    def forward(self, x: Tensor) -> Tensor:
        constant = self.pad_mode == "zero" and not self.ceil_mode
        stride, kernel, padding, dilation = self._arithmetic()
        if torch.jit.is_scripting():
            padded = pad_for_blur(
                x,
                self.filter_size,
                stride,
                self.pad_mode,
                self.ceil_mode,
                kernel,
                padding,
                dilation,
            )
            return self._conv(padded)
        if constant:
            return self._constant_padding(x)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            padded = pad_for_blur_graph(
                x,
                self.filter_size,
                stride,
                self.pad_mode,
                self.ceil_mode,
                kernel,
                padding,
                dilation,
            )
        else:
            padded = pad_for_blur(
                x,
                self.filter_size,
                stride,
                self.pad_mode,
                self.ceil_mode,
                kernel,
                padding,
                dilation,
            )
        return self._conv(padded)

    @torch.jit.unused
    def _constant_padding(self, x: Tensor) -> Tensor:
        # zero padding of the same width at every size: the convolution's own in graphs (one
        # ONNX Conv), and in eager mode without a padded copy where it is symmetric
        left = (self.filter_size - 1) // 2
        lefts = [left] * self.dims
        rights = [self.filter_size - 1 - left] * self.dims
        conv = self.conv
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return padded_conv(x, conv.weight, conv.bias, conv.stride, lefts, rights, conv.groups)
        return strided_conv(x, conv.weight, conv.bias, conv.stride, lefts, rights, conv.groups)
