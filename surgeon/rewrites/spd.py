"""`spd`: SPD-Conv (Sunkara & Luo 2022): space-to-depth followed by a non-strided convolution.

The paper form: a stride-s layer becomes space-to-depth with block s and a stride-1 convolution
on s^d·C channels (pools: back to C channels). With `init: transfer` the new convolution is the
original kernel rearranged into its s^d phases, so a strided convolution (and an average pool)
is reproduced exactly; max pooling has no linear equivalent and starts from the average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from surgeon.layers.spd import SpaceToDepthConv
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site

__all__ = ["SpdRewrite"]


def exact_kernel_size(site: Site) -> int:
    """Smallest inner kernel that reproduces the site exactly: ceil(((k-1)d+1)/s), max over dims."""
    return max(
        math.ceil(((k - 1) * d + 1) / s)
        for k, d, s in zip(site.kernel, site.dilation, site.stride, strict=True)
    )


class SpdRewrite:
    """Replace a strided convolution or pooling site with SpaceToDepthConv."""

    schema = ActionSchema(
        "spd",
        {
            "kernel_size": ParamSpec(
                "kernel_size",
                int,
                3,
                min=1,
                max=9,
                help="kernel of the convolution after space-to-depth (paper: 3); with "
                "init: transfer it grows to the smallest size that reproduces the original",
            ),
            "init": ParamSpec(
                "init",
                str,
                "transfer",
                choices=("transfer", "random"),
                help="transfer: reproduce the original layer; random: PyTorch's default init",
            ),
        },
        "SPD-Conv: space-to-depth (block = stride) then a non-strided convolution",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        init = str(params["init"])
        kernel = int(params["kernel_size"])
        if init == "transfer":
            kernel = max(kernel, exact_kernel_size(site))
        if site.op == "conv":
            new, transfer = self._from_conv(editor, site, kernel, init)
        elif site.op in ("max_pool", "avg_pool"):
            new, transfer = SpaceToDepthConv.from_pool(
                "max" if site.op == "max_pool" else "avg",
                site.in_channels,
                site.dims,
                site.kernel,
                site.stride,
                site.padding,
                site.dilation,
                ceil_mode=site.ceil_mode,
                count_include_pad=site.count_include_pad,
                divisor_override=site.divisor_override,
                kernel_size=kernel,
                init=init,
            )
        else:
            raise SkipSite(f"spd does not apply to {site.op.replace('_', ' ')} layers")
        path = editor.replace_site(site, new, "spd")
        conv = new.conv
        kernel_text = "×".join(map(str, sorted(set(conv.kernel_size))))
        description = (
            f"SPD b{site.max_stride} + conv k{kernel_text} {conv.in_channels}→{conv.out_channels}"
        )
        return Edit(site.name, "spd", description, transfer, (path,), path)  # type: ignore[arg-type]

    def _from_conv(
        self, editor: ModelEditor, site: Site, kernel: int, init: str
    ) -> tuple[SpaceToDepthConv, str]:
        if site.functional:
            raise SkipSite("functional convolution: its weights are not a module to transfer")
        if site.calls > 1:
            raise SkipSite(f"the conv module is called at {site.calls} places")
        conv = editor.module(site.module)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            raise SkipSite(f"{type(conv).__name__} is not a convolution module")
        plain = type(conv).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
        if not plain and type(conv).__name__ != "Conv2dSame":
            raise SkipSite(
                f"{type(conv).__name__} overrides forward (e.g. weight standardisation); "
                "SPD would drop that behaviour"
            )
        try:
            return SpaceToDepthConv.from_conv(conv, kernel_size=kernel, init=init)
        except ValueError as exc:
            raise SkipSite(str(exc)) from exc
