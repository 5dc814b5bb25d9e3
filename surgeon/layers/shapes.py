"""Shape arithmetic the replacement layers share: per-dim arguments, output lengths, layouts.

The functions that forward passes call (`output_length`, `same_total`, `is_channels_last`) are
written so that TorchScript compiles them and tracing and torch.export keep every size
symbolic: no branch depends on a tensor size where a trace would freeze it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from surgeon.arithmetic import conv_output_size, transposed_output_size

__all__ = [
    "crop_to",
    "dim_tuples",
    "is_channels_last",
    "output_length",
    "per_dim",
    "same_total",
    "transposed_sizes",
]


def per_dim(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """`value` as one int per spatial dim: an int or a 1-entry sequence is repeated; a sequence
    of another length than `dims` raises ValueError naming `name`."""
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ValueError(f"{name} {values} has {len(values)} entries for {dims} spatial dims")
    return values


def dim_tuples(**values: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Each keyword's sequence as a tuple of ints, in the order given; ValueError unless all
    have one entry per spatial dim (1-3) of the same count."""
    tuples = tuple(tuple(int(v) for v in value) for value in values.values())
    dims = len(tuples[0])
    if not 1 <= dims <= 3 or any(len(t) != dims for t in tuples):
        named = ", ".join(f"{name}={list(t)}" for name, t in zip(values, tuples, strict=True))
        raise ValueError(f"{named}: each needs one entry per spatial dim (1-3), all alike")
    return tuples


def _clamp_low(value: int, bound: int) -> int:
    # max(value, 0), for -bound < value < bound. A comparison would freeze the branch taken on
    # the example input into a trace, so tracing gets it as arithmetic; torch.export gets a
    # symbolic Max, which its shape engine reasons about better than the arithmetic.
    if torch.jit.is_scripting():
        return max(value, 0)
    if torch.compiler.is_compiling():
        return torch.sym_max(value, 0)  # type: ignore[return-value]
    return value * (1 + value // bound)


def output_length(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    """`surgeon.arithmetic.pool_output_size` without its branch on the size, for forward passes.

    With ceil_mode there are ceil(span / s) + 1 windows, less the last one if it starts at or
    past size + padding. Its start is span + overhang, overhang = ceil(span / s) * s - span in
    [0, s), so it is dropped iff overhang >= reach = ek - padding (>= 1, as padding <= ek / 2);
    a floor division tests that for a value bounded by `bound`.
    """
    if not ceil_mode:
        return conv_output_size(size, kernel, stride, padding, dilation)
    count = conv_output_size(size + stride - 1, kernel, stride, padding, dilation)
    effective = dilation * (kernel - 1) + 1
    span = size + 2 * padding - effective
    overhang = (stride - span % stride) % stride
    reach = effective - padding
    bound = max(reach, stride)
    return count - (overhang - reach + bound) // bound


def same_total(size: int, kernel: int, stride: int, dilation: int) -> int:
    """The total TF-"same" padding of one dim (`surgeon.arithmetic.same_padding`'s sum) without
    a branch on the size.

    max((ceil(i/s) - 1) s + (k-1) d + 1 - i, 0) with r = ceil(i/s) s - i in [0, s) is
    r + ek - s, negative only if ek < s.
    """
    effective = dilation * (kernel - 1) + 1
    total = (stride - size % stride) % stride + effective - stride
    if effective >= stride:
        return total
    return _clamp_low(total, stride)


def is_channels_last(x: Tensor) -> bool:
    """Whether `x` (N, C, *spatial) is laid out channels-last (channels innermost); False for
    a single channel, where both layouts are the same memory."""
    if x.dim() < 3 or x.shape[1] == 1:
        return False
    perm = [0]  # built by append: TorchScript compiles this (it cannot unpack a range)
    for dim in range(2, x.dim()):
        perm.append(dim)
    perm.append(1)
    return x.permute(perm).is_contiguous()


def transposed_sizes(
    sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_padding: Sequence[int],
) -> tuple[int, ...]:
    """A transposed convolution's output size per spatial dim for an input of `sizes`."""
    return tuple(
        transposed_output_size(n, k, s, p, d, op)
        for n, k, s, p, d, op in zip(
            sizes, kernel, stride, padding, dilation, output_padding, strict=True
        )
    )


def crop_to(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """`x` cut to at most `sizes` in its trailing spatial dims (a view; shorter dims are kept)."""
    for i, size in enumerate(sizes):
        dim = x.dim() - len(sizes) + i
        if x.shape[dim] > size:
            x = x.narrow(dim, 0, size)
    return x
