"""`allconv`: "Striving for Simplicity: The All Convolutional Net" (Springenberg et al. 2014,
arXiv 1412.6806): every pooling layer becomes a learnable strided convolution.

The convolution has the pool's kernel, stride, padding and dilation, and the same output size
for every input size (ceil_mode and timm's 'SAME' pools pad the input at run time, see
`PoolPad`). It is depthwise by default (`channels: depthwise`, C·k^d weights); the paper's form
mixes channels (`channels: dense`, C²·k^d weights).

With `init: transfer` every window starts as an average: weight 1/k^d (1/divisor_override when
set) on the diagonal. That reproduces average pooling exactly wherever PyTorch divides by the
full window: always with divisor_override; with count_include_pad (the default) unless a
ceil_mode window hangs over the padded input; without count_include_pad only when there is no
padding and no such window. Which case holds is decided at the site's input size, so the
report's `exact` is measured, and a note says when other sizes differ. Max pooling has no linear
equivalent: it starts from the average and is reported `approximate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from surgeon.arithmetic import pool_output_size
from surgeon.layers.pool_pad import PoolPad
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site

__all__ = ["AllConvRewrite", "PoolPad", "pooling_conv"]

_CONVS: dict[int, Callable[..., nn.modules.conv._ConvNd]] = {
    1: nn.Conv1d,
    2: nn.Conv2d,
    3: nn.Conv3d,
}


def _window_overhangs(site: Site) -> bool:
    """True when a ceil_mode window reaches past the padded input at the site's input size."""
    if not site.ceil_mode or isinstance(site.padding, str):
        return False
    for i, n in enumerate(site.in_shape[-site.dims :]):
        k, s, p = site.kernel[i], site.stride[i], site.padding[i]
        windows = pool_output_size(n, k, s, p, site.dilation[i], True)
        if (windows - 1) * s + k > n + 2 * p:
            return True
    return False


def exactness(site: Site) -> tuple[str, str]:
    """(transfer, note) for the averaging initialisation of `site`."""
    if site.op == "max_pool":
        return "approximate", "max pooling has no linear equivalent: starts as the average"
    if site.divisor_override is not None:
        return "exact", ""
    overhang = _window_overhangs(site)
    padded = site.padding == "same" or any(site.padding)
    if not site.count_include_pad and padded:
        return "approximate", "count_include_pad=False: border windows divide by fewer elements"
    if overhang:
        return "approximate", "ceil_mode: the last window overhangs and PyTorch divides by less"
    if site.ceil_mode:
        return "exact", "exact at this input size; where a ceil_mode window overhangs, it differs"
    return "exact", ""


def pooling_conv(site: Site, *, dense: bool = False, init: str = "transfer") -> nn.Module:
    """A convolution with `site`'s pooling windows: `ConvNd` (groups C, or 1 when `dense`), behind
    a `PoolPad` when the windows need padding computed from the input size."""
    if site.dims not in _CONVS:
        raise SkipSite(f"{site.dims}-d pooling")
    channels = site.in_channels
    dynamic = site.padding == "same" or site.ceil_mode
    conv = _CONVS[site.dims](
        channels,
        channels,
        site.kernel,
        stride=site.stride,
        padding=0 if dynamic else site.padding,
        dilation=site.dilation,
        groups=1 if dense else channels,
        bias=False,
    )
    if init == "transfer":
        window = site.divisor_override or math.prod(site.kernel)
        with torch.no_grad():
            conv.weight.zero_()
            if dense:
                index = torch.arange(channels)
                conv.weight[index, index] = 1.0 / window
            else:
                conv.weight.fill_(1.0 / window)
    if not dynamic:
        return conv
    pad = PoolPad(site.kernel, site.stride, site.padding, site.dilation, site.ceil_mode)
    return nn.Sequential(pad, conv)


class AllConvRewrite:
    """Replace a pooling site with a strided convolution that has the same windows."""

    schema = ActionSchema(
        "allconv",
        {
            "channels": ParamSpec(
                "channels",
                str,
                "depthwise",
                choices=("depthwise", "dense"),
                help="depthwise: one filter per channel; dense: channels mix (the paper's form)",
            ),
            "init": ParamSpec(
                "init",
                str,
                "transfer",
                choices=("transfer", "random"),
                help="transfer: start as the average of each window; random: PyTorch's init",
            ),
        },
        "All Convolutional Net: a pooling layer becomes a learnable strided convolution",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op not in ("max_pool", "avg_pool"):
            what = (
                "is already a convolution"
                if site.op == "conv"
                else f"is {site.op.replace('_', ' ')}"
            )
            raise SkipSite(f"allconv replaces max and average pooling; this site {what}")
        if not site.in_channels:
            raise SkipSite("the number of channels is unknown (no shape was recorded)")
        dense = params["channels"] == "dense"
        init = str(params["init"])
        new = pooling_conv(site, dense=dense, init=init)
        transfer, note = exactness(site) if init == "transfer" else ("random", "")
        path = editor.replace_site(site, new, "conv")
        kernel = "×".join(map(str, sorted(set(site.kernel))))
        stride = "×".join(map(str, sorted(set(site.stride))))
        kind = "conv" if dense else "depthwise conv"
        description = (
            f"{kind} k{kernel} s{stride} ({'average' if init == 'transfer' else 'random'} init)"
        )
        return Edit(site.name, "allconv", description, transfer, (path,), path, note=note)  # type: ignore[arg-type]
