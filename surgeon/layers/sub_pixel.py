"""SubPixelConv: a transposed convolution as a stride-1 convolution and a pixel shuffle
(Shi et al. 2016), with the transposed convolution's output size.

Output position o = s·q + ρ of a transposed convolution only sees the taps t with
t·d ≡ ρ + p (mod s), each reading input q + (ρ + p − t·d)/s, so every output phase ρ is an
ordinary convolution; one stride-1 convolution computes all s^dims phases as channels, and the
shuffle interleaves them (the arithmetic of Dumoulin & Visin, arXiv 1603.07285).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers.shapes import crop_to, dim_tuples, transposed_sizes

__all__ = ["SubPixelConv", "shuffle"]


def shuffle(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Pixel shuffle in 1-3 dimensions: channel c·Πs + phase → position (q·s + phase) per dim,
    phases ordered like `F.pixel_shuffle` (first spatial dimension slowest)."""
    dims = len(factors)
    if dims == 2 and factors[0] == factors[1]:
        return F.pixel_shuffle(x, factors[0])
    n, c = x.shape[0], x.shape[1] // math.prod(factors)
    sizes = x.shape[2:]
    x = x.reshape(n, c, *factors, *sizes)
    order = [0, 1] + [i for d in range(dims) for i in (2 + dims + d, 2 + d)]
    x = x.permute(*order)
    return x.reshape(n, c, *(q * s for q, s in zip(sizes, factors, strict=True)))


def _phase_taps(k: int, s: int, p: int, d: int) -> tuple[list[tuple[int, int, int]], int, int]:
    """[(phase ρ, tap t, offset e)] with output s·q + ρ reading input q + e through tap t, the
    left padding P = max(-e) and the kernel length max(e) + P + 1 of one phase-stacked conv."""
    taps = [
        (rho, t, (rho + p - t * d) // s)
        for rho in range(s)
        for t in range(k)
        if (rho + p - t * d) % s == 0
    ]
    offsets = [e for _, _, e in taps] or [0]
    left = max(0, -min(offsets))
    return taps, left, max(offsets) + left + 1


class SubPixelConv(nn.Module):
    """Conv (stride 1) to C_out·Πs channels + pixel shuffle, cropped to a transposed conv's size.

    Output size per dim: (i−1)s − 2p + d(k−1) + output_padding + 1, the transposed conv's
    (`output_size=` in forward picks another output_padding, as `ConvTranspose` does). The conv
    pads `left` before and whatever makes ceil(L/s) positions after; the shuffle gives s·ceil(L/s)
    and the surplus is cropped. `transfer` loads a transposed conv's weights so that the outputs
    are equal (exact for every kernel, stride, padding, dilation and groups).
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
        plans = [
            _phase_taps(k, s, p, d)
            for k, s, p, d in zip(
                self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        ]
        self.left = tuple(left for _, left, _ in plans)
        size = tuple(length for _, _, length in plans)
        phases = math.prod(self.stride)
        conv_type: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(self.kernel) - 1]
        self.conv = conv_type(
            in_channels, out_channels * phases, size, padding=0, groups=groups, bias=bias
        )
        self.out_channels = out_channels

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `SubPixelConv(**m.config())` has the same
        arithmetic and state-dict keys and shapes as `m`."""
        return {
            "in_channels": self.conv.in_channels,
            "out_channels": self.out_channels,
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
        """Load a transposed conv's weight (C_in, C_out/g, *k) and bias so outputs are equal."""
        groups = self.conv.groups
        c_in, c_out_g = weight.shape[0], weight.shape[1]
        c_in_g = c_in // groups
        phases = math.prod(self.stride)
        new = torch.zeros_like(self.conv.weight)  # (C_out·phases, C_in/g, *size)
        plans = [
            _phase_taps(k, s, p, d)
            for k, s, p, d in zip(
                self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        ]
        view = new.view(groups, c_out_g, phases, c_in_g, *new.shape[2:])
        source = weight.view(groups, c_in_g, c_out_g, *weight.shape[2:])
        for combo in itertools.product(*(taps for taps, _, _ in plans)):
            phase = 0
            for i, (rho, _, _) in enumerate(combo):
                phase = phase * self.stride[i] + rho
            at = tuple(left + e for (_, _, e), (_, left, _) in zip(combo, plans, strict=True))
            tap = tuple(t for _, t, _ in combo)
            # correlation reads input q + u − left at kernel index u: u = left + e
            into: tuple[Any, ...] = (slice(None), slice(None), phase, slice(None), *at)
            out_of: tuple[Any, ...] = (slice(None), slice(None), slice(None), *tap)
            view[into] = source[out_of].transpose(1, 2)
        self.conv.weight.copy_(new)
        if self.conv.bias is not None:
            values = bias if bias is not None else torch.zeros(self.out_channels)
            self.conv.bias.copy_(values.repeat_interleave(phases))

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dims = len(self.kernel)
        sizes = tuple(int(n) for n in x.shape[-dims:])
        if output_size is not None:
            target = tuple(int(v) for v in output_size[-dims:])
        else:
            target = transposed_sizes(
                sizes, self.kernel, self.stride, self.padding, self.dilation, self.output_padding
            )
        pads: list[int] = []
        for i in reversed(range(dims)):
            positions = -(-target[i] // self.stride[i])
            right = positions - sizes[i] - self.left[i] + self.conv.kernel_size[i] - 1
            pads += [self.left[i], max(right, 0)]
        y = self.conv(F.pad(x, pads))
        return crop_to(shuffle(y, self.stride), target)
