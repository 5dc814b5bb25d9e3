"""StridePad: asymmetric padding in front of a layer whose own padding is symmetric.

Moving a stride (`dilate`, `relocate`) can call for padding (low, high) that differs per side,
which no convolution or pooling layer takes; the layer then runs unpadded behind a StridePad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StridePad"]

_MODES = ("constant", "reflect", "replicate", "circular")


class StridePad(nn.Module):
    """Pads a map (low, high per spatial dimension) before a layer whose padding is asymmetric.

    Output size per dim: n + low + high. `mode` is `F.pad`'s: max pooling pads with
    `value=-inf` (as its own padding does), convolutions per their padding_mode, average
    pooling with zeros. JSON has no infinity, so `value` may also be the string "-inf" or
    "inf" (what `config()` writes for them). No parameters, so nothing is added to the state
    dict.
    """

    def __init__(
        self,
        pad: Sequence[Sequence[int]],
        mode: str = "constant",
        value: float | Literal["-inf", "inf"] = 0.0,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not 1 <= len(pad) <= 3 or any(len(low_high) != 2 for low_high in pad):
            pairs = [list(low_high) for low_high in pad]
            raise ValueError(f"pad needs one (low, high) pair per spatial dim (1-3), got {pairs}")
        if isinstance(value, str) and value not in ("-inf", "inf"):
            raise ValueError(f"value must be a number, '-inf' or 'inf', got {value!r}")
        self.pad = tuple((int(low), int(high)) for low, high in pad)
        self.mode = mode
        self.value = float(value)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON data: `StridePad(**m.config())` pads as `m` does
        (an infinite `value` written as the string "-inf" or "inf")."""
        value: float | str = self.value
        if math.isinf(self.value):
            value = "-inf" if self.value < 0 else "inf"
        return {"pad": [list(low_high) for low_high in self.pad], "mode": self.mode, "value": value}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = tuple(v for low_high in reversed(self.pad) for v in low_high)
        if self.mode == "constant":
            return F.pad(x, flat, value=self.value)
        return F.pad(x, flat, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode}" + (
            f", value={self.value}" if self.mode == "constant" else ""
        )
