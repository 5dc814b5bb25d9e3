"""`lip`: local importance-based pooling (Gao, Wang & Wu, ICCV 2019, arXiv 1908.04156).

A pooling site becomes avgpool(x·w) / avgpool(w) over the same windows, with a positive
importance w = exp(logit) from a small convolutional network (`LocalImportancePool`). The
logit network's last layer (its affine normalisation) starts at zero, so w = 1 and the layer
is the average pool: an exact transfer from average pools, `ceil_mode`, padded and
`count_include_pad=False` pools included. A max pool starts as the average over its windows
(its padding excluded, as its −inf padding is), an approximate transfer; so does an average pool
with `divisor_override` (LIP divides by the windows' importance). Dilated and 'same' pools are
skipped with the reason.

The paper also puts LIP after strided convolutions run at stride 1; surgeon rewrites pooling
sites only, where the transfer can start from the pool (docs/designs.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from surgeon.layers.lip import LocalImportancePool
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site

__all__ = ["LipRewrite"]


class LipRewrite:
    """Replace a max or average pooling site with local importance pooling."""

    schema = ActionSchema(
        "lip",
        {
            "logit": ParamSpec(
                "logit",
                str,
                "dense",
                choices=("dense", "depthwise"),
                help="the logit network's 3×3 conv: dense (the paper's, C²·9 weights) or "
                "depthwise (C·9)",
            ),
        },
        "local importance pooling: windows weighted by a learned importance, starting as the "
        "average",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op not in ("max_pool", "avg_pool"):
            raise SkipSite(
                f"lip replaces max and average pooling; this site is {site.op.replace('_', ' ')}"
            )
        if not site.in_channels:
            raise SkipSite("the number of channels is unknown (no shape was recorded)")
        depthwise = params["logit"] == "depthwise"
        try:
            new, transfer = LocalImportancePool.from_pool(
                "max" if site.op == "max_pool" else "avg",
                site.in_channels,
                site.dims,
                site.kernel,
                site.stride,
                site.padding,
                site.dilation,
                site.ceil_mode,
                site.count_include_pad,
                site.divisor_override,
                logit_groups=site.in_channels if depthwise else 1,
            )
        except ValueError as exc:
            raise SkipSite(str(exc)) from exc
        path = editor.replace_site(site, new, "lip")
        kernel = "×".join(map(str, sorted(set(site.kernel))))
        stride = "×".join(map(str, sorted(set(site.stride))))
        description = f"LIP k{kernel} s{stride} ({'depthwise' if depthwise else 'dense'} logit)"
        if site.op == "max_pool":
            note = "max pooling has no linear equivalent: starts as the average of each window"
        elif transfer == "approximate":
            note = "divisor_override: LIP divides by the windows' importance, so it starts as "
            note += "the average without the override"
        else:
            note = "the logit starts at zero: importance 1, the average pool itself"
        return Edit(site.name, "lip", description, transfer, (path,), path, note=note)
