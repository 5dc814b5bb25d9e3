"""ResizeConv: a transposed convolution as nearest-neighbour upsampling and a stride-1
convolution (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts").

Every output phase shares one kernel, so there is no checkerboard pattern; no resize-conv
reproduces a transposed convolution's phases exactly, so a transferred kernel keeps only its
mean response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers.shapes import crop_to, dim_tuples, transposed_sizes

__all__ = ["ResizeConv"]


class ResizeConv(nn.Module):
    """Nearest upsampling by s, then a stride-1 conv, padded to a transposed conv's output size.

    Output size per dim: (i−1)s − 2p + d(k−1) + output_padding + 1 (`output_size=` in forward
    picks another, as `ConvTranspose` does). The conv (kernel k, dilation d) reads the upsampled
    map with left padding d(k−1) − p (the transposed conv's reach) and is cropped or padded on
    the right to that size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        output_padding: Sequence[int],
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding, self.dilation, self.output_padding = dim_tuples(
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            output_padding=output_padding,
        )
        conv_type: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(self.kernel) - 1]
        self.conv = conv_type(
            in_channels,
            out_channels,
            self.kernel,
            dilation=self.dilation,
            groups=groups,
            bias=bias,
        )

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `ResizeConv(**m.config())` has the same
        arithmetic and state-dict keys and shapes as `m`."""
        return {
            "in_channels": self.conv.in_channels,
            "out_channels": self.conv.out_channels,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "output_padding": list(self.output_padding),
            "groups": self.conv.groups,
            "bias": self.conv.bias is not None,
        }

    @torch.no_grad()
    def transfer(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Start from the transposed kernel, flipped and divided by Πs: the same mean response."""
        groups = self.conv.groups
        c_in, c_out_g = weight.shape[0], weight.shape[1]
        dims = len(self.kernel)
        w = weight.view(groups, c_in // groups, c_out_g, *weight.shape[2:]).transpose(1, 2)
        w = w.reshape(groups * c_out_g, c_in // groups, *weight.shape[2:])
        w = torch.flip(w, dims=tuple(range(2, 2 + dims)))
        self.conv.weight.copy_(w / math.prod(self.stride))
        if self.conv.bias is not None and bias is not None:
            self.conv.bias.copy_(bias)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dims = len(self.kernel)
        sizes = tuple(int(n) for n in x.shape[-dims:])
        if output_size is not None:
            target = tuple(int(v) for v in output_size[-dims:])
        else:
            target = transposed_sizes(
                sizes, self.kernel, self.stride, self.padding, self.dilation, self.output_padding
            )
        up = F.interpolate(x, scale_factor=tuple(float(s) for s in self.stride), mode="nearest")
        pads: list[int] = []
        for i in reversed(range(dims)):
            reach = self.dilation[i] * (self.kernel[i] - 1)
            left = reach - self.padding[i]
            right = target[i] - up.shape[2 + i] - left + reach
            pads += [left, right]
        # a negative pad crops (a padding larger than the transposed conv's reach)
        return crop_to(self.conv(F.pad(up, pads)), target)
