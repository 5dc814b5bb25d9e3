"""Haar-wavelet downsampling (HWD: Xu, Xu, Wang, Fang & Zhang, "Haar wavelet downsampling: A
simple but effective downsampling module for semantic segmentation", Pattern Recognition 2023).

A level-1 Haar transform turns every 2×2 block into four subbands (LL, LH, HL, HH) on 4C
channels at half the resolution, losing nothing; a convolution then mixes them. The transform
is an orthogonal mix of each block's four pixels, so HWD is a space-to-depth convolution with
a re-parameterised kernel, and every stride-2 convolution has an exact Haar form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.arithmetic import conv_output_size
from surgeon.layers.shapes import per_dim
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.transfer import Transfer, channel_major_kernel

__all__ = ["HaarConv", "haar_matrix", "haar_transform"]

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INITS = ("transfer", "random")


def haar_transform(x: Tensor) -> Tensor:
    """The level-1 orthonormal Haar transform of every 2^d block, as channels.

    `x` is (N, C, *S) with 1 to 3 spatial dims of even sizes. Along each spatial dim in turn,
    the pair (a, b) = (x[2t], x[2t+1]) becomes low (a + b)/sqrt(2) and high (a - b)/sqrt(2);
    the result is (N, C * 2^d, *(S / 2)) in channel-major order, band b of channel c at
    c * 2^d + b, with b's bits (first dim most significant) 0 = low, 1 = high. In 2-d:
    b = 0 LL (the block sum / 2), 1 LH (high along the width), 2 HL (high along the
    height), 3 HH. Equal to `haar_matrix(d)` applied to each channel's phases in
    `space_to_depth` order, and its own inverse.
    """
    if torch.jit.is_scripting():
        return _haar_by_reshape(x)
    if torch.compiler.is_compiling():
        # torch.export / torch.compile: strided slices, whose lengths the symbolic shape
        # engine matches without proving that a padded length splits evenly
        return _haar_by_slices(x)
    return _haar_by_reshape(x)


def _haar_by_reshape(x: Tensor) -> Tensor:
    y = x.unsqueeze(2)  # (N, C, bands, *S): the band axis grows by 2 per dim
    for axis in range(3, x.dim() + 1):
        shape = list(y.shape)
        split = shape[:axis] + [shape[axis] // 2, 2] + shape[axis + 1 :]  # noqa: RUF005
        pairs = y.reshape(split)
        y = _haar_step(pairs.select(axis + 1, 0), pairs.select(axis + 1, 1))
    return y.flatten(1, 2)


def _haar_by_slices(x: Tensor) -> Tensor:
    y = x.unsqueeze(2)
    for axis in range(3, x.dim() + 1):
        index = (slice(None),) * axis
        y = _haar_step(y[(*index, slice(0, None, 2))], y[(*index, slice(1, None, 2))])
    return y.flatten(1, 2)


def _haar_step(even: Tensor, odd: Tensor) -> Tensor:
    """Low and high of each pair as a new least significant band bit."""
    scale = 1.0 / math.sqrt(2.0)
    return torch.stack([(even + odd) * scale, (even - odd) * scale], dim=3).flatten(2, 3)


def haar_matrix(dims: int) -> Tensor:
    """The (2^d, 2^d) matrix H with bands = H @ phases (float64), symmetric and orthogonal.

    The Kronecker power of [[1, 1], [1, -1]] / sqrt(2), rows and columns in row-major bit
    order (the order of `space_to_depth` phases and of `haar_transform` bands).
    """
    row = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    matrix = row
    for _ in range(dims - 1):
        matrix = torch.kron(matrix, row)
    return matrix


class HaarConv(nn.Module):
    """Zero padding, the level-1 Haar transform, then a stride-1 convolution.

    Stands in for a stride-2 convolution or pooling op (kernel `op_kernel`, padding
    `op_padding`, dilation `op_dilation`) with its output size: per spatial dim of length i,

        T = floor((i + 2p - d(k-1) - 1) / 2) + 1

    and the input is padded p + `offset` on the left (a negative value crops) and on the
    right to exactly 2 (T + K - 1) positions, K the inner kernel size, so the inner conv
    (`conv`, in_channels * 2^d -> out_channels, K taps, no padding, input channels in
    `haar_transform`'s channel-major order so `groups` stay intact) returns T positions for
    every input size, odd sizes included. kernel_size=1 with a kernel-2 op is the paper's form
    (Haar then 1×1 conv).

    Build it with `from_conv` or `from_pool`, which say whether the weights reproduce the
    original op ("exact"), start from an approximation ("approximate") or from PyTorch's
    default initialisation ("random"). Plain tensor ops only: scripts, traces and exports
    (ONNX) with dynamic batch and spatial sizes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dims: int = 2,
        kernel_size: int | Sequence[int] = 1,
        op_kernel: int | Sequence[int] = 2,
        op_padding: int | Sequence[int] = 0,
        op_dilation: int | Sequence[int] = 1,
        offset: int | Sequence[int] = 0,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        self.dims = dims
        self.kernel = per_dim(op_kernel, dims, "op_kernel")
        self.padding = per_dim(op_padding, dims, "op_padding")
        self.dilation = per_dim(op_dilation, dims, "op_dilation")
        self.offset = per_dim(offset, dims, "offset")
        inner = per_dim(kernel_size, dims, "kernel_size")
        if min(inner) < 1:
            raise ValueError(f"kernel_size must be >= 1, got {inner}")
        conv: Any = _CONVS[dims - 1]
        self.conv = conv(in_channels * 2**dims, out_channels, inner, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for i in range(self.dims):
            size = x.shape[2 + i]
            length = conv_output_size(size, self.kernel[i], 2, self.padding[i], self.dilation[i])
            left = self.padding[i] + self.offset[i]
            right = 2 * (length + self.conv.kernel_size[i] - 1) - size - left
            pads = [left, right] + pads  # noqa: RUF005 (TorchScript compiles this)
        return self.conv(haar_transform(F.pad(x, pads)))

    def extra_repr(self) -> str:
        text = f"op_kernel={self.kernel}, op_padding={self.padding}"
        if max(self.dilation) > 1:
            text += f", op_dilation={self.dilation}"
        if any(self.offset):
            text += f", offset={self.offset}"
        return text

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable) that rebuild this layer."""
        return {
            "in_channels": self.conv.in_channels // 2**self.dims,
            "out_channels": self.conv.out_channels,
            "dims": self.dims,
            "kernel_size": list(self.conv.kernel_size),
            "op_kernel": list(self.kernel),
            "op_padding": list(self.padding),
            "op_dilation": list(self.dilation),
            "offset": list(self.offset),
            "groups": self.conv.groups,
            "bias": self.conv.bias is not None,
        }

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        *,
        kernel_size: int | Sequence[int] | None = None,
        init: str = "transfer",
    ) -> tuple[HaarConv, Transfer]:
        """A HaarConv with `conv`'s output size, and how its weights relate to `conv`'s.

        `conv` is an nn.Conv1d/2d/3d with stride 2 in every dim (any kernel, int padding,
        dilation, groups, bias; padding_mode 'zeros'); timm's SAME convs are refused.

        The stride-2 conv is exactly a space-to-depth conv whose kernel holds the original
        taps by phase (`SpaceToDepthConv.from_conv`, K = ceil(((k-1)d + 1) / 2) taps per dim),
        and the Haar bands are H @ phases with H orthogonal and symmetric, so the inner kernel
        W' H (H mixing each input channel's 2^d phases) reproduces the conv. kernel_size=None
        uses K: "exact" for every stride-2 conv (a kernel-2 conv gives the paper's 1×1 conv).
        kernel_size >= K places that kernel in the middle of a larger one (zeros around,
        padding moved to match): "exact". kernel_size < K keeps the middle K' taps of it
        (the paper's 1×1 on a 3×3 conv keeps the block holding the centre tap): "approximate".
        init="random": the same geometry with PyTorch's default initialisation ("random").
        """
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        dims = next((d for d, t in enumerate(_CONVS, start=1) if isinstance(conv, t)), 0)
        if not dims:
            raise ValueError(f"{type(conv).__name__} is not an nn.Conv1d/2d/3d")
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if type(conv).forward is not _CONVS[dims - 1].forward:
            raise ValueError(
                f"{type(conv).__name__} overrides forward (timm's SAME padding, say): its "
                "effective padding is not .padding, so HaarConv cannot reproduce it"
            )
        if tuple(conv.stride) != (2,) * dims:
            raise ValueError(
                f"{type(conv).__name__} has stride {tuple(conv.stride)}; HaarConv replaces "
                "stride-2 convolutions (2 in every spatial dim)"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{type(conv).__name__} uses padding_mode={conv.padding_mode!r}; HaarConv pads "
                "with zeros"
            )
        pad = conv.padding
        padding = (0,) * dims if isinstance(pad, str) else per_dim(pad, dims, "padding")
        kernel = tuple(conv.kernel_size)
        dilation = tuple(conv.dilation)
        weight: Tensor | None = None
        if init == "transfer":
            spd, _ = SpaceToDepthConv.from_conv(conv)
            weight = spd.conv.weight.detach()
            if conv.groups == 1:  # SPD orders phases first for dense convs
                weight = channel_major_kernel(weight, (2,) * dims)
        layer, verdict = cls._build(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            dims=dims,
            kernel=kernel,
            padding=padding,
            dilation=dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            kernel_size=kernel_size,
            weight=weight,
            reference=conv.weight,
        )
        if weight is not None and conv.bias is not None:
            with torch.no_grad():
                layer.conv.bias.copy_(conv.bias)
        return layer, verdict

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
        kernel_size: int | Sequence[int] | None = None,
        init: str = "transfer",
    ) -> tuple[HaarConv, Transfer]:
        """A depthwise HaarConv with a stride-2 pool's output size, and its transfer.

        Takes `SpaceToDepthConv.from_pool`'s arguments (`pool_arguments(module)` plus
        `channels`); the inner conv is channels * 2^d -> channels with groups=channels and
        no bias. An average pool is a depthwise conv with weights 1/prod(kernel), so the
        transfer follows `SpaceToDepthConv.from_pool`: "exact" where PyTorch divides every
        window by the same count (a 2×2 stride-2 average pool: LL / 2), else "approximate";
        a max pool starts from the average ("approximate"). kernel_size as in `from_conv`.
        Strides other than 2, ceil_mode and SAME ('same') padding raise ValueError.
        """
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        k = per_dim(kernel, dims, "kernel")
        s = k if stride is None or (isinstance(stride, Sequence) and not stride) else stride
        if per_dim(s, dims, "stride") != (2,) * dims:
            raise ValueError(f"HaarConv replaces stride-2 pools, got stride {s}")
        if ceil_mode or isinstance(padding, str):
            raise ValueError(
                "HaarConv computes conv output sizes: ceil_mode and 'same' pools are not "
                "supported (SpaceToDepthConv.from_pool handles them)"
            )
        spd, verdict = SpaceToDepthConv.from_pool(
            pool_kind,
            channels,
            dims,
            k,
            2,
            padding,
            dilation,
            ceil_mode,
            count_include_pad,
            divisor_override,
        )
        layer, placed = cls._build(
            in_channels=channels,
            out_channels=channels,
            dims=dims,
            kernel=k,
            padding=per_dim(padding, dims, "padding"),
            dilation=per_dim(dilation, dims, "dilation"),
            groups=channels,
            bias=False,
            kernel_size=kernel_size,
            weight=spd.conv.weight.detach() if init == "transfer" else None,
            reference=spd.conv.weight,
        )
        return layer, (placed if placed != "exact" else verdict)

    @classmethod
    def _build(
        cls,
        *,
        in_channels: int,
        out_channels: int,
        dims: int,
        kernel: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        bias: bool,
        kernel_size: int | Sequence[int] | None,
        weight: Tensor | None,
        reference: Tensor,
    ) -> tuple[HaarConv, Transfer]:
        """The layer around a channel-major space-to-depth kernel `weight` (O, I * 2^d, *K),
        mixed into Haar bands and placed in (or cropped to) `kernel_size` taps; None: random.
        `reference` gives the device and dtype."""
        exact = tuple(d * (k - 1) // 2 + 1 for k, d in zip(kernel, dilation, strict=True))
        inner = exact if kernel_size is None else per_dim(kernel_size, dims, "kernel_size")
        # blocks the exact kernel moves right inside the new one (negative: cropped from left)
        shift = tuple(
            (n - e) // 2 if n >= e else -((e - n) // 2) for n, e in zip(inner, exact, strict=True)
        )
        layer = cls(
            in_channels,
            out_channels,
            dims=dims,
            kernel_size=inner,
            op_kernel=kernel,
            op_padding=padding,
            op_dilation=dilation,
            offset=[2 * e for e in shift],
            groups=groups,
            bias=bias,
        ).to(device=reference.device, dtype=reference.dtype)
        if weight is None:
            return layer, "random"
        phases = 2**dims
        split = weight.reshape(weight.shape[0], -1, phases, *exact).to(torch.float64)
        mixed = torch.einsum("oip...,pb->oib...", split, haar_matrix(dims))
        placed = mixed.new_zeros((*mixed.shape[:3], *inner))
        target: list[Any] = [slice(None)] * 3
        source: list[Any] = [slice(None)] * 3
        for n, e, sh in zip(inner, exact, shift, strict=True):
            if n >= e:
                target.append(slice(sh, sh + e))
                source.append(slice(0, e))
            else:
                target.append(slice(0, n))
                source.append(slice(-sh, -sh + n))
        placed[tuple(target)] = mixed[tuple(source)]
        with torch.no_grad():
            layer.conv.weight.copy_(placed.reshape(layer.conv.weight.shape))
            if layer.conv.bias is not None:
                layer.conv.bias.zero_()
        fits = all(n >= e for n, e in zip(inner, exact, strict=True))
        return layer, ("exact" if fits else "approximate")
