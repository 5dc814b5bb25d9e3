"""Kernel transfer between a strided convolution and its space-to-depth form.

SPD-Conv's inner kernel (O, I * P, *K) over the P = prod(block) phase channels and the kernel
(O, I, *(b * K)) of a stride-b convolution on the input before space-to-depth hold the same
numbers: tap b*q + r of channel c is inner tap q of the phase-r channel of c. These functions
move a kernel between the two forms and between the two channel orders, and run the strided
form with asymmetric padding (`strided_conv` in eager mode, `padded_conv` in graphs, where
ONNX gets one Conv with asymmetric pads); `SpaceToDepthConv.from_conv`, its grouped and
narrow-input eager path, BlurPool's "conv" form, the folded layers and `surgeon.fold` use them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Transfer",
    "channel_major_kernel",
    "padded_conv",
    "phase_major_kernel",
    "rearrange_kernel",
    "spatial_kernel",
    "strided_conv",
]

Transfer = Literal["exact", "approximate", "random"]
"""How a replacement's weights relate to the original op's: reproduces it exactly, starts from
the closest linear equivalent, or starts from PyTorch's default initialisation."""


def spatial_kernel(weight: Tensor, block: Sequence[int], phase_major: bool = False) -> Tensor:
    """An SPD-Conv inner kernel (O, I*P, *K) as the kernel (O, I, *(b*K)) of the equivalent
    stride-`block` convolution on the input before space-to-depth: tap `b*q + r` of channel `c`
    is inner tap `q` of the phase-`r` channel of `c`. Differentiable (views and one copy)."""
    dims = len(block)
    if phase_major:
        weight = channel_major_kernel(weight, block)
    kernel = weight.shape[2:]
    split = weight.unflatten(1, (-1, *block))  # (O, I, *b, *K)
    order = [0, 1] + [d for i in range(dims) for d in (2 + dims + i, 2 + i)]
    return split.permute(order).reshape(
        weight.shape[0], -1, *(b * k for b, k in zip(block, kernel, strict=True))
    )


@torch.jit.unused
def strided_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    lefts: Sequence[int],
    rights: Sequence[int],
    groups: int,
) -> Tensor:
    """Convolution of `x` zero-padded by `lefts`/`rights` per dim (a negative right crops),
    without the padded copy where it can: the convolution's own symmetric padding covers the
    left, and only a right pad beyond it is padded explicitly; surplus outputs are cut off."""
    dims = len(stride)
    sizes = x.shape[2:]
    extra = [max(r - lo, 0) for lo, r in zip(lefts, rights, strict=True)]
    if any(extra):
        x = F.pad(x, [p for e in reversed(extra) for p in (0, e)])
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    out = conv(x, weight, bias, list(stride), list(lefts), 1, groups)
    for i in range(dims):
        length = (sizes[i] + lefts[i] + rights[i] - weight.shape[2 + i]) // stride[i] + 1
        if out.shape[2 + i] != length:
            out = out.narrow(2 + i, 0, length)
    return out


@torch.jit.unused
def padded_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    lefts: Sequence[int],
    rights: Sequence[int],
    groups: int,
) -> Tensor:
    """Convolution of `x` zero-padded by the same `lefts`/`rights` per dim at every size, for
    graphs: an ONNX export writes it as one Conv with asymmetric `pads` (no Pad node, so ONNX
    Runtime keeps the convolution in its blocked layout); anywhere else, `F.pad` then the
    convolution."""
    if torch.onnx.is_in_onnx_export():
        kernel = list(weight.shape[2:])
        return _OnnxPaddedConv.apply(
            x, weight, bias, list(stride), list(lefts), list(rights), groups, kernel
        )
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(stride) - 1]
    if list(lefts) == list(rights):
        return conv(x, weight, bias, list(stride), list(lefts), 1, groups)
    pads = [p for lo, r in zip(reversed(lefts), reversed(rights), strict=True) for p in (lo, r)]
    return conv(F.pad(x, pads), weight, bias, list(stride), 0, 1, groups)


class _OnnxPaddedConv(torch.autograd.Function):
    """`padded_conv` while `torch.onnx.export` traces: the exporter calls `symbolic`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: list[int],
        lefts: list[int],
        rights: list[int],
        groups: int,
        kernel: list[int],
    ) -> Tensor:
        pads = [p for lo, r in zip(reversed(lefts), reversed(rights), strict=True) for p in (lo, r)]
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(stride) - 1]
        return conv(F.pad(x, pads), weight, bias, stride, 0, 1, groups)

    @staticmethod
    def symbolic(
        graph: Any,
        x: Any,
        weight: Any,
        bias: Any,
        stride: list[int],
        lefts: list[int],
        rights: list[int],
        groups: int,
        kernel: list[int],
    ) -> Any:
        inputs = [x, weight] if bias is None else [x, weight, bias]
        return graph.op(
            "Conv",
            *inputs,
            kernel_shape_i=kernel,
            strides_i=stride,
            pads_i=lefts + rights,
            group_i=groups,
        )


def phase_major_kernel(weight: Tensor, block: Sequence[int]) -> Tensor:
    """A channel-major inner kernel (O, C*P, *k) in phase-major input order (O, P*C, *k)."""
    phases = math.prod(block)
    return weight.unflatten(1, (-1, phases)).transpose(1, 2).flatten(1, 2)


def channel_major_kernel(weight: Tensor, block: Sequence[int]) -> Tensor:
    """The inverse of `phase_major_kernel`."""
    phases = math.prod(block)
    return weight.unflatten(1, (phases, -1)).transpose(1, 2).flatten(1, 2)


def rearrange_kernel(
    weight: Tensor,
    block: Sequence[int],
    dilation: Sequence[int],
    inner: Sequence[int],
    shift: Sequence[int],
) -> Tensor:
    """The (O, I * prod(block), *inner) channel-major stride-1 kernel that, after
    space-to-depth by `block`, computes what the (O, I, *k) kernel of a stride-`block` op with
    `dilation` computes: tap j reads input offset j*d = q*s + r, so it lands at block position
    q (plus `shift`, the blocks of extra left padding) of phase channel r; zeros elsewhere.
    `inner` must hold every tap (SpaceToDepthConv.from_conv checks it).
    """
    out_channels, in_channels = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    new = weight.new_zeros((out_channels, in_channels, *block, *inner))
    for tap in itertools.product(*(range(k) for k in kernel)):
        offsets = [j * d for j, d in zip(tap, dilation, strict=True)]
        phase = tuple(o % b for o, b in zip(offsets, block, strict=True))
        position = tuple(e + o // b for e, o, b in zip(shift, offsets, block, strict=True))
        target: tuple[Any, ...] = (slice(None), slice(None), *phase, *position)
        source: tuple[Any, ...] = (slice(None), slice(None), *tap)
        new[target] = weight[source]
    return new.reshape(out_channels, in_channels * math.prod(block), *inner)
