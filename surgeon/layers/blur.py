"""BlurPool: a fixed binomial low-pass filter applied before subsampling (Zhang 2019).

Striding without a low-pass aliases high frequencies, so a one-pixel shift of the input can
change the output a lot. BlurPool moves the stride of a downsampling op to a depthwise blur:
`op(stride=s)` becomes `op(stride=1)` followed by `BlurPool(stride=s)`, with the same output size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.arithmetic import conv_output_size
from surgeon.layers.spd import _output_length, _per_dim

__all__ = ["PAD_MODES", "BlurPool", "binomial_filter"]

PAD_MODES = ("reflect", "replicate", "zero")

_BINOMIAL_ROWS = {
    1: (1,),
    2: (1, 1),
    3: (1, 2, 1),
    4: (1, 3, 3, 1),
    5: (1, 4, 6, 4, 1),
    6: (1, 5, 10, 10, 5, 1),
    7: (1, 6, 15, 20, 15, 6, 1),
}


def binomial_filter(size: int, dims: int) -> Tensor:
    """The `dims`-d binomial filter with `size` taps per dim, normalised to sum 1 (float32).

    Rows are Pascal's triangle, [1], [1, 1], [1, 2, 1], ... [1, 6, 15, 20, 15, 6, 1]; the N-d
    filter is their outer product. Sizes 1 to 7 only.
    """
    if size not in _BINOMIAL_ROWS:
        raise ValueError(f"filter size must be 1..7, got {size}")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    row = torch.tensor(_BINOMIAL_ROWS[size], dtype=torch.float64)
    full = functools.reduce(lambda acc, r: acc[..., None] * r, [row] * (dims - 1), row)
    return (full / full.sum()).to(torch.float32)


class BlurPool(nn.Module):
    """Depthwise binomial blur, then subsampling by `stride`: anti-aliased downsampling.

    Per spatial dim, an input of length L is padded [floor((f-1)/2), ceil((f-1)/2)] with
    `pad_mode` ("reflect", "replicate" or "zero") and filtered with stride s, so

        output length = ceil(L / s)

    which is also the output length of any ceil_mode=False conv or pool with stride s whose
    stride-1 version produced L (its strided length is floor((L-1)/s) + 1). For a ceil_mode=True
    pool, pass `ceil_source=(kernel, padding, dilation)`: the output length is then that pool's,
    `pool_output_size(H, k, s, p, d, ceil_mode=True)` with H = L - 2p + d(k-1) its input length,
    and the extra window is padded on the right like the rest.

    Only the padding the output actually reads is used, so reflect works down to maps of
    (padding + 1) positions; below that (a 1-wide map with filter 3, say) that call falls back
    to replicate padding instead of failing. filter_size 1 is plain subsampling.

    The filter is a non-persistent buffer (not in the state dict); the module has no
    parameters. On large inputs eager mode computes the interior with the convolution's own
    zero padding and recomputes only the border outputs from small padded slabs, which equals
    pad-then-filter up to float rounding without copying the input; scripting, tracing and
    export pad by gathers, so tiny maps fall back to replicate inside the graph too.
    """

    if TYPE_CHECKING:  # a class-level annotation is a string TorchScript cannot resolve
        filter: Tensor
    # plain class attributes, not annotations: see `filter` above
    border_min_numel = 1 << 20
    border_min_size = 48
    """Eager inputs with fewer elements, or a spatial size below `border_min_size`, take the
    plain pad-then-filter path: there the border recomputation costs more than the input copy
    it avoids (measured on a 2-core CPU, see docs/benchmarks.md)."""

    def __init__(
        self,
        channels: int,
        *,
        dims: int = 2,
        filter_size: int = 4,
        stride: int | Sequence[int] = 2,
        pad_mode: str = "reflect",
        ceil_source: tuple[int | Sequence[int], int | Sequence[int], int | Sequence[int]]
        | None = None,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.dims = dims
        self.filter_size = filter_size
        self.stride = _per_dim(stride, dims, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
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
            self.source_kernel = _per_dim(kernel, dims, "ceil_source kernel")
            self.source_padding = _per_dim(padding, dims, "ceil_source padding")
            self.source_dilation = _per_dim(dilation, dims, "ceil_source dilation")
        taps = binomial_filter(filter_size, dims)
        self.register_buffer(
            "filter", taps[None, None].repeat(channels, *([1] * (dims + 1))), persistent=False
        )

    def extra_repr(self) -> str:
        text = f"{self.channels}, dims={self.dims}, filter_size={self.filter_size}"
        text += f", stride={self.stride}, pad_mode={self.pad_mode!r}"
        if self.ceil_mode:
            source = (self.source_kernel, self.source_padding, self.source_dilation)
            text += f", ceil_source={source}"
        return text

    # ----------------------------------------------------------------------- arithmetic

    def _length(self, size: int, i: int) -> int:
        stride = self.stride[i]
        if not self.ceil_mode:
            return conv_output_size(size, 1, stride)  # ceil(size / stride)
        kernel = self.source_kernel[i]
        padding = self.source_padding[i]
        dilation = self.source_dilation[i]
        original = size - 2 * padding + dilation * (kernel - 1)
        return _output_length(original, kernel, stride, padding, dilation, True)

    def _conv(self, x: Tensor, padding: list[int]) -> Tensor:
        weight = self.filter if self.filter.dtype == x.dtype else self.filter.to(x.dtype)
        stride = list(self.stride)
        if self.dims == 1:
            return F.conv1d(x, weight, None, stride, padding, 1, self.channels)
        if self.dims == 2:
            return F.conv2d(x, weight, None, stride, padding, 1, self.channels)
        return F.conv3d(x, weight, None, stride, padding, 1, self.channels)

    # ----------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._portable(x)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._portable(x)
        return self._eager(x)

    def _portable(self, x: Tensor) -> Tensor:
        # Padding by gather: index arithmetic picks reflect or, when reflect would read past
        # the far edge in any dim, replicate, at run time, so one graph serves every size.
        spatial = x.shape[2:]
        left = (self.filter_size - 1) // 2
        pads: list[int] = []
        mirrored: list[Tensor] = []
        clamped: list[Tensor] = []
        unreachable = torch.zeros((), dtype=torch.bool, device=x.device)
        for i in range(self.dims):
            size = spatial[i]
            right = (self._length(size, i) - 1) * self.stride[i] + self.filter_size - size - left
            pads = [left, right] + pads  # noqa: RUF005 (TorchScript compiles this)
            position = torch.arange(-left, size + right, device=x.device)
            last = size - 1
            clamped.append(position.clamp(0, last))
            reflected = last - (last - position.abs()).abs()
            mirrored.append(reflected)
            unreachable = unreachable | ((reflected < 0) | (reflected > last)).any()
        if self.pad_mode == "zero":
            x = F.pad(x, pads)
        else:
            for i in range(self.dims):
                index = (
                    clamped[i]
                    if self.pad_mode == "replicate"
                    else torch.where(unreachable, clamped[i], mirrored[i])
                )
                x = x.index_select(2 + i, index)
        return self._conv(x, [0] * self.dims)

    @torch.jit.unused
    def _eager(self, x: Tensor) -> Tensor:
        f = self.filter_size
        left = (f - 1) // 2
        sizes = list(x.shape[2:])
        lengths = [self._length(size, i) for i, size in enumerate(sizes)]
        rights = [
            (t - 1) * s + f - size - left
            for t, s, size in zip(lengths, self.stride, sizes, strict=True)
        ]
        mode = self.pad_mode
        if mode == "reflect" and any(
            left >= size or right >= size for size, right in zip(sizes, rights, strict=True)
        ):
            mode = "replicate"
        if f == 1 and not self.ceil_mode:
            index: tuple[Any, ...] = (Ellipsis, *(slice(None, None, s) for s in self.stride))
            return x[index].clone()
        small = x.numel() < self.border_min_numel or min(sizes) < self.border_min_size
        if small:
            return self._reference(x, mode, [(left, r) for r in rights])
        # Interior: the convolution's own (symmetric, zero) padding keeps the alignment and
        # avoids copying the input. Outputs in [low, high) per dim read no padding, or only
        # padding that is zero anyway; the rest are recomputed from small padded slabs.
        interior = [
            (size + 2 * left - f) // s + 1 for size, s in zip(sizes, self.stride, strict=True)
        ]
        lows: list[int] = []
        highs: list[int] = []
        for size, s, right, have, t in zip(
            sizes, self.stride, rights, interior, lengths, strict=True
        ):
            lows.append(0 if mode == "zero" else -(-left // s))
            high = have if mode == "zero" else min(have, (size - f + left) // s + 1)
            if high < t:
                # the bottom slab starts at an output window and must hold every position its
                # right padding reads: the last one, and for reflect the ones it mirrors
                reach = size - 1 - (max(right, 0) if mode == "reflect" else 0)
                high = min(high, (reach + left) // s)
            highs.append(high)
        # the interior convolution must already have every output (odd lengths with even
        # filters, and ceil-mode extras, would need a copy to grow it: measured slower than
        # padding the input in 5 of 6 shape/layout pairs)
        complete = interior == lengths
        if not complete or any(h <= lo for lo, h in zip(lows, highs, strict=True)):
            return self._reference(x, mode, [(left, r) for r in rights])
        out = self._conv(x, [left] * self.dims)
        full = [(left, r) for r in rights]
        flat = [0] * self.dims
        for i, (size, s, t) in enumerate(zip(sizes, self.stride, lengths, strict=True)):
            low, high = lows[i], highs[i]
            if low > 0:
                rows = (low - 1) * s - left + f
                pads = [*full[:i], (left, 0), *full[i + 1 :]]
                top = self._padded(x.narrow(2 + i, 0, rows), mode, pads)
                out.narrow(2 + i, 0, low).copy_(self._conv(top, flat))
            if high < t:
                start = high * s - left
                pads = [*full[:i], (0, rights[i]), *full[i + 1 :]]
                bottom = self._padded(x.narrow(2 + i, start, size - start), mode, pads)
                out.narrow(2 + i, high, t - high).copy_(self._conv(bottom, flat))
        return out

    @torch.jit.unused
    def _padded(self, x: Tensor, mode: str, pads: list[tuple[int, int]]) -> Tensor:
        # pad each dim by (left, right) with `mode`; a negative right crops
        for i, (_, right) in enumerate(pads):
            if right < 0:
                x = x.narrow(2 + i, 0, x.shape[2 + i] + right)
        flat = [p for lr in reversed(pads) for p in (lr[0], max(lr[1], 0))]
        if not any(flat):
            return x
        return F.pad(x, flat) if mode == "zero" else F.pad(x, flat, mode=mode)

    @torch.jit.unused
    def _reference(self, x: Tensor, mode: str, pads: list[tuple[int, int]]) -> Tensor:
        # The straightforward definition: pad, then a valid strided depthwise convolution.
        return self._conv(self._padded(x, mode, pads), [0] * self.dims)
