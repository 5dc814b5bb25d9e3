"""APS: adaptive polyphase sampling (Chaman & Dokmanić, "Truly shift-invariant convolutional
neural networks", CVPR 2021, arXiv 2011.14214).

The strided layer runs at stride 1; APS then keeps, per sample, the polyphase component with
the largest norm. With circular padding everywhere, a circular shift of the input only permutes
the components, so the network's output is exactly invariant to circular shifts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from surgeon.layers.polyphase import PolyphaseSampling
from surgeon.layers.transfer import Transfer

__all__ = ["NORMS", "AdaptivePolyphaseSampling"]

NORMS = ("l2", "l1", "linf")


class AdaptivePolyphaseSampling(PolyphaseSampling):
    """Per sample, the polyphase component of largest norm (APS), after an optional blur.

    For a map x of length L per spatial dim and stride s (per dim), with T = ceil(L / s):

        y[n] = component r*(n) of wrap(blur(x))[n],  r*(n) = argmax_r ||component r of x[n]||

    where the norm ("l2", "l1" or "linf") runs over channels and positions, `wrap` pads each
    dim circularly on the right to T*s (the paper's padding of odd sizes) and `blur` is the
    optional circular binomial filter (`filter_size` > 1: the paper's APS + LPF). Components and
    their numbering are `PolyphaseSampling`'s; ties go to the lowest index. The output has
    ceil(L / s) positions per dim, the strided op's own length for ceil_mode=False ops.

    Not exact against the strided op (that always keeps component 0): the weights of the
    stride-1 layer before it are kept, the selection is new ("approximate"). Exactly
    shift-invariant at layer level: for L divisible by s, a circular shift of the input by any
    amount circularly shifts the output (pinned in tests/test_layers_aps.py).

    `role` "leader" / "follower" share one selection between layers (`share_phase`), as a
    residual shortcut must take its main path's component. Parameter-free: the blur filter is
    a non-persistent buffer. Traces and exports to ONNX (ReduceSum/Max, ArgMax, Gather) with
    dynamic batch and spatial sizes; scripts with role "alone".
    """

    def __init__(
        self,
        channels: int,
        *,
        dims: int = 2,
        stride: int | Sequence[int] = 2,
        norm: str = "l2",
        filter_size: int = 1,
        role: str = "alone",
    ) -> None:
        super().__init__(channels, dims=dims, stride=stride, filter_size=filter_size, role=role)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.positions = [1 + 2 * i for i in range(dims)]  # the T dims, once channels are gone

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm!r}"

    def _select(self, view: Tensor) -> tuple[Tensor, Tensor | None]:
        # the channels first (one pass over the map, leaving 1/C of it), then each component's
        # positions: l2 compares sums of squares, which order the components as their norms do;
        # half precision would overflow the squares and sums (autocast keeps the map in it)
        if view.dtype == torch.float16 or view.dtype == torch.bfloat16:
            view = view.float()
        if self.norm == "l2":
            per_position = (view * view).sum(1)
        elif self.norm == "l1":
            per_position = view.abs().sum(1)
        else:
            per_position = view.abs().amax(1)
        if self.norm == "linf":
            scores = per_position.amax(self.positions)
        else:
            scores = per_position.sum(self.positions)
        return scores.flatten(1).argmax(1), None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "norm": self.norm}

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_conv(
        cls, conv: nn.Module, *, norm: str = "l2", filter_size: int = 1, role: str = "alone"
    ) -> tuple[AdaptivePolyphaseSampling, Transfer]:
        """The APS layer that follows `conv` once `conv` runs at stride 1, and "approximate".

        `conv` is an nn.Conv1d/2d/3d with stride > 1 (any kernel, padding, dilation, groups;
        timm's SAME convs too): APS gets its out_channels, dims and stride. The caller sets the
        conv's stride to 1 (keeping its padding) and places APS after it, or after the norm
        and activation that follow it as the paper does. The conv keeps its weights; the
        selection replaces the fixed component 0, hence "approximate".
        """
        channels, dims, stride, _ = cls._conv_site(conv)
        layer = cls(
            channels, dims=dims, stride=stride, norm=norm, filter_size=filter_size, role=role
        )
        return layer, "approximate"

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
        norm: str = "l2",
        filter_size: int = 1,
        role: str = "alone",
    ) -> tuple[AdaptivePolyphaseSampling, Transfer]:
        """The APS layer that follows a pool run at stride 1, and "approximate".

        Takes `SpaceToDepthConv.from_pool`'s arguments (`pool_arguments(module)` plus
        `channels`); only the stride matters (None: the kernel), the rest stays with the
        stride-1 pool the caller keeps (max pool at stride 1 then APS, as in the paper).
        ceil_mode pools raise ValueError: their last window can make the output one longer
        than ceil(L / s).
        """
        if pool_kind not in ("max", "avg"):
            raise ValueError(f"pool_kind must be 'max' or 'avg', got {pool_kind!r}")
        s = cls._pool_site(dims, kernel, stride, ceil_mode)
        layer = cls(channels, dims=dims, stride=s, norm=norm, filter_size=filter_size, role=role)
        return layer, "approximate"
