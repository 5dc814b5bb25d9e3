"""`upsample`: a transposed convolution becomes resize + conv or conv + pixel shuffle, with the
same output shape (the convolution arithmetic of Dumoulin & Visin, arXiv 1603.07285).

- `mode: pixel-shuffle` (`SubPixelConv`): a stride-1 convolution makes s^d phases of every output
  channel and a pixel shuffle interleaves them (Shi et al. 2016). With `init: transfer` this is
  exact for every transposed convolution: output position o = s·q + ρ only sees the taps t with
  t·d ≡ ρ + p (mod s), each reading input q + (ρ + p − t·d)/s, so phase ρ is an ordinary
  convolution; one kernel holds all phases, the left padding is the largest backward reach, and
  the result is cropped to the transposed output size (i−1)s − 2p + d(k−1) + output_padding + 1.
  A stride-2 kernel-4 padding-1 transposed conv is exactly a 3×3 conv (padding 1) + shuffle.
- `mode: resize-conv` (`ResizeConv`, Odena et al. 2016, "Deconvolution and Checkerboard
  Artifacts"): nearest-neighbour upsampling by s, then a stride-1 convolution with the
  transposed kernel flipped and divided by s^d, padded to the same output size. Every output
  phase then shares one kernel, so there is no checkerboard pattern; the transfer keeps the
  mean response and is reported `approximate` (no resize-conv reproduces the phases exactly).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.arithmetic import transposed_output_size
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site

__all__ = ["ResizeConv", "SubPixelConv", "UpsampleRewrite", "shuffle"]

_CONVS: dict[int, Callable[..., nn.modules.conv._ConvNd]] = {
    1: nn.Conv1d,
    2: nn.Conv2d,
    3: nn.Conv3d,
}


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


def _crop_or_pad(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    for i, size in enumerate(sizes):
        dim = x.dim() - len(sizes) + i
        if x.shape[dim] > size:
            x = x.narrow(dim, 0, size)
    return x


def _output_sizes(
    sizes: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    output_padding: tuple[int, ...],
) -> tuple[int, ...]:
    return tuple(
        transposed_output_size(n, k, s, p, d, op)
        for n, k, s, p, d, op in zip(
            sizes, kernel, stride, padding, dilation, output_padding, strict=True
        )
    )


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
    and the surplus is cropped.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        output_padding: tuple[int, ...],
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        dims = len(kernel)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.dilation, self.output_padding = dilation, output_padding
        plans = [
            _phase_taps(k, s, p, d)
            for k, s, p, d in zip(kernel, stride, padding, dilation, strict=True)
        ]
        self.left = tuple(left for _, left, _ in plans)
        size = tuple(length for _, _, length in plans)
        phases = math.prod(stride)
        self.conv = _CONVS[dims](
            in_channels, out_channels * phases, size, padding=0, groups=groups, bias=bias
        )
        self.out_channels = out_channels

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
            target = _output_sizes(
                sizes, self.kernel, self.stride, self.padding, self.dilation, self.output_padding
            )
        pads: list[int] = []
        for i in reversed(range(dims)):
            positions = -(-target[i] // self.stride[i])
            right = positions - sizes[i] - self.left[i] + self.conv.kernel_size[i] - 1
            pads += [self.left[i], max(right, 0)]
        y = self.conv(F.pad(x, pads))
        return _crop_or_pad(shuffle(y, self.stride), target)


class ResizeConv(nn.Module):
    """Nearest upsampling by s, then a stride-1 conv, padded to a transposed conv's output size.

    Output size per dim: (i−1)s − 2p + d(k−1) + output_padding + 1. The conv (kernel k, dilation
    d) reads the upsampled map with left padding d(k−1) − p (the transposed conv's reach) and is
    cropped or padded on the right to that size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        output_padding: tuple[int, ...],
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        dims = len(kernel)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.dilation, self.output_padding = dilation, output_padding
        self.conv = _CONVS[dims](
            in_channels, out_channels, kernel, dilation=dilation, groups=groups, bias=bias
        )

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
            target = _output_sizes(
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
        return _crop_or_pad(self.conv(F.pad(up, pads)), target)


class UpsampleRewrite:
    """Replace a transposed convolution with resize + conv or conv + pixel shuffle."""

    schema = ActionSchema(
        "upsample",
        {
            "mode": ParamSpec(
                "mode",
                str,
                "resize-conv",
                choices=("resize-conv", "pixel-shuffle"),
                help="resize-conv: nearest upsampling then a conv (no checkerboard); "
                "pixel-shuffle: a conv then a pixel shuffle (sub-pixel convolution)",
            ),
            "init": ParamSpec(
                "init",
                str,
                "transfer",
                choices=("transfer", "random"),
                help="transfer: from the transposed conv (exact for pixel-shuffle); "
                "random: PyTorch's default init",
            ),
        },
        "a transposed convolution becomes resize + conv or conv + pixel shuffle, same output shape",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op != "conv_transpose":
            what = site.op.replace("_", " ")
            raise SkipSite(f"upsample replaces transposed convolutions; this site is {what}")
        if site.functional:
            raise SkipSite("functional transposed convolution: its weights are not a module")
        module = editor.module(site.module)
        if not isinstance(module, nn.modules.conv._ConvNd) or not module.transposed:
            raise SkipSite(f"{type(module).__name__} is not a transposed convolution module")
        if module.padding_mode != "zeros":
            raise SkipSite(
                f"padding_mode {module.padding_mode!r} (transposed convs only pad with zeros)"
            )
        if isinstance(site.padding, str):
            raise SkipSite(f"padding {site.padding!r}")
        mode, init = str(params["mode"]), str(params["init"])
        layer_type = SubPixelConv if mode == "pixel-shuffle" else ResizeConv
        new = layer_type(
            module.in_channels,
            module.out_channels,
            site.kernel,
            site.stride,
            site.padding,
            site.dilation,
            site.output_padding,
            groups=module.groups,
            bias=module.bias is not None,
        )
        if init == "transfer":
            new.transfer(
                module.weight.detach(), None if module.bias is None else module.bias.detach()
            )
            transfer = "exact" if mode == "pixel-shuffle" else "approximate"
        else:
            transfer = "random"
        path = editor.replace_site(site, new, "up")
        stride = "×".join(map(str, sorted(set(site.stride))))
        kernel = "×".join(map(str, sorted(set(new.conv.kernel_size))))
        if mode == "pixel-shuffle":
            description = f"conv k{kernel} → {new.conv.out_channels} ch + pixel shuffle ×{stride}"
        else:
            description = f"nearest ×{stride} + conv k{kernel}"
        return Edit(site.name, "upsample", description, transfer, (path,), path)  # type: ignore[arg-type]
