"""PoolPad: the run-time padding that lets a padding-free convolution have a pool's windows.

The `allconv` rewrite turns a pooling layer into a strided convolution. Fixed padding carries
over as the convolution's own; a ceil_mode pool or timm's TF-"same" pool pads by an amount
that depends on the input size, which PoolPad computes on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.arithmetic import pool_output_size, same_padding

__all__ = ["PoolPad"]


class PoolPad(nn.Module):
    """Pads the input so that a padding-free convolution has the windows of a pooling layer.

    Per spatial dim of length n, for the pool's kernel k, stride s, padding p, dilation d:

    - ceil_mode: p on the left, and on the right p plus what the last (overhanging) window
      needs, so that the convolution gives the pool's ceil_mode output size
      `pool_output_size(n, k, s, p, d, ceil_mode=True)`;
    - padding "same": timm's SAME padding `same_padding(n, k, s, d)`.

    The padding is zeros, which average pooling with count_include_pad counts the same way.
    No parameters or buffers.
    """

    def __init__(
        self,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int] | str,
        dilation: Sequence[int],
        ceil_mode: bool,
    ) -> None:
        super().__init__()
        dims = len(kernel)
        if not 1 <= dims <= 3 or len(stride) != dims or len(dilation) != dims:
            raise ValueError(
                f"kernel, stride and dilation need one entry per spatial dim (1-3), got "
                f"{list(kernel)}, {list(stride)}, {list(dilation)}"
            )
        if isinstance(padding, str):
            if padding != "same":
                raise ValueError(f"padding must be ints or 'same', got {padding!r}")
        elif len(padding) != dims:
            raise ValueError(f"padding {list(padding)} has {len(padding)} entries for {dims} dims")
        self.kernel = tuple(int(k) for k in kernel)
        self.stride = tuple(int(s) for s in stride)
        self.padding: tuple[int, ...] | str = (
            padding if isinstance(padding, str) else tuple(int(p) for p in padding)
        )
        self.dilation = tuple(int(d) for d in dilation)
        self.ceil_mode = bool(ceil_mode)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `PoolPad(**m.config())` pads as `m` does."""
        return {
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "ceil_mode": self.ceil_mode,
        }

    def pads(self, sizes: tuple[int, ...]) -> list[tuple[int, int]]:
        """(left, right) per spatial dimension for an input of `sizes`."""
        out = []
        for i, n in enumerate(sizes):
            k, s, d = self.kernel[i], self.stride[i], self.dilation[i]
            if isinstance(self.padding, str):
                out.append(same_padding(n, k, s, d))
                continue
            p = self.padding[i]
            windows = pool_output_size(n, k, s, p, d, self.ceil_mode)
            right = max(p, (windows - 1) * s + d * (k - 1) + 1 - n - p)
            out.append((p, right))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.pads(tuple(x.shape[-len(self.kernel) :]))
        return F.pad(x, [v for pair in reversed(pads) for v in pair])

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}, "
            f"ceil_mode={self.ceil_mode}"
        )
