"""Space-to-depth: each block of spatial positions moved into channels, a lossless copy.

A stride-s operation reads its input at offsets t*s + j*d. Splitting every index into
(position, phase) = divmod(index, s) turns it into a stride-1 operation over s^dims phase
channels; `space_to_depth` makes that split, `pad_space_to_depth` zero-pads first (what
SpaceToDepthConv runs). Each is a permutation of its input, so every formulation below gives
the same bits; which one runs depends on the mode and the layout:

- scripting and tracing: one view/permute/reshape copy, except that an ONNX export writes a
  phase-major 2-d square block as ONNX's own `SpaceToDepth` operator, whose output channels
  are ordered (block row, block column, channel): the phase-major order; torch.export and
  torch.compile: one strided slice per phase (plain ops, sizes that stay symbolic);
- eager, contiguous memory: the view copy, whose inner loop runs along the output rows;
- eager, channels-last, phase-major: one reshape copy of whole channel runs (one strided copy
  per phase below 8 channels); channel-major: float pairs written as complex numbers, so that
  the interleave of every channel's phases runs in a vectorised kernel;
- eager with padding on the CPU: one strided copy per phase into a zeroed output, no padded
  copy of the input; off the CPU `F.pad` then the copy (two kernels, measured faster on an
  NVIDIA H200), and channel-major square blocks there are `F.pixel_unshuffle`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from surgeon.layers.shapes import is_channels_last

__all__ = ["pad_space_to_depth", "space_to_depth"]


def space_to_depth(x: Tensor, block: tuple[int, ...], order: str = "channel") -> Tensor:
    """The input with each block of spatial positions moved into channels.

    `x` is (N, C, *spatial) with 1 to 3 spatial dims, each divisible by its entry of `block`.
    The result is (N, C * prod(block), *(spatial // block)) with, for order="channel",

        out[n, c * prod(block) + offset, *i] = x[n, c, *(i * block + phase)]

    where `offset` is the row-major index of `phase` within the block: the order
    `F.pixel_unshuffle` uses in 2d, so a grouped or depthwise convolution over the result keeps
    its `groups`. order="phase" puts the phase first, `out[n, offset * C + c, *i]`, as SPD-Conv's
    slicing + cat does (up to the order of the phases): in channels-last memory every phase is
    then a run of whole channel vectors, a plain copy instead of an interleave. It is a
    permutation of the input (exact for every dtype). The output is channels-last when the input
    is, contiguous otherwise.
    """
    if order not in ("channel", "phase"):
        raise ValueError(f"order must be 'channel' or 'phase', got {order!r}")
    blk = tuple(int(b) for b in block)
    if x.dim() < 3 or x.dim() > 5:
        raise ValueError(
            f"space_to_depth expects (N, C, *spatial) with 1-3 spatial dims, got {tuple(x.shape)}"
        )
    if len(blk) != x.dim() - 2:
        raise ValueError(
            f"block {blk} has {len(blk)} entries but the input has {x.dim() - 2} spatial dims"
        )
    if any(b < 1 for b in blk):
        raise ValueError(f"block entries must be >= 1, got {blk}")
    spatial = tuple(x.shape[2:])
    if any(size % b for size, b in zip(spatial, blk, strict=True)):
        raise ValueError(
            f"spatial size {spatial} is not divisible by block {blk}; pad the input first "
            "(SpaceToDepthConv does this for you)"
        )
    return _rearrange(
        x,
        list(blk),
        [size // b for size, b in zip(spatial, blk, strict=True)],
        order == "phase",
    )


def _rearrange(x: Tensor, block: list[int], reduced: list[int], phase_major: bool) -> Tensor:
    """Space-to-depth dispatch: a layout-aware copy in eager mode, plain views when exported.

    `reduced` is the output's spatial size (input size // block), passed in rather than divided
    out so that torch.export sees sizes that match by construction, not a divisibility guard.
    """
    if torch.jit.is_scripting():
        return _space_to_depth_view(x, block, reduced, phase_major)
    if torch.compiler.is_compiling():
        return _space_to_depth_slices(x, block, phase_major)
    if torch.jit.is_tracing():
        return _traced(x, block, reduced, phase_major)
    if x.device.type != "cpu" and not phase_major and len(block) == 2 and block[0] == block[1]:
        # GPUs: pixel_unshuffle is one kernel in channel-major order (faster than the view copy
        # there, docs/benchmarks.md "CUDA") and keeps channels-last memory as it is
        return F.pixel_unshuffle(x, block[0])
    channels_last = is_channels_last(x)
    if channels_last and phase_major and x.shape[1] >= _NARROW:
        # whole channel runs, one reshape copy
        return _space_to_depth_channels_last_phase_major(x, block, reduced)
    if channels_last:
        if not phase_major:
            return _space_to_depth_channels_last(x, block)
        return _space_to_depth_slices(x, block, phase_major)
    return _space_to_depth_view(x, block, reduced, phase_major)


# Below this many channels a channels-last phase-major copy moves runs too short to beat one
# strided copy per phase (an RGB stem: 1×3×224×224 in docs/benchmarks.md).
_NARROW = 8


def _space_to_depth_view(
    x: Tensor, block: list[int], reduced: list[int], phase_major: bool
) -> Tensor:
    # (N, C, S0, S1) -> (N, C, S0/b0, b0, S1/b1, b1) -> (N, C, b0, b1, S0/b0, S1/b1), or
    # (N, b0, b1, C, ...) phase-major: one copy, whose inner loop runs along the output rows.
    # Shapes are read once, outside any loop: TorchScript's profiling executor mis-handles
    # tensor shape reads inside loops.
    sz = x.shape
    dims = len(block)
    # TorchScript compiles this function: lists grow by append and +, never by unpacking
    split: list[int] = [sz[0], sz[1]]
    phases = 1
    for i in range(dims):
        split.append(reduced[i])
        split.append(block[i])
        phases = phases * block[i]
    inner = [3 + 2 * i for i in range(dims)]
    outer = [2 + 2 * i for i in range(dims)]
    perm = [0] + inner + [1] + outer if phase_major else [0, 1] + inner + outer  # noqa: RUF005
    return x.reshape(split).permute(perm).reshape([sz[0], sz[1] * phases] + reduced)  # noqa: RUF005


@torch.jit.unused
def _traced(x: Tensor, block: list[int], reduced: list[int], phase_major: bool) -> Tensor:
    # ONNX's SpaceToDepth is one operator with its own kernel in ONNX Runtime, against the
    # Reshape/Transpose/Reshape of the view copy (both are compared on the SPD layer shapes of
    # scripts/bench_deploy.py's formulation table); it exists for 2-d square blocks only.
    if phase_major and len(block) == 2 and block[0] == block[1] and torch.onnx.is_in_onnx_export():
        return _OnnxSpaceToDepth.apply(x, block[0])
    return _space_to_depth_view(x, block, reduced, phase_major)


class _OnnxSpaceToDepth(torch.autograd.Function):
    """Phase-major space-to-depth of a 2-d map, written to ONNX as its SpaceToDepth operator.

    Used only while `torch.onnx.export` traces a model: the exporter calls `symbolic` in place
    of recording the copy."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, block: int) -> Tensor:
        reduced = [x.shape[2] // block, x.shape[3] // block]
        return _space_to_depth_view(x, [block, block], reduced, True)

    @staticmethod
    def symbolic(graph: Any, x: Any, block: int) -> Any:
        return graph.op("SpaceToDepth", x, blocksize_i=block)


def _space_to_depth_slices(x: Tensor, block: list[int], phase_major: bool) -> Tensor:
    # The same permutation as strided slices, one per phase: concatenated (phase-major) or
    # stacked after the channels. Used under torch.export/torch.compile: splitting a padded dim
    # of symbolic length b*M by reshape makes the symbolic-shape engine prove (b*M) % M == 0,
    # which it cannot always do for the sums M is made of; slice lengths only divide by b.
    phases: list[Tensor] = []
    for phase in itertools.product(*(range(b) for b in block)):
        index: list[Any] = [slice(None), slice(None)]
        index += [slice(r, None, b) for r, b in zip(phase, block, strict=True)]
        phases.append(x[tuple(index)])
    if phase_major:
        return torch.cat(phases, dim=1)
    return torch.stack(phases, dim=2).flatten(1, 2)  # (N, C, P, *reduced) -> (N, C * P, ...)


@torch.jit.unused
def _space_to_depth_channels_last_phase_major(
    x: Tensor, block: list[int], reduced: list[int]
) -> Tensor:
    # Channels-last memory is (N, S0, S1, C): split each spatial dim into (position, phase) and
    # move the phases next to the channels, (N, S0/b0, S1/b1, b0, b1, C). The last block dim
    # and the channels stay one contiguous run (b1·C values) on both sides of the copy.
    n, c, dims = x.shape[0], x.shape[1], len(block)
    split = [n]
    for size, b in zip(reduced, block, strict=True):
        split += [size, b]
    src = x.permute([0, *range(2, dims + 2), 1]).view([*split, c])  # (n, s0, b0, s1, b1, ..., c)
    positions = [1 + 2 * i for i in range(dims)]
    staged = src.permute([0, *positions, *(p + 1 for p in positions), 2 * dims + 1])
    flat = staged.reshape([n, *reduced, math.prod(block) * c])
    return flat.permute([0, dims + 1, *range(1, dims + 1)])


@torch.jit.unused
def _space_to_depth_channels_last(x: Tensor, block: list[int]) -> Tensor:
    # Channel-major order means every channel's phases sit next to each other in a
    # channels-last output, so the copy has to interleave. Writing float pairs as one complex
    # number lets the last block dim (usually 2) interleave inside a vectorised kernel; the
    # bits move untouched (NaN payloads included). Other cases stage a phase-major copy of
    # contiguous channel runs and then transpose (phase, channel) per position.
    n, c = x.shape[0], x.shape[1]
    dims = len(block)
    reduced = [x.shape[2 + i] // block[i] for i in range(dims)]
    phases = math.prod(block)
    split = [n]
    for size, b in zip(reduced, block, strict=True):
        split += [size, b]
    src = x.permute([0, *range(2, dims + 2), 1]).view([*split, c])  # (n, s0, b0, s1, b1, ..., c)
    positions = [1 + 2 * i for i in range(dims)]
    complex_dtype = {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(x.dtype)
    pairs = block[-1] == 2 and complex_dtype is not None
    if pairs and not (torch.is_grad_enabled() and x.requires_grad):
        out = torch.empty([n, *reduced, c, *block], dtype=x.dtype, device=x.device)
        paired = torch.view_as_complex(out)  # (n, *reduced, c, *block[:-1])
        for prefix in itertools.product(*(range(b) for b in block[:-1])):
            index: list[Any] = [slice(None)]
            for i in range(dims):
                index += [slice(None), prefix[i] if i < dims - 1 else 0]
            even = src[tuple(index)]
            index[-1] = 1
            odd = src[tuple(index)]
            target: tuple[Any, ...] = (Ellipsis, *prefix)
            torch.complex(even, odd, out=paired[target])
        flat = out.view([n, *reduced, c * phases])
    else:
        staged = src.permute(
            [0, *positions, *(p + 1 for p in positions), 2 * dims + 1]
        ).contiguous()
        flat = (
            staged.view([n, *reduced, phases, c])
            .transpose(-1, -2)
            .reshape([n, *reduced, c * phases])
        )
    return flat.permute([0, dims + 1, *range(1, dims + 1)])


def pad_space_to_depth(
    x: Tensor,
    pads: list[int],
    lefts: list[int],
    block: list[int],
    reduced: list[int],
    phase_major: bool,
) -> Tensor:
    """`space_to_depth(F.pad(x, pads), block)`, phase-major or channel-major, the padded map
    being `reduced` blocks long per dim.

    `pads` is `F.pad`'s list (last dim first; a negative right pad crops), `lefts` the left pads
    in dim order and `reduced` the output's spatial size: SpaceToDepthConv derives all three
    from one computation, so traced and exported graphs see sizes that match by construction.
    Eager CPU calls make no padded copy (except channel-major into channels-last memory, an
    interleave the unpadded path does faster); exports, which want plain ops, and other devices
    pad with `F.pad` and then copy.
    """
    if (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or x.device.type != "cpu"  # GPUs: two kernels, not a zeroed output and one per phase
        or (not phase_major and is_channels_last(x))
    ):
        return _rearrange(F.pad(x, pads), block, reduced, phase_major)
    return _padded_space_to_depth(x, lefts, block, reduced, phase_major)


@torch.jit.unused
def _padded_space_to_depth(
    x: Tensor, lefts: list[int], block: list[int], reduced: list[int], phase_major: bool = True
) -> Tensor:
    """Space-to-depth of `x` zero-padded by `lefts` on the left and to `reduced` blocks per dim
    (cropped if that is shorter), without the padded copy: each phase is one strided copy into
    a zeroed output laid out like `x` (channels-last in, channels-last out). Equal to
    `_rearrange(F.pad(x, pads), ...)`; eager mode only."""
    n, c, dims = x.shape[0], x.shape[1], len(block)
    phases = math.prod(block)
    channels_last = is_channels_last(x)
    spatial = list(range(1, dims + 1))
    if channels_last:
        out = x.new_zeros([n, *reduced, phases, c] if phase_major else [n, *reduced, c, phases])
        order = [dims + 1, dims + 2] if phase_major else [dims + 2, dims + 1]
        view = out.permute([0, *order, *spatial])  # (n, P, c, *reduced)
    else:
        out = x.new_zeros([n, phases, c, *reduced] if phase_major else [n, c, phases, *reduced])
        view = out if phase_major else out.transpose(1, 2)
    for index, phase in enumerate(itertools.product(*(range(b) for b in block))):
        src: list[Any] = [slice(None), slice(None)]
        dst: list[Any] = [slice(None), index, slice(None)]
        for size, b, left, r, blocks in zip(x.shape[2:], block, lefts, phase, reduced, strict=True):
            first = (r - left) % b  # the first input position that lands on phase r
            start = (first + left) // b  # ... in this block
            count = min(-(-(size - first) // b), blocks - start)
            if count <= 0:  # this phase only sees padding (or what the right end crops)
                break
            src.append(slice(first, first + (count - 1) * b + 1, b))
            dst.append(slice(start, start + count))
        else:
            view[tuple(dst)].copy_(x[tuple(src)])
    if channels_last:
        return out.view([n, *reduced, phases * c]).permute([0, dims + 1, *spatial])
    return out.view([n, phases * c, *reduced])
