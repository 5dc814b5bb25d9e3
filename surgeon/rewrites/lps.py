"""`lps`: learnable polyphase sampling (Rojas-Gomez, Lim, Schwing, Do & Yeh, "Learnable
polyphase sampling for shift invariant and equivariant convolutional networks", NeurIPS 2022,
arXiv 2210.08001).

Each strided conv or pool runs at stride 1; a `LearnablePolyphaseSampling` after it scores the
polyphase components with a small network (Gumbel-softmax in training, argmax in evaluation).
It starts by selecting component 0 by `margin`, which is what the strided layer kept, so the
patched model equals the original in evaluation at step 0 (transfer `exact`, the report's
measured difference is the check; `approximate` with a blur or timm's dynamic 'same' padding).
Residual shortcuts take their main path's selection (see `surgeon.rewrites.polyphase`).
"""

from __future__ import annotations

from surgeon.layers.lps import LearnablePolyphaseSampling
from surgeon.rewrites.polyphase import PolyphaseRewrite
from surgeon.schema import ActionSchema, ParamSpec

__all__ = ["LpsRewrite"]


class LpsRewrite(PolyphaseRewrite):
    """Every site at stride 1, then the polyphase component a learned score prefers."""

    schema = ActionSchema(
        "lps",
        {
            "hidden_channels": ParamSpec(
                "hidden_channels",
                int,
                None,
                min=1,
                help="width of the scoring network (default: channels / 8)",
            ),
            "margin": ParamSpec(
                "margin",
                float,
                10.0,
                min=0.0,
                help="initial score lead of component 0 (what the strided layer kept); 0 "
                "starts shift-invariant instead of exact",
            ),
            "tau": ParamSpec(
                "tau", float, 1.0, min=1e-3, help="Gumbel-softmax temperature in training"
            ),
            "straight_through": ParamSpec(
                "straight_through",
                bool,
                False,
                help="one component forward, soft gradients backward, in training",
            ),
            "filter_size": ParamSpec(
                "filter_size",
                int,
                1,
                min=1,
                max=7,
                help="binomial blur before the selection (1 = none)",
            ),
        },
        "learnable polyphase sampling: stride 1, then a learned choice of component; exact at init",
    )
    layer = LearnablePolyphaseSampling
    short = "LPS"
