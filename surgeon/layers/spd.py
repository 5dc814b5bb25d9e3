"""Space-to-depth and SPD-Conv: a strided convolution or pooling rewritten as a lossless
rearrangement followed by a stride-1 convolution.

A stride-s operation reads its input at offsets t*s + j*d. Splitting every index into
(position, phase) = divmod(index, s) turns that into a stride-1 operation over s^dims phase
channels, so nothing is skipped and, for linear operations, nothing changes:

    conv(x, W, stride=s, padding=p)  ==  conv1(space_to_depth(zero_pad(x), s), W')

where W' holds W's taps rearranged by phase (zeros where no tap lands). `SpaceToDepthConv`
stores the original operation's arithmetic and pads every input so that its output has exactly
the original output size, odd sizes included.
"""

from __future__ import annotations

import importlib
import itertools
import math
import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.arithmetic import conv_output_size
from surgeon.layers import native, onednn

__all__ = ["SpaceToDepthConv", "Transfer", "pool_arguments", "space_to_depth"]

Transfer = Literal["exact", "approximate", "random"]
"""How a replacement's weights relate to the original op's: reproduces it exactly, starts from
the closest linear equivalent, or starts from PyTorch's default initialisation."""

_CONV_TYPES: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_INITS = ("transfer", "random")


# --------------------------------------------------------------------------- space-to-depth


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
        return _space_to_depth_view(x, block, reduced, phase_major)
    if x.device.type != "cpu" and not phase_major and len(block) == 2 and block[0] == block[1]:
        # GPUs: pixel_unshuffle is one kernel in channel-major order (H200, docs/benchmarks.md:
        # 2x faster than the view copy) and keeps channels-last memory as it is
        return F.pixel_unshuffle(x, block[0])
    channels_last = _is_channels_last(x)
    if channels_last and phase_major and x.shape[1] >= _NARROW:
        # whole channel runs, one reshape copy: as fast as the compiled kernel or faster
        return _space_to_depth_channels_last_phase_major(x, block, reduced)
    if block == [2, 2]:
        out = native.space_to_depth2(x, [0, 0], reduced, phase_major)
        if out is not None:
            return out
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


def _is_channels_last(x: Tensor) -> bool:
    if x.dim() < 3 or x.shape[1] == 1:
        return False
    perm = [0]  # built by append: TorchScript compiles this (it cannot unpack a range)
    for dim in range(2, x.dim()):
        perm.append(dim)
    perm.append(1)
    return x.permute(perm).is_contiguous()


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


def _pad_rearrange(
    x: Tensor,
    pads: list[int],
    lefts: list[int],
    block: list[int],
    reduced: list[int],
    phase_major: bool,
) -> Tensor:
    """Zero padding then space-to-depth: in eager mode in one pass (except channel-major into
    channels-last memory, an interleave that `_rearrange` does faster); for exports, which want
    plain ops, `F.pad` and `_rearrange`."""
    if (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or x.device.type != "cpu"  # GPUs: two kernels, not a zeroed output and one per phase
        or (not phase_major and _is_channels_last(x))
    ):
        return _rearrange(F.pad(x, pads), block, reduced, phase_major)
    if block == [2, 2]:
        out = native.space_to_depth2(x, lefts, reduced, phase_major)
        if out is not None:
            return out
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
    channels_last = _is_channels_last(x)
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


@torch.jit.unused
def _onednn_conv(x: Tensor, conv: nn.Module) -> Tensor | None:
    # the inner convolution's fast route in eager CPU inference (see surgeon.layers.onednn)
    assert isinstance(conv, nn.Conv2d)
    return onednn.conv2d(x, conv)


# --------------------------------------------------------------------------- shape arithmetic


def _clamp_low(value: int, bound: int) -> int:
    # max(value, 0), for -bound < value < bound. A comparison would freeze the branch taken on
    # the example input into a trace, so tracing gets it as arithmetic; torch.export gets a
    # symbolic Max, which its shape engine reasons about better than the arithmetic.
    if torch.jit.is_scripting():
        return max(value, 0)
    if torch.compiler.is_compiling():
        return torch.sym_max(value, 0)  # type: ignore[return-value]
    return value * (1 + value // bound)


def _output_length(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    # surgeon.arithmetic.pool_output_size without its branch: with ceil_mode there are
    # ceil(span / s) + 1 windows, less the last one if it starts at or past size + padding.
    # Its start is span + overhang, overhang = ceil(span / s) * s - span in [0, s), so it is
    # dropped iff overhang >= reach = ek - padding (>= 1, as padding <= ek / 2); the floor
    # division below is that test for a value bounded by `bound`.
    if not ceil_mode:
        return conv_output_size(size, kernel, stride, padding, dilation)
    count = conv_output_size(size + stride - 1, kernel, stride, padding, dilation)
    effective = dilation * (kernel - 1) + 1
    span = size + 2 * padding - effective
    overhang = (stride - span % stride) % stride
    reach = effective - padding
    bound = max(reach, stride)
    return count - (overhang - reach + bound) // bound


def _same_total(size: int, kernel: int, stride: int, dilation: int) -> int:
    # surgeon.arithmetic.same_padding's total, max((ceil(i/s) - 1) s + (k-1) d + 1 - i, 0),
    # rewritten with r = ceil(i/s) s - i in [0, s): it is r + ek - s, negative only if ek < s.
    effective = dilation * (kernel - 1) + 1
    total = (stride - size % stride) % stride + effective - stride
    if effective >= stride:
        return total
    return _clamp_low(total, stride)


# --------------------------------------------------------------------------- the module


class SpaceToDepthConv(nn.Module):
    """SPD-Conv: zero padding, space-to-depth by `block`, then a stride-1 convolution.

    Replaces a downsampling op (strided conv, max or average pooling) without changing its
    output size. For an input of length `i` per spatial dim, forward computes the original op's
    output length

        T = floor((i + 2p - d(k-1) - 1) / s) + 1          (ceil instead of floor with ceil_mode,
                                                          dropping a last window that starts in
                                                          the right padding, as PyTorch does)
        T = ceil(i / s)                                    (padding "same": TF/timm dynamic SAME;
                                                          a ceil-mode SAME pool counts windows on
                                                          the SAME-padded length)

    then pads `L` zeros on the left (the op's own left padding plus `offset`) and whatever on
    the right makes the rearranged length exactly `T + K - 1` blocks, for the inner kernel size
    `K` (a negative right pad crops input the op never reads). The inner convolution `conv`
    (`nn.Conv{1,2,3}d`, stride 1, no padding) therefore returns exactly `T` positions, for
    every input size the original op accepts, odd sizes included.

    `order` is `space_to_depth`'s channel order, which `conv.weight`'s input channels follow:
    "phase" (phase p of channel c at p*C + c; `from_conv` uses it for groups=1, where it is the
    faster copy in channels-last memory) or "channel" (c*P + p; grouped and depthwise convs,
    which need each group's channels together, and pools).

    Build it with `from_conv` or `from_pool`, which also say whether the weights reproduce the
    original op ("exact"), approximate it ("approximate") or are freshly initialised ("random").
    Forward uses integer arithmetic on shapes only, so the module scripts, traces and exports
    (torch.export, ONNX) with dynamic batch and spatial sizes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dims: int,
        block: Sequence[int],
        kernel_size: Sequence[int],
        op_kernel: Sequence[int],
        op_stride: Sequence[int],
        op_padding: int | Sequence[int] | str = 0,
        op_dilation: Sequence[int] | int = 1,
        ceil_mode: bool = False,
        offset: Sequence[int] | int = 0,
        keep_op_padding: bool = True,
        groups: int = 1,
        bias: bool = True,
        order: str = "channel",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if order not in ("channel", "phase"):
            raise ValueError(f"order must be 'channel' or 'phase', got {order!r}")
        if order == "phase" and groups != 1:
            raise ValueError(
                f"order='phase' needs groups=1 (got {groups}): a grouped conv reads each "
                "group's channels with all their phases, the channel-major order"
            )
        self.dims = dims
        self.phase_major = order == "phase"
        self.block = _per_dim(block, dims, "block")
        self.kernel = _per_dim(op_kernel, dims, "op_kernel")
        self.stride = _per_dim(op_stride, dims, "op_stride")
        self.dilation = _per_dim(op_dilation, dims, "op_dilation")
        self.same = isinstance(op_padding, str)
        if isinstance(op_padding, str):
            if op_padding != "same":
                raise ValueError(f"op_padding must be ints or 'same', got {op_padding!r}")
            self.padding = (0,) * dims
        else:
            self.padding = _per_dim(op_padding, dims, "op_padding")
        self.ceil_mode = bool(ceil_mode)
        self.offset = _per_dim(offset, dims, "offset")
        self.keep_op_padding = bool(keep_op_padding)
        inner = _per_dim(kernel_size, dims, "kernel_size")
        phases = math.prod(self.block)
        # eager mode runs grouped layers, and layers of fewer than _NARROW input channels (the
        # stem), as one strided convolution: see `_strided`
        self.eager_strided = groups > 1 or in_channels < _NARROW
        conv_type: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.conv = conv_type(
            in_channels * phases,
            out_channels,
            inner,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.shape[2:]
        pads: list[int] = []
        lefts: list[int] = []
        reduced: list[int] = []
        for i in range(self.dims):
            size = spatial[i]
            kernel = self.kernel[i]
            stride = self.stride[i]
            dilation = self.dilation[i]
            if self.same:
                total = _same_total(size, kernel, stride, dilation)
                op_left = total // 2
                if self.ceil_mode:
                    length = _output_length(size + total, kernel, stride, 0, dilation, True)
                else:
                    # SAME keeps ceil(i / s) positions: said directly, the count stays a plain
                    # floor division that torch.export can bound.
                    length = conv_output_size(size, 1, stride)
            else:
                op_left = self.padding[i]
                length = _output_length(size, kernel, stride, op_left, dilation, self.ceil_mode)
            left = self.offset[i]
            if self.keep_op_padding:
                left = left + op_left
            blocks = length + self.conv.kernel_size[i] - 1
            pads = [left, self.block[i] * blocks - size - left] + pads  # noqa: RUF005 (TorchScript)
            lefts.append(left)
            reduced.append(blocks)
        if self.eager_strided and not (
            torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        ):
            return self._strided(x, pads)
        rearranged = _pad_rearrange(x, pads, lefts, list(self.block), reduced, self.phase_major)
        if self.dims == 2 and not torch.jit.is_scripting():
            out = _onednn_conv(rearranged, self.conv)
            if out is not None:
                return out
        return self.conv(rearranged)

    @torch.jit.unused
    def _strided(self, x: Tensor, pads: list[int]) -> Tensor:
        """The same outputs as one strided convolution with the kernel's phases moved back into
        space (what `surgeon.fold` makes permanent), rebuilt from `conv.weight` on each call so
        that gradients still reach it. Grouped and depthwise layers take this path in eager
        mode, as a convolution with a few channels per group runs 4-10x slower per MAC on CPU
        than the strided depthwise one; so do narrow inputs (a 3-channel stem), where the
        space-to-depth copy and a 12-channel convolution cost 15-30% more than a strided
        convolution on 3 channels (docs/benchmarks.md)."""
        weight = spatial_kernel(self.conv.weight, self.block, self.phase_major)
        lefts, rights = pads[-2::-2], pads[-1::-2]  # F.pad order: last dim first
        return strided_conv(x, weight, self.conv.bias, self.block, lefts, rights, self.conv.groups)

    def extra_repr(self) -> str:
        padding = "'same'" if self.same else str(self.padding)
        text = (
            f"block={self.block}, op_kernel={self.kernel}, op_stride={self.stride}, "
            f"op_padding={padding}, op_dilation={self.dilation}"
        )
        if self.ceil_mode:
            text += ", ceil_mode=True"
        if any(self.offset):
            text += f", offset={self.offset}"
        if not self.keep_op_padding:
            text += ", keep_op_padding=False"
        if self.phase_major:
            text += ", order='phase'"
        return text

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        *,
        kernel_size: int | Sequence[int] | None = None,
        init: str = "transfer",
    ) -> tuple[SpaceToDepthConv, Transfer]:
        """An SPD-Conv with `conv`'s output size, and how its weights relate to `conv`'s.

        `conv` is an `nn.Conv1d/2d/3d` (any kernel, stride, padding, dilation, groups, bias;
        padding_mode 'zeros') or timm's `Conv2dSame`/`Conv2dSameExport` (TF-same padding).
        The block is the conv's stride (1 in dims it does not stride).

        init="transfer", kernel_size=None: exact. Tap j of the original kernel reads offset
        j*d, i.e. phase (j*d) mod s of block position (j*d) // s, so the inner kernel has
        K = ceil(((k-1)d + 1) / s) taps per dim, input channel phase*C + c (c*prod(s) + phase
        when the conv is grouped, see `order`), and zeros
        where no tap lands; the left pad is the conv's own. Bias is copied. Returns "exact".

        init="transfer", kernel_size=K' >= K: the exact kernel placed inside a K'-tap kernel
        with zeros around it, shifted by e = floor((s*K' - ek) / 2s) blocks so that the original
        receptive field sits in the middle of the new one; the input is padded e*s more on the
        left to match, so the output is still exactly the original's ("exact") while the extra
        taps give fine-tuning room. K' < K cannot hold the kernel: ValueError.

        init="random": fresh PyTorch-default weights ("random"). With kernel_size this is the
        paper's form: space-to-depth of the input (padded only on the right as the output size
        needs) and a stride-1 conv with K' taps and "same" padding (K'-1)//2 blocks on the left.
        """
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        dims, same = _conv_kind(conv)
        assert isinstance(conv, nn.modules.conv._ConvNd)
        kernel = tuple(conv.kernel_size)
        stride = tuple(conv.stride)
        dilation = tuple(conv.dilation)
        if max(stride) == 1:
            raise ValueError(
                f"{type(conv).__name__} has stride {stride}: nothing to rearrange "
                "(stride must be > 1)"
            )
        padding: tuple[int, ...] | str
        if same:
            padding = "same"
        elif isinstance(conv.padding, str):
            if conv.padding != "valid":
                raise ValueError(f"{type(conv).__name__} padding={conv.padding!r} is not supported")
            padding = (0,) * dims
        else:
            padding = tuple(conv.padding)
        module, verdict = _build(
            channels_in=conv.in_channels,
            channels_out=conv.out_channels,
            groups=conv.groups,
            bias=conv.bias is not None,
            dims=dims,
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            ceil_mode=False,
            kernel_size=kernel_size,
            init=init,
            weight=conv.weight,
            what=f"{type(conv).__name__}(kernel={kernel}, stride={stride}, dilation={dilation})",
            order="phase" if conv.groups == 1 else "channel",
        )
        if verdict == "exact" and conv.bias is not None:
            with torch.no_grad():
                module.conv.bias.copy_(conv.bias)
        return module, verdict

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
    ) -> tuple[SpaceToDepthConv, Transfer]:
        """An SPD-Conv with a pooling op's output size, and how its weights relate to the pool.

        Takes the pool's numbers (`pool_arguments(module)` extracts them from nn.MaxPool*,
        nn.AvgPool* and timm's MaxPool2dSame/AvgPool2dSame; functional call sites pass their
        arguments), so `stride=None` means the kernel size and `padding="same"` is timm's
        dynamic TF-same padding. The inner conv maps channels * prod(block) -> channels with
        groups=channels and no bias. Kernel sizes follow `from_conv`.

        Average pooling is a depthwise convolution with weights 1/prod(kernel), zero padding
        included, so the transfer is "exact" when that is a fixed linear map: ceil_mode off (a
        ceil-mode window hanging over the end is divided by its clipped size), and
        count_include_pad=True or no padding (otherwise border windows are divided by their
        in-image size) — timm's AvgPool2dSame pads explicitly, so its zeros always count. With
        divisor_override=D every window is its sum divided by D: weights 1/D, exact whatever
        the other flags. Otherwise the uniform kernel is an "approximate" start.

        Max pooling is not linear; the transfer starts from the averaging kernel over the same
        window, its closest linear equivalent, and is "approximate" (and max pooling's
        implicit -inf padding becomes zeros).
        """
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if pool_kind not in ("max", "avg"):
            raise ValueError(f"pool_kind must be 'max' or 'avg', got {pool_kind!r}")
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        k = _per_dim(kernel, dims, "kernel")
        s = (
            k
            if stride is None or (isinstance(stride, Sequence) and len(stride) == 0)
            else _per_dim(stride, dims, "stride")
        )
        d = _per_dim(dilation, dims, "dilation")
        if pool_kind == "avg" and max(d) != 1:
            raise ValueError(f"average pooling has no dilation, got {d}")
        if max(s) == 1:
            raise ValueError(
                f"{pool_kind} pool has stride {s}: nothing to rearrange (stride must be > 1)"
            )
        pad: tuple[int, ...] | str
        if isinstance(padding, str):
            if padding != "same":
                raise ValueError(f"padding must be ints or 'same', got {padding!r}")
            pad = "same"
        else:
            pad = _per_dim(padding, dims, "padding")
            for pi, ki, di in zip(pad, k, d, strict=True):
                if 2 * pi > di * (ki - 1) + 1:
                    raise ValueError(
                        f"padding {pad} is more than half the effective kernel {k} (dilation {d})"
                    )
        taps = divisor_override if divisor_override is not None else math.prod(k)
        weight = torch.full((channels, 1, *k), 1.0 / taps)
        verdict: Transfer = "exact"
        if pool_kind == "max":
            verdict = "approximate"
        elif divisor_override is None:
            pads_excluded = not count_include_pad and pad != "same" and any(pad)
            if ceil_mode or pads_excluded:
                verdict = "approximate"
        module, built = _build(
            channels_in=channels,
            channels_out=channels,
            groups=channels,
            bias=False,
            dims=dims,
            kernel=k,
            stride=s,
            padding=pad,
            dilation=d,
            ceil_mode=ceil_mode,
            kernel_size=kernel_size,
            init=init,
            weight=weight,
            what=f"{pool_kind} pool(kernel={k}, stride={s}, dilation={d})",
        )
        return module, ("random" if built == "random" else verdict)


def pool_arguments(module: nn.Module) -> dict[str, Any]:
    """The arguments `SpaceToDepthConv.from_pool` needs (all but `channels`) from a pool module.

    Accepts nn.MaxPool1d/2d/3d, nn.AvgPool1d/2d/3d and timm's MaxPool2dSame/AvgPool2dSame
    (reported with padding="same"); anything else, or a max pool with return_indices, raises
    ValueError.
    """
    same_types = _timm_types("MaxPool2dSame", "AvgPool2dSame")
    same = isinstance(module, same_types) if same_types else False
    max_types = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
    avg_types = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
    for pool_type, dims in max_types.items():
        if isinstance(module, pool_type):
            # timm's MaxPool2dSame passes ceil_mode into nn.MaxPool2d's return_indices slot; its
            # forward reads neither, so only a real return_indices counts
            if module.return_indices and not same:
                raise ValueError(
                    f"{type(module).__name__} returns indices; SPD-Conv cannot replace it"
                )
            return {
                "pool_kind": "max",
                "dims": dims,
                "kernel": _per_dim(module.kernel_size, dims, "kernel"),
                "stride": _per_dim(module.stride, dims, "stride"),
                "padding": "same" if same else _per_dim(module.padding, dims, "padding"),
                "dilation": _per_dim(module.dilation, dims, "dilation"),
                "ceil_mode": bool(module.ceil_mode),
            }
    for avg_type, dims in avg_types.items():
        if isinstance(module, avg_type):
            pool: Any = module
            return {
                "pool_kind": "avg",
                "dims": dims,
                "kernel": _per_dim(pool.kernel_size, dims, "kernel"),
                "stride": _per_dim(pool.stride, dims, "stride"),
                "padding": "same" if same else _per_dim(pool.padding, dims, "padding"),
                "ceil_mode": bool(pool.ceil_mode),
                "count_include_pad": bool(pool.count_include_pad),
                "divisor_override": getattr(pool, "divisor_override", None),
            }
    raise ValueError(
        f"{type(module).__name__} is not a max or average pooling module SPD-Conv can replace"
    )


# --------------------------------------------------------------------------- helpers


def _per_dim(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ValueError(f"{name} {values} has {len(values)} entries for {dims} spatial dims")
    return values


def _timm_types(*names: str) -> tuple[type, ...]:
    # No module can be an instance of a timm class before timm is imported: skip the import.
    if "timm" not in sys.modules:
        return ()
    # timm.layers re-exports a *function* named conv2d_same, so import the modules by path.
    try:
        modules = [
            importlib.import_module(f"timm.layers.{m}") for m in ("conv2d_same", "pool2d_same")
        ]
    except ImportError:  # timm is optional for the layers themselves
        return ()
    return tuple(getattr(m, n) for n in names for m in modules if hasattr(m, n))


def _conv_kind(conv: nn.Module) -> tuple[int, bool]:
    """(spatial dims, uses dynamic TF-same padding) of a supported convolution, else ValueError."""
    same_types = _timm_types("Conv2dSame", "Conv2dSameExport")
    dims = next((d for t, d in _CONV_TYPES.items() if isinstance(conv, t)), 0)
    if not dims:
        raise ValueError(
            f"{type(conv).__name__} is not an nn.Conv1d/2d/3d; SPD-Conv cannot transfer it"
        )
    same = bool(same_types) and isinstance(conv, same_types)
    known_forwards = {t.forward for t in _CONV_TYPES} | {t.forward for t in same_types}  # type: ignore[attr-defined]
    if type(conv).forward not in known_forwards:
        raise ValueError(
            f"{type(conv).__name__} overrides Conv{dims}d.forward, so its effective weight or "
            "padding may differ from .weight/.padding and a transfer could not be exact"
        )
    assert isinstance(conv, nn.modules.conv._ConvNd)
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{type(conv).__name__} uses padding_mode={conv.padding_mode!r}; SPD-Conv pads with "
            "zeros, so only padding_mode='zeros' transfers"
        )
    return dims, same


def _build(
    *,
    channels_in: int,
    channels_out: int,
    groups: int,
    bias: bool,
    dims: int,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    ceil_mode: bool,
    kernel_size: int | Sequence[int] | None,
    init: str,
    weight: Tensor,
    what: str,
    order: str = "channel",
) -> tuple[SpaceToDepthConv, Transfer]:
    block = stride
    effective = tuple(di * (ki - 1) + 1 for ki, di in zip(kernel, dilation, strict=True))
    exact = tuple((e - 1) // b + 1 for e, b in zip(effective, block, strict=True))
    inner = exact if kernel_size is None else _per_dim(kernel_size, dims, "kernel_size")
    if any(k < 1 for k in inner):
        raise ValueError(f"kernel_size must be >= 1, got {inner}")
    if init == "transfer" and any(k < e for k, e in zip(inner, exact, strict=True)):
        raise ValueError(
            f"kernel_size={inner} cannot hold {what}: an exact transfer needs {exact} taps per dim "
            f"(ceil(((k-1)*d + 1) / s)); use kernel_size >= {exact} or init='random'"
        )
    if init == "random" and kernel_size is not None:
        # The paper's form: "same" padding of the stride-1 conv, in blocks, on the left.
        offset = tuple(b * ((k - 1) // 2) for b, k in zip(block, inner, strict=True))
        keep_op_padding = False
        shift = (0,) * dims
    else:
        shift = tuple(
            (b * k - e) // (2 * b) for b, k, e in zip(block, inner, effective, strict=True)
        )
        offset = tuple(b * e for b, e in zip(block, shift, strict=True))
        keep_op_padding = True
    module = SpaceToDepthConv(
        channels_in,
        channels_out,
        dims=dims,
        block=block,
        kernel_size=inner,
        op_kernel=kernel,
        op_stride=stride,
        op_padding=padding,
        op_dilation=dilation,
        ceil_mode=ceil_mode,
        offset=offset,
        keep_op_padding=keep_op_padding,
        groups=groups,
        bias=bias,
        order=order,
        # a transferred kernel overwrites the default init: skip it (kaiming on a big kernel
        # costs as much as the rest of the rewrite)
        device=weight.device if init == "random" else "meta",
        dtype=weight.dtype,
    )
    if init == "random":
        return module, "random"
    module = module.to_empty(device=weight.device)
    kernel_cm = _rearrange_kernel(weight.detach(), block, dilation, inner, shift)
    with torch.no_grad():
        module.conv.weight.copy_(
            phase_major_kernel(kernel_cm, block) if order == "phase" else kernel_cm
        )
        if module.conv.bias is not None:
            module.conv.bias.zero_()
    return module, "exact"


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


def phase_major_kernel(weight: Tensor, block: Sequence[int]) -> Tensor:
    """A channel-major inner kernel (O, C*P, *k) in phase-major input order (O, P*C, *k)."""
    phases = math.prod(block)
    return weight.unflatten(1, (-1, phases)).transpose(1, 2).flatten(1, 2)


def channel_major_kernel(weight: Tensor, block: Sequence[int]) -> Tensor:
    """The inverse of `phase_major_kernel`."""
    phases = math.prod(block)
    return weight.unflatten(1, (phases, -1)).transpose(1, 2).flatten(1, 2)


def _rearrange_kernel(
    weight: Tensor,
    block: tuple[int, ...],
    dilation: tuple[int, ...],
    inner: tuple[int, ...],
    shift: tuple[int, ...],
) -> Tensor:
    """(O, I, *k) kernel of a stride-`block` op -> (O, I * prod(block), *inner) stride-1 kernel.

    Tap j reads input offset j*d = q*s + r: block position q (plus `shift`), phase r.
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
