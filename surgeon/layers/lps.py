"""LPS: learnable polyphase sampling (Rojas-Gomez, Lim, Schwing, Do & Yeh, "Learnable
polyphase sampling for shift invariant and equivariant convolutional networks", NeurIPS 2022,
arXiv 2210.08001).

A small network scores each polyphase component; training samples a component with a
Gumbel-softmax, evaluation takes the best. APS is the special case whose score is the norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.layers.polyphase import PolyphaseSampling
from surgeon.layers.transfer import Transfer

__all__ = ["LearnablePolyphaseSampling"]


class LearnablePolyphaseSampling(PolyphaseSampling):
    """Per sample, the polyphase component a learned score prefers (LPS).

    Components, wrap and blur are `PolyphaseSampling`'s (output ceil(L / s) per dim). Each
    component c_r (C channels, T positions per dim) gets the score

        z_r = mean(conv3(relu(conv3(c_r)))) + b_r

    where the convs (C -> hidden -> hidden, 3 taps, circular padding) are shared by all
    components, as in the paper, and the mean runs over channels and positions; b is a
    learnable per-component bias. Training mixes the components with Gumbel-softmax weights
    w = softmax((z + g) / tau), g ~ Gumbel(0, 1): the soft relaxation the paper and its code
    train with; `straight_through=True` uses the one-hot of w forward and w's gradient
    backward instead. Evaluation keeps component argmax_r z_r (ties: the lowest index).

    Initialisation: the last conv is zero, so z = b = (margin, 0, .., 0): component 0 wins
    every evaluation, and the layer equals the strided op it follows (its stride-1 output at
    positions s*t) exactly. In training at init the other components get weights of about
    e^-margin each (times the Gumbel noise), so gradients reach the last conv and b from the
    first step. The bias b favours a fixed index, which is not shift-invariant: the invariance
    of the paper holds once b is equal across components (construct with margin=0 for the
    invariant form; training with weight decay shrinks b).

    Followers (`share_phase`) have no score network: they take the leader's index in
    evaluation and its weights in training. Traces and exports to ONNX in evaluation mode
    (ArgMax and Gather, dynamic batch and spatial sizes); scripts with role "alone".
    """

    def __init__(
        self,
        channels: int,
        *,
        dims: int = 2,
        stride: int | Sequence[int] = 2,
        hidden_channels: int | None = None,
        margin: float = 10.0,
        tau: float = 1.0,
        straight_through: bool = False,
        filter_size: int = 1,
        role: str = "alone",
    ) -> None:
        super().__init__(channels, dims=dims, stride=stride, filter_size=filter_size, role=role)
        hidden = max(1, channels // 8) if hidden_channels is None else hidden_channels
        if hidden < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.hidden_channels = hidden
        self.margin = float(margin)
        self.tau = float(tau)
        self.straight_through = bool(straight_through)
        self.reduce = list(range(1, dims + 2))
        if role != "follower":
            conv: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            last = conv(hidden, hidden, 3, padding=1, padding_mode="circular")
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.score = nn.Sequential(
                conv(channels, hidden, 3, padding=1, padding_mode="circular"), nn.ReLU(), last
            )
            bias = torch.zeros(self.phases)
            bias[0] = self.margin
            self.phase_bias = nn.Parameter(bias)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", tau={self.tau}"
        return text + (", straight_through=True" if self.straight_through else "")

    def _select(self, view: Tensor) -> tuple[Tensor, Tensor | None]:
        batched = self._batched(view)
        scores = self.score(batched).mean(self.reduce).reshape(view.shape[0], self.phases)
        scores = scores + self.phase_bias.to(scores.dtype)
        if self.training:
            weights = F.gumbel_softmax(scores, tau=self.tau, hard=self.straight_through, dim=1)
            return weights.argmax(1), weights
        return scores.argmax(1), None

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "hidden_channels": self.hidden_channels,
            "margin": self.margin,
            "tau": self.tau,
            "straight_through": self.straight_through,
        }

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        *,
        hidden_channels: int | None = None,
        margin: float = 10.0,
        tau: float = 1.0,
        straight_through: bool = False,
        filter_size: int = 1,
        role: str = "alone",
    ) -> tuple[LearnablePolyphaseSampling, Transfer]:
        """The LPS layer that follows `conv` once `conv` runs at stride 1, and its transfer.

        `conv` is an nn.Conv1d/2d/3d with stride > 1; LPS gets its out_channels, dims and
        stride. The caller sets the conv's stride to 1, keeping its padding, and places LPS
        after it (or after the pointwise norm and activation that follow it: component 0
        commutes with them). "exact" in evaluation: component 0 of the stride-1 output is the
        strided output. "approximate" with filter_size > 1 (the blur changes it) or when the
        conv overrides forward (timm's SAME padding splits its padding differently at stride 1
        and stride s, so component 0 is the strided output only at some sizes).
        """
        channels, dims, stride, plain = cls._conv_site(conv)
        layer = cls(
            channels,
            dims=dims,
            stride=stride,
            hidden_channels=hidden_channels,
            margin=margin,
            tau=tau,
            straight_through=straight_through,
            filter_size=filter_size,
            role=role,
        )
        return layer, ("exact" if plain and filter_size == 1 else "approximate")

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
        hidden_channels: int | None = None,
        margin: float = 10.0,
        tau: float = 1.0,
        straight_through: bool = False,
        filter_size: int = 1,
        role: str = "alone",
    ) -> tuple[LearnablePolyphaseSampling, Transfer]:
        """The LPS layer that follows a pool run at stride 1, and its transfer.

        Takes `SpaceToDepthConv.from_pool`'s arguments (`pool_arguments(module)` plus
        `channels`); the caller keeps the pool at stride 1 with everything else unchanged.
        "exact" for max and average pools (the stride-1 pool computes the same windows, and
        component 0 keeps the strided ones), "approximate" with filter_size > 1 or timm's SAME
        padding (padding="same"). ceil_mode pools raise ValueError (see `from_pool` of APS).
        """
        if pool_kind not in ("max", "avg"):
            raise ValueError(f"pool_kind must be 'max' or 'avg', got {pool_kind!r}")
        s = cls._pool_site(dims, kernel, stride, ceil_mode)
        layer = cls(
            channels,
            dims=dims,
            stride=s,
            hidden_channels=hidden_channels,
            margin=margin,
            tau=tau,
            straight_through=straight_through,
            filter_size=filter_size,
            role=role,
        )
        exact = filter_size == 1 and not isinstance(padding, str)
        return layer, ("exact" if exact else "approximate")
