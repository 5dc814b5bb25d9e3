"""SPD-Conv: a strided convolution or pooling rewritten as a lossless rearrangement followed by
a stride-1 convolution (Sunkara & Luo 2022).

A stride-s operation reads its input at offsets t*s + j*d. Splitting every index into
(position, phase) = divmod(index, s) turns that into a stride-1 operation over s^dims phase
channels, so nothing is skipped and, for linear operations, nothing changes:

    conv(x, W, stride=s, padding=p)  ==  conv1(space_to_depth(zero_pad(x), s), W')

where W' holds W's taps rearranged by phase (zeros where no tap lands; `surgeon.layers.transfer`).
`SpaceToDepthConv` stores the original operation's arithmetic and pads every input so that its
output has exactly the original output size, odd sizes included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from surgeon.arithmetic import conv_output_size
from surgeon.layers.rearrange import pad_space_to_depth
from surgeon.layers.shapes import output_length, per_dim, same_total
from surgeon.layers.source_ops import conv_kind
from surgeon.layers.transfer import (
    Transfer,
    phase_major_kernel,
    rearrange_kernel,
    spatial_kernel,
    strided_conv,
)

__all__ = ["SpaceToDepthConv"]

_INITS = ("transfer", "random")
# Eager mode runs layers with fewer input channels than this (an RGB stem) as one strided
# convolution: see `SpaceToDepthConv._strided`.
_NARROW = 8


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
        block: int | Sequence[int],
        kernel_size: int | Sequence[int],
        op_kernel: int | Sequence[int],
        op_stride: int | Sequence[int],
        op_padding: int | Sequence[int] | str = 0,
        op_dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        offset: int | Sequence[int] = 0,
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
        self.block = per_dim(block, dims, "block")
        self.kernel = per_dim(op_kernel, dims, "op_kernel")
        self.stride = per_dim(op_stride, dims, "op_stride")
        self.dilation = per_dim(op_dilation, dims, "op_dilation")
        self.same = isinstance(op_padding, str)
        if isinstance(op_padding, str):
            if op_padding != "same":
                raise ValueError(f"op_padding must be ints or 'same', got {op_padding!r}")
            self.padding = (0,) * dims
        else:
            self.padding = per_dim(op_padding, dims, "op_padding")
        self.ceil_mode = bool(ceil_mode)
        self.offset = per_dim(offset, dims, "offset")
        self.keep_op_padding = bool(keep_op_padding)
        inner = per_dim(kernel_size, dims, "kernel_size")
        phases = math.prod(self.block)
        # eager mode runs grouped layers, and narrow inputs (the stem), as one strided
        # convolution: see `_strided`
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
                total = same_total(size, kernel, stride, dilation)
                op_left = total // 2
                if self.ceil_mode:
                    length = output_length(size + total, kernel, stride, 0, dilation, True)
                else:
                    # SAME keeps ceil(i / s) positions: said directly, the count stays a plain
                    # floor division that torch.export can bound.
                    length = conv_output_size(size, 1, stride)
            else:
                op_left = self.padding[i]
                length = output_length(size, kernel, stride, op_left, dilation, self.ceil_mode)
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
        rearranged = pad_space_to_depth(x, pads, lefts, list(self.block), reduced, self.phase_major)
        return self.conv(rearranged)

    @torch.jit.unused
    def _strided(self, x: Tensor, pads: list[int]) -> Tensor:
        """The same outputs as one strided convolution with the kernel's phases moved back into
        space (what `surgeon.fold` makes permanent), rebuilt from `conv.weight` on each call so
        that gradients still reach it. Grouped and depthwise layers take this path in eager
        mode, as a convolution with a few channels per group runs several times slower per MAC
        on CPU than the strided depthwise one; so do narrow inputs (a 3-channel stem), where the
        space-to-depth copy and a 12-channel convolution cost more than a strided convolution
        on 3 channels (docs/benchmarks.md)."""
        weight = spatial_kernel(self.conv.weight, self.block, self.phase_major)
        lefts, rights = pads[-2::-2], pads[-1::-2]  # F.pad order: last dim first
        return strided_conv(x, weight, self.conv.bias, self.block, lefts, rights, self.conv.groups)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `SpaceToDepthConv(**m.config())` has the
        same arithmetic and state-dict keys and shapes as `m`."""
        return {
            "in_channels": self.conv.in_channels // math.prod(self.block),
            "out_channels": self.conv.out_channels,
            "dims": self.dims,
            "block": list(self.block),
            "kernel_size": list(self.conv.kernel_size),
            "op_kernel": list(self.kernel),
            "op_stride": list(self.stride),
            "op_padding": "same" if self.same else list(self.padding),
            "op_dilation": list(self.dilation),
            "ceil_mode": self.ceil_mode,
            "offset": list(self.offset),
            "keep_op_padding": self.keep_op_padding,
            "groups": self.conv.groups,
            "bias": self.conv.bias is not None,
            "order": "phase" if self.phase_major else "channel",
        }

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
        dims, same = conv_kind(conv)
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
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
        k = per_dim(kernel, dims, "kernel")
        s = (
            k
            if stride is None or (isinstance(stride, Sequence) and len(stride) == 0)
            else per_dim(stride, dims, "stride")
        )
        d = per_dim(dilation, dims, "dilation")
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
            pad = per_dim(padding, dims, "padding")
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
    inner = exact if kernel_size is None else per_dim(kernel_size, dims, "kernel_size")
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
    kernel_cm = rearrange_kernel(weight.detach(), block, dilation, inner, shift)
    with torch.no_grad():
        module.conv.weight.copy_(
            phase_major_kernel(kernel_cm, block) if order == "phase" else kernel_cm
        )
        if module.conv.bias is not None:
            module.conv.bias.zero_()
    return module, "exact"
