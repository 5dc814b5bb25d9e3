"""`softpool`: SoftPool (Stergiou, Poppe & Kalliatakis, ICCV 2021, arXiv 2101.00440).

A max or average pooling site becomes the softmax-weighted mean of each window
(`SoftPool`, with the same windows and output size, ceil_mode and padding included): no
parameters, between the average and the maximum, so it approximates either pool
("approximate"); a pool whose windows hold one element each is reproduced exactly. 'same'
pools are skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from surgeon.layers.softpool import SoftPool
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema
from surgeon.sites import Site

__all__ = ["SoftPoolRewrite"]


class SoftPoolRewrite:
    """Replace a max or average pooling site with SoftPool over the same windows."""

    schema = ActionSchema(
        "softpool",
        {},
        "SoftPool: every window's softmax-weighted mean, between average and max pooling",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op not in ("max_pool", "avg_pool"):
            what = site.op.replace("_", " ")
            raise SkipSite(f"softpool replaces max and average pooling; this site is {what}")
        try:
            new, transfer = SoftPool.from_pool(
                "max" if site.op == "max_pool" else "avg",
                site.dims,
                site.kernel,
                site.stride,
                site.padding,
                site.dilation,
                site.ceil_mode,
                site.count_include_pad,
                site.divisor_override,
            )
        except ValueError as exc:
            raise SkipSite(str(exc)) from exc
        single = site.max_kernel == 1 and site.divisor_override in (None, 1)
        path = editor.replace_site(site, new, "softpool")
        kernel = "×".join(map(str, sorted(set(site.kernel))))
        stride = "×".join(map(str, sorted(set(site.stride))))
        if single:
            return Edit(
                site.name,
                "softpool",
                f"SoftPool k{kernel} s{stride}",
                "exact",
                (path,),
                path,
                note="one element per window: SoftPool is that element, as the pool is",
            )
        pool = "maximum" if site.op == "max_pool" else "average"
        note = "each window's softmax-weighted mean, between its average and its maximum: "
        note += f"it approximates the {pool}"
        return Edit(
            site.name,
            "softpool",
            f"SoftPool k{kernel} s{stride}",
            transfer,
            (path,),
            path,
            note=note,
        )
