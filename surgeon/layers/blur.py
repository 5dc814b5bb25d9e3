"""BlurPool: a fixed binomial low-pass filter applied before subsampling (Zhang 2019).

Striding without a low-pass aliases high frequencies, so a one-pixel shift of the input can
change the output a lot. BlurPool moves the stride of a downsampling op to a depthwise blur:
`op(stride=s)` becomes `op(stride=1)` followed by `BlurPool(stride=s)`, with the same output size.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.arithmetic import conv_output_size
from surgeon.layers.shapes import is_channels_last, output_length, per_dim
from surgeon.layers.transfer import padded_conv

__all__ = [
    "EXPORT_FORMS",
    "PAD_MODES",
    "BlurPool",
    "binomial_filter",
    "pad_by_gather",
    "pad_for_blur",
    "pad_for_blur_graph",
]

PAD_MODES = ("reflect", "replicate", "zero")
EXPORT_FORMS = ("gather", "pad", "separable", "conv")
"""How BlurPool runs when scripted, traced, compiled or exported (see `BlurPool`)."""

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

    The filters are non-persistent buffers (not in the state dict); the module has no
    parameters. On large channels-last inputs eager mode filters with the convolution's own
    zero padding, so no padded copy of the input is made, and then adds what the reflected
    (or replicated) border adds to the outputs that read it; that equals pad-then-filter up to
    float rounding.

    `export_form` is the formulation graphs see (scripting, tracing, ONNX, torch.compile,
    torch.export); all give the same outputs at every size, and `surgeon.fold` picks one per
    layer by timing them on the backend that will run the model:

    - "gather": padding by index gathers whose indices are computed from the input size, one
      depthwise convolution;
    - "pad": `F.pad` in `pad_mode`, one depthwise convolution. The test for maps too small to
      reflect stays in the graph: scripted, or an ONNX `If` when traced;
    - "separable": the same padding, then one 1-d depthwise convolution per spatial dim;
    - "conv" (zero padding without `ceil_source` only): the zeros are constant padding,
      [floor((f-1)/2), ceil((f-1)/2)] whatever the size (the convolution's own padding when
      symmetric), which ONNX Runtime fuses into the convolution.
    """

    if TYPE_CHECKING:  # a class-level annotation is a string TorchScript cannot resolve
        filter: Tensor
        taps: Tensor
    # plain class attributes, not annotations: see `filter` above
    border_min_numel = 1 << 20
    border_min_size = 48
    border_any_layout = False
    """Eager inputs take the border-correction path from `border_min_numel` elements with
    every spatial size at least `border_min_size`, and only in channels-last memory unless
    `border_any_layout`. Measured on the CPU (docs/benchmarks.md): there the corrections
    cost less than the padded copy they avoid; in contiguous (NCHW) memory gathering the
    border columns reads about as much as the copy, and on smaller inputs or maps (28 x 28)
    the extra small ops cost more than it."""

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
        export_form: str = "gather",
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if export_form not in EXPORT_FORMS:
            raise ValueError(f"export_form must be one of {EXPORT_FORMS}, got {export_form!r}")
        if export_form == "conv" and (pad_mode != "zero" or ceil_source is not None):
            raise ValueError(
                "export_form='conv' needs pad_mode='zero' and no ceil_source: only then is the "
                "padding the same constant for every input size"
            )
        self.export_form = export_form
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.dims = dims
        self.filter_size = filter_size
        self.stride = per_dim(stride, dims, "stride")
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
            self.source_kernel = per_dim(kernel, dims, "ceil_source kernel")
            self.source_padding = per_dim(padding, dims, "ceil_source padding")
            self.source_dilation = per_dim(dilation, dims, "ceil_source dilation")
        taps = binomial_filter(filter_size, dims)
        self.register_buffer(
            "filter", taps[None, None].repeat(channels, *([1] * (dims + 1))), persistent=False
        )
        # the 1-d filter of the separable form: the N-d filter is its outer product
        self.register_buffer("taps", binomial_filter(filter_size, 1), persistent=False)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `BlurPool(**m.config())` computes what `m`
        computes (the module has no state-dict entries)."""
        ceil_source = None
        if self.ceil_mode:
            ceil_source = [
                list(self.source_kernel),
                list(self.source_padding),
                list(self.source_dilation),
            ]
        return {
            "channels": self.channels,
            "dims": self.dims,
            "filter_size": self.filter_size,
            "stride": list(self.stride),
            "pad_mode": self.pad_mode,
            "ceil_source": ceil_source,
            "export_form": self.export_form,
        }

    def extra_repr(self) -> str:
        text = f"{self.channels}, dims={self.dims}, filter_size={self.filter_size}"
        text += f", stride={self.stride}, pad_mode={self.pad_mode!r}"
        if self.ceil_mode:
            source = (self.source_kernel, self.source_padding, self.source_dilation)
            text += f", ceil_source={source}"
        if self.export_form != "gather":
            text += f", export_form={self.export_form!r}"
        return text

    # ----------------------------------------------------------------------- arithmetic

    def _length(self, size: int, i: int) -> int:
        return _blur_length(
            size,
            self.stride[i],
            self.ceil_mode,
            self.source_kernel[i],
            self.source_padding[i],
            self.source_dilation[i],
        )

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
        if self.export_form == "gather":
            return self._gathered(x)
        if self.export_form == "conv":
            left = (self.filter_size - 1) // 2
            right = self.filter_size - 1 - left
            if left == right:
                return self._conv(x, [left] * self.dims)
            if torch.jit.is_scripting():
                return self._conv(F.pad(x, [left, right] * self.dims), [0] * self.dims)
            return self._padded_conv(x, left, right)
        stride, kernel, padding, dilation = self._arithmetic()
        if torch.jit.is_scripting():  # TorchScript keeps pad_for_blur's branch as it is
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
        else:
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
        if self.export_form == "pad":
            return self._conv(padded, [0] * self.dims)
        return self._separable(padded)

    def _arithmetic(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """stride, and the ceil_mode source's kernel, padding and dilation, as lists."""
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

    @torch.jit.unused
    def _padded_conv(self, x: Tensor, left: int, right: int) -> Tensor:
        weight = self.filter if self.filter.dtype == x.dtype else self.filter.to(x.dtype)
        sides = [left] * self.dims, [right] * self.dims
        return padded_conv(x, weight, None, self.stride, *sides, self.channels)

    def _separable(self, x: Tensor) -> Tensor:
        taps = self.taps if self.taps.dtype == x.dtype else self.taps.to(x.dtype)
        for d in range(self.dims):
            view = [1, 1]
            stride: list[int] = []
            for i in range(self.dims):
                view.append(self.filter_size if i == d else 1)
                stride.append(self.stride[d] if i == d else 1)
            weight = taps.reshape(view).expand([self.channels] + view[1:])  # noqa: RUF005
            if self.dims == 1:
                x = F.conv1d(x, weight, None, stride, 0, 1, self.channels)
            elif self.dims == 2:
                x = F.conv2d(x, weight, None, stride, 0, 1, self.channels)
            else:
                x = F.conv3d(x, weight, None, stride, 0, 1, self.channels)
        return x

    def _gathered(self, x: Tensor) -> Tensor:
        stride, kernel, padding, dilation = self._arithmetic()
        padded = pad_by_gather(
            x, self.filter_size, stride, self.pad_mode, self.ceil_mode, kernel, padding, dilation
        )
        return self._conv(padded, [0] * self.dims)

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
        if x.device.type != "cpu":
            # the border corrections are a CPU tuning; on a GPU one pad and one convolution
            # measured fastest (H200, docs/benchmarks.md)
            return self._reference(x, mode, [(left, r) for r in rights])
        slow = (
            x.numel() < self.border_min_numel
            or min(sizes) < self.border_min_size
            or not (self.border_any_layout or is_channels_last(x))
        )
        # the zero-padded convolution must already give every output: odd lengths with even
        # filters and ceil-mode extras would need it grown by a copy (measured slower than
        # padding the input in most shape/layout pairs)
        interior = [
            (size + 2 * left - f) // s + 1 for size, s in zip(sizes, self.stride, strict=True)
        ]
        if slow or interior != lengths:
            return self._reference(x, mode, [(left, r) for r in rights])
        # The convolution's own zero padding keeps the alignment without copying the input;
        # what reflect or replicate padding adds is then added back to the border outputs.
        out = self._conv(x, [left] * self.dims)
        if mode == "zero":
            return out
        for d in range(self.dims):
            self._add_border(out, x, d, mode, [(left, r) for r in rights])
        return out

    @torch.jit.unused
    def _add_border(
        self, out: Tensor, x: Tensor, d: int, mode: str, pads: list[tuple[int, int]]
    ) -> None:
        # Every padded tap reads a mirrored (or clamped) input row of dim d. Split the filter
        # into its dim-d taps and the filter over the other dims: the border outputs gain
        # M @ rows, with M the dim-d taps that fall in the padding, the rows filtered over the
        # other dims first. Taps that are padding in an earlier dim were added by that dim's
        # pass, so here earlier dims pad with zeros and later dims with `mode`.
        targets, sources, matrix = _border_taps(
            x.shape[2 + d], self.stride[d], out.shape[2 + d], self.filter_size, mode
        )
        if not targets:
            return
        # one weight per target, each from its own source (filters below 5 taps): scale the
        # filter and add through strided views instead of gathering and multiplying
        scale = _single_weight(matrix)
        rows = _select(x, 2 + d, sources)
        if self.dims > 1:
            # filtered with dim d first, in the input's layout: a slab a few positions deep
            # in its last dim, or transposed against its channels, is several times slower
            order = [d, *(i for i in range(self.dims) if i != d)]
            layout = (torch.channels_last, torch.channels_last_3d)[self.dims - 2]
            rows = rows.movedim(2 + d, 2)
            rows = rows.contiguous(memory_format=layout) if is_channels_last(x) else rows
            later = [(0, 0)] + [pads[i] if i > d else (0, 0) for i in order[1:]]
            rows = self._padded(rows, mode, later)
            row_filter = _row_filter(self.filter_size, self.dims, d, scale, x.dtype, x.device)
            row_filter = row_filter.permute(order)
            weight = row_filter.expand(self.channels, 1, *row_filter.shape)
            stride = [1 if i == d else self.stride[i] for i in order]
            padding = [pads[i][0] if i < d else 0 for i in order]
            conv = (F.conv2d, F.conv3d)[self.dims - 2]
            rows = conv(rows, weight, None, stride, padding, 1, self.channels)
            rows = rows.movedim(2, 2 + d)
        elif scale is not None:
            rows = rows * scale
        if scale is None:
            taps = torch.tensor(matrix, dtype=x.dtype, device=x.device)
            rows = torch.matmul(rows.movedim(2 + d, -1), taps.T).movedim(-1, 2 + d)
        if _step(targets) is not None:
            _select(out, 2 + d, targets).add_(rows)
        else:
            out.index_add_(2 + d, torch.tensor(targets, device=x.device), rows)

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


def _blur_length(
    size: int, stride: int, ceil_mode: bool, kernel: int, padding: int, dilation: int
) -> int:
    """BlurPool's output length for a map of `size`: ceil(size / stride), or the ceil_mode
    pool's length when the map came from one (see `BlurPool`)."""
    if not ceil_mode:
        return conv_output_size(size, 1, stride)  # ceil(size / stride)
    original = size - 2 * padding + dilation * (kernel - 1)
    return output_length(original, kernel, stride, padding, dilation, True)


def pad_for_blur(
    x: Tensor,
    filter_size: int,
    stride: list[int],
    pad_mode: str,
    ceil_mode: bool,
    kernel: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """`x` padded as BlurPool pads it before filtering with stride `stride`, with plain `F.pad`.

    Per spatial dim floor((f-1)/2) on the left and what the output length needs on the right
    (a negative right pad crops). Reflect padding falls back to replicate in every dim when
    some dim is too short to reflect, as BlurPool does. `kernel`, `padding` and `dilation`
    describe a ceil_mode source (ignored unless `ceil_mode`).
    """
    dims = len(stride)
    left = (filter_size - 1) // 2
    pads: list[int] = []
    reflectable = True
    for i in range(dims):
        size = x.shape[2 + i]
        length = _blur_length(size, stride[i], ceil_mode, kernel[i], padding[i], dilation[i])
        right = (length - 1) * stride[i] + filter_size - size - left
        if right < 0:
            x = x.narrow(2 + i, 0, size + right)
            right = 0
        pads = [left, right] + pads  # noqa: RUF005 (TorchScript compiles this)
        if left >= size or right >= size:
            reflectable = False
    if pad_mode == "zero":
        return F.pad(x, pads)
    if pad_mode == "reflect" and reflectable:
        return F.pad(x, pads, mode="reflect")
    return F.pad(x, pads, mode="replicate")


def pad_by_gather(
    x: Tensor,
    filter_size: int,
    stride: list[int],
    pad_mode: str,
    ceil_mode: bool,
    kernel: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """`pad_for_blur` without a branch on the sizes: reflect and replicate padding are index
    gathers, and the indices (computed from the input size) pick reflect or, when reflect would
    read past the far edge in any dim, replicate, so one graph serves every size."""
    dims = len(stride)
    left = (filter_size - 1) // 2
    pads: list[int] = []
    mirrored: list[Tensor] = []
    clamped: list[Tensor] = []
    unreachable = torch.zeros((), dtype=torch.bool, device=x.device)
    for i in range(dims):
        size = x.shape[2 + i]
        length = _blur_length(size, stride[i], ceil_mode, kernel[i], padding[i], dilation[i])
        right = (length - 1) * stride[i] + filter_size - size - left
        pads = [left, right] + pads  # noqa: RUF005 (TorchScript compiles this)
        position = torch.arange(-left, size + right, device=x.device)
        last = size - 1
        clamped.append(position.clamp(0, last))
        reflected = last - (last - position.abs()).abs()
        mirrored.append(reflected)
        unreachable = unreachable | ((reflected < 0) | (reflected > last)).any()
    if pad_mode == "zero":
        return F.pad(x, pads)
    for i in range(dims):
        index = (
            clamped[i]
            if pad_mode == "replicate"
            else torch.where(unreachable, clamped[i], mirrored[i])
        )
        x = x.index_select(2 + i, index)
    return x


@torch.jit.unused
def pad_for_blur_graph(
    x: Tensor,
    filter_size: int,
    stride: list[int],
    pad_mode: str,
    ceil_mode: bool,
    kernel: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """`pad_for_blur` as traced and compiled graphs must see it.

    torch.compile guards on the sizes, so plain `pad_for_blur` serves. torch.export cannot keep
    a branch on symbolic sizes: padding is `pad_by_gather` there. A trace (TorchScript,
    the ONNX exporter) would freeze the test for maps too short to reflect at the example's
    size: here sizes, pads and that test are recorded as tensor arithmetic, and the choice
    between reflect and replicate padding is a branch of a scripted function (an ONNX If)."""
    arguments = (filter_size, stride, pad_mode, ceil_mode, kernel, padding, dilation)
    if torch.compiler.is_exporting():
        # torch.export cannot keep a branch on symbolic sizes: index arithmetic decides
        return pad_by_gather(x, *arguments)
    if pad_mode != "reflect" or not torch.jit.is_tracing():
        return pad_for_blur(x, *arguments)
    left = (filter_size - 1) // 2
    pads: list[Tensor] = []
    reflectable = torch.ones((), dtype=torch.bool)
    for i in range(len(stride)):
        size = x.shape[2 + i]
        length = _blur_length(size, stride[i], ceil_mode, kernel[i], padding[i], dilation[i])
        right = (length - 1) * stride[i] + filter_size - size - left
        if right < 0:  # only for filters shorter than the stride: the same at every size
            x = x.narrow(2 + i, 0, size + right)
            right = 0
        pads = [torch.as_tensor(left), torch.as_tensor(right), *pads]
        reflectable = reflectable & torch.as_tensor(left < size) & torch.as_tensor(right < size)
    return _reflect_or_replicate()[len(stride)](x, torch.stack(pads), reflectable)


def _reflect_or_replicate_1d(x: Tensor, pads: Tensor, reflect: Tensor) -> Tensor:
    flat = [int(pads[0]), int(pads[1])]
    if bool(reflect):
        return F.pad(x, flat, mode="reflect")
    return F.pad(x, flat, mode="replicate")


def _reflect_or_replicate_2d(x: Tensor, pads: Tensor, reflect: Tensor) -> Tensor:
    flat = [int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])]
    if bool(reflect):
        return F.pad(x, flat, mode="reflect")
    return F.pad(x, flat, mode="replicate")


def _reflect_or_replicate_3d(x: Tensor, pads: Tensor, reflect: Tensor) -> Tensor:
    flat = [int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3]), int(pads[4]), int(pads[5])]
    if bool(reflect):
        return F.pad(x, flat, mode="reflect")
    return F.pad(x, flat, mode="replicate")


@functools.cache
def _reflect_or_replicate() -> dict[int, Any]:
    """{dims: the padding choice, compiled by TorchScript once}. Written out per rank: a
    scripted loop or a list of ints passed in would reach ONNX as a Loop or as constants."""
    return {
        1: torch.jit.script(_reflect_or_replicate_1d),
        2: torch.jit.script(_reflect_or_replicate_2d),
        3: torch.jit.script(_reflect_or_replicate_3d),
    }


@functools.lru_cache(maxsize=256)
def _border_taps(
    size: int, stride: int, length: int, filter_size: int, mode: str
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[float, ...], ...]]:
    """Which outputs of one dim read padding, which input positions that padding repeats, and
    the filter taps linking them: (targets, sources, matrix[target][source]).

    Output i reads positions stride * i + k - left for taps k; one outside [0, size) reads
    its reflection (or, for replicate, the nearest edge) instead.
    """
    left = (filter_size - 1) // 2
    row = _BINOMIAL_ROWS[filter_size]
    total = sum(row)
    top = range(min(length, -(-left // stride)))
    bottom = range(max(top.stop, (size - filter_size + left) // stride + 1), length)
    outputs = [*top, *bottom]
    taps: dict[int, dict[int, float]] = {}
    for i in outputs:
        for k, weight in enumerate(row):
            position = stride * i + k - left
            if 0 <= position < size:
                continue
            source = _source(position, size, mode)
            per = taps.setdefault(i, {})
            per[source] = per.get(source, 0.0) + weight / total
    sources = sorted({s for per in taps.values() for s in per})
    targets = sorted(taps)
    matrix = tuple(tuple(taps[t].get(s, 0.0) for s in sources) for t in targets)
    return tuple(targets), tuple(sources), matrix


def _source(position: int, size: int, mode: str) -> int:
    """The input position that position `position` of the padded dim reads (-1: a zero)."""
    if 0 <= position < size:
        return position
    if mode == "zero":
        return -1
    if mode == "reflect":
        return -position if position < 0 else 2 * (size - 1) - position
    return min(max(position, 0), size - 1)


def _single_weight(matrix: tuple[tuple[float, ...], ...]) -> float | None:
    """The weight when `matrix` is that weight times the identity, else None."""
    weight = matrix[0][0]
    identity = all(
        len(row) == len(matrix) and all(v == (weight if j == i else 0.0) for j, v in enumerate(row))
        for i, row in enumerate(matrix)
    )
    return weight if identity else None


def _step(index: tuple[int, ...]) -> int | None:
    """The common difference when `index` is evenly spaced and increasing, else None."""
    step = index[1] - index[0] if len(index) > 1 else 1
    return step if step > 0 and all(b - a == step for a, b in itertools.pairwise(index)) else None


def _select(x: Tensor, dim: int, index: tuple[int, ...]) -> Tensor:
    """x.index_select(dim, index), as a strided view when the indices are evenly spaced."""
    step = _step(index)
    if step is None:
        return x.index_select(dim, torch.tensor(index, device=x.device))
    view = x.narrow(dim, index[0], index[-1] - index[0] + 1)
    return view[(slice(None),) * dim + (slice(None, None, step),)]


@functools.lru_cache(maxsize=64)
def _row_filter(
    size: int, dims: int, d: int, scale: float | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The filter over every dim but d (length 1 in d), times `scale`: built once per key."""
    taps = binomial_filter(size, dims - 1).unsqueeze(d)
    return (taps * (1.0 if scale is None else scale)).to(dtype=dtype, device=device)
