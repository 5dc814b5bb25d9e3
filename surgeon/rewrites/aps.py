"""`aps`: adaptive polyphase sampling (Chaman & Dokmanić, "Truly shift-invariant convolutional
neural networks", CVPR 2021, arXiv 2011.14214).

Each strided conv or pool runs at stride 1; an `AdaptivePolyphaseSampling` after it keeps, per
sample, the polyphase component of largest norm (l2 by default, l1 or linf), after an optional
circular blur (`filter_size` > 1: the paper's APS + LPF). Any stride, 1 to 3 dims, any input
size (sizes the stride does not divide are wrapped circularly, as in the paper). Residual
shortcuts take their main path's component (see `surgeon.rewrites.polyphase`); with the
policy's `padding: circular` the whole network is exactly invariant to circular shifts of an
input whose size its total stride divides. The layers keep their weights; the selection is new,
so the transfer is `approximate`.
"""

from __future__ import annotations

from surgeon.layers.aps import NORMS, AdaptivePolyphaseSampling
from surgeon.rewrites.polyphase import PolyphaseRewrite
from surgeon.schema import ActionSchema, ParamSpec

__all__ = ["ApsRewrite"]


class ApsRewrite(PolyphaseRewrite):
    """Every site at stride 1, then the polyphase component of largest norm, per sample."""

    schema = ActionSchema(
        "aps",
        {
            "norm": ParamSpec(
                "norm", str, "l2", choices=NORMS, help="the norm that picks the component"
            ),
            "filter_size": ParamSpec(
                "filter_size",
                int,
                1,
                min=1,
                max=7,
                help="binomial blur before the selection (1 = none; APS + LPF above 1)",
            ),
        },
        "adaptive polyphase sampling: stride 1, then per sample the component of largest norm",
    )
    layer = AdaptivePolyphaseSampling
    short = "APS"
