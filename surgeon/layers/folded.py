"""FoldedSpaceToDepthConv: an SPD-Conv layer as the one strided convolution it equals.

Space-to-depth by b followed by a K-tap convolution on the b^dims phase channels is a b*K-tap
convolution with stride b on the input itself (`surgeon.layers.transfer.spatial_kernel`):
the same outputs, the same MACs, and no copy of the input. `surgeon.fold` builds these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.arithmetic import conv_output_size
from surgeon.layers.shapes import output_length, per_dim, same_total
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.transfer import padded_conv, strided_conv

__all__ = ["FoldedSpaceToDepthConv"]


class FoldedSpaceToDepthConv(nn.Module):
    """SPD-Conv folded into one strided convolution: the same outputs, no space-to-depth copy.

    Keeps the source layer's arithmetic (the op's kernel, stride, padding, dilation, ceil_mode,
    offset; see `SpaceToDepthConv`) so that for an input of length `i` it computes the op's
    output length `T`, pads `L = offset + op padding - trim` zeros on the left and
    `(T - 1)·b + k - i - L` on the right (negative pads crop), then runs `conv` (kernel
    `kernel_size` = k ≤ b·K, stride b = `block`, no padding): exactly the `T` positions the
    original op produces, for every input size. `trim` is how many leading all-zero taps per
    dim were cut from the folded kernel (`surgeon.fold.fold_space_to_depth`). Exact: the sums
    of the SPD form, reordered.

    In eager mode the padding is the convolution's own (symmetric) padding, with only the
    difference padded or cropped. In graphs (scripting, tracing, export, compile), padding that
    is the same at every size (integer op padding, no ceil_mode: see `constant_pads`) is the
    convolution's own, which ONNX writes as one Conv; size-dependent padding is an explicit pad,
    so the graph has no size-dependent branch. Build one from an SPD layer with `from_layer`.
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
        trim: int | Sequence[int] = 0,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        self.dims = dims
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
        self.trim = per_dim(trim, dims, "trim")
        conv_type: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.conv = conv_type(
            in_channels,
            out_channels,
            per_dim(kernel_size, dims, "kernel_size"),
            stride=self.block,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.constant_pads = self._constant_pads()

    def _constant_pads(self) -> list[int]:
        """F.pad's list of the padding that is the same at every input size, or [] when the
        padding depends on the size ('same' padding, ceil_mode, or a crop).

        With padding [l, r] the convolution gives floor((i + l + r - k) / b) + 1 positions,
        the op's floor((i + 2p - d(k_op - 1) - 1) / s) + 1 for every i when b = s and
        r = k - l + 2p - d(k_op - 1) - 1; its windows start where the size-dependent padding
        puts them (at -l), so the outputs are the same, and the extra zeros are never read."""
        if self.same or self.ceil_mode or self.block != self.stride:
            return []
        pads: list[int] = []
        for i in range(self.dims):
            left = self.offset[i] - self.trim[i] + (self.padding[i] if self.keep_op_padding else 0)
            span = self.dilation[i] * (self.kernel[i] - 1) + 1
            right = self.conv.kernel_size[i] - left + 2 * self.padding[i] - span
            if left < 0 or right < 0:
                return []
            pads = [left, right, *pads]
        return pads

    @classmethod
    def from_layer(
        cls, source: SpaceToDepthConv, weight: Tensor, trim: Sequence[int]
    ) -> FoldedSpaceToDepthConv:
        """The folded form of `source` with the folded kernel `weight` (O, C/g, *k), of which
        `trim` leading taps per dim were cut; the bias is `source`'s."""
        inner = source.conv
        config = source.config()
        del config["order"]  # the folded kernel is in spatial order
        config.update(
            in_channels=inner.in_channels // math.prod(source.block),
            kernel_size=tuple(weight.shape[2:]),
            trim=tuple(trim),
        )
        folded = cls(**config, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            folded.conv.weight.copy_(weight)
            if inner.bias is not None:
                folded.conv.bias.copy_(inner.bias)
        return folded

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `FoldedSpaceToDepthConv(**m.config())` has
        the same arithmetic and state-dict keys and shapes as `m`."""
        return {
            "in_channels": self.conv.in_channels,
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
            "trim": list(self.trim),
            "groups": self.conv.groups,
            "bias": self.conv.bias is not None,
        }

    def extra_repr(self) -> str:
        padding = "'same'" if self.same else str(self.padding)
        return (
            f"op_kernel={self.kernel}, op_stride={self.stride}, op_padding={padding}, "
            f"op_dilation={self.dilation}, offset={self.offset}, trim={self.trim}"
            + (", ceil_mode=True" if self.ceil_mode else "")
        )

    def _pads(self, spatial: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(left pads, right pads, output lengths) per dim; SpaceToDepthConv's arithmetic."""
        lefts: list[int] = []
        rights: list[int] = []
        lengths: list[int] = []
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
                    length = conv_output_size(size, 1, stride)
            else:
                op_left = self.padding[i]
                length = output_length(size, kernel, stride, op_left, dilation, self.ceil_mode)
            left = self.offset[i] - self.trim[i]
            if self.keep_op_padding:
                left = left + op_left
            lefts.append(left)
            rights.append((length - 1) * self.block[i] + self.conv.kernel_size[i] - size - left)
            lengths.append(length)
        return lefts, rights, lengths

    def _conv(self, x: Tensor, padding: list[int]) -> Tensor:
        weight, bias, stride, groups = (
            self.conv.weight,
            self.conv.bias,
            self.conv.stride,
            self.conv.groups,
        )
        if self.dims == 1:
            return F.conv1d(x, weight, bias, stride, padding, 1, groups)
        if self.dims == 2:
            return F.conv2d(x, weight, bias, stride, padding, 1, groups)
        return F.conv3d(x, weight, bias, stride, padding, 1, groups)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._portable(x)
        return self._eager(x)

    def _portable(self, x: Tensor) -> Tensor:
        if len(self.constant_pads) > 0:
            if torch.jit.is_scripting():
                return self._conv(F.pad(x, self.constant_pads), [0] * self.dims)
            return self._constant_padding(x)
        spatial = x.shape[2:]
        lefts, rights, _ = self._pads([spatial[i] for i in range(self.dims)])
        pads: list[int] = []
        for i in range(self.dims):
            pads = [lefts[i], rights[i]] + pads  # noqa: RUF005 (TorchScript has no * in lists)
        return self._conv(F.pad(x, pads), [0] * self.dims)

    @torch.jit.unused
    def _constant_padding(self, x: Tensor) -> Tensor:
        # the convolution's own padding: one ONNX Conv, no Pad node
        lefts, rights = self.constant_pads[-2::-2], self.constant_pads[-1::-2]
        conv = self.conv
        return padded_conv(x, conv.weight, conv.bias, conv.stride, lefts, rights, conv.groups)

    @torch.jit.unused
    def _eager(self, x: Tensor) -> Tensor:
        lefts, rights, _ = self._pads(list(x.shape[2:]))
        conv = self.conv
        return strided_conv(x, conv.weight, conv.bias, conv.stride, lefts, rights, conv.groups)
