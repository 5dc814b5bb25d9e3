"""`haar`: Haar-wavelet downsampling (HWD: Xu et al., "Haar wavelet downsampling", Pattern
Recognition 2023): a level-1 Haar transform (LL, LH, HL, HH on 4C channels at half the
resolution, nothing lost), then a stride-1 convolution.

The transform is an orthogonal mix of each 2×2 block, so a stride-2 layer has an exact Haar form
(`HaarConv.from_conv`): the inner kernel is the original one rearranged by phase and mixed into
bands. The transfer is exact

- for every stride-2 convolution when the inner kernel has the exact size (the default,
  `kernel_size` unset: ceil(((k-1)d + 1) / 2) taps, 1 for a kernel-2 conv: the paper's form);
- with a set `kernel_size`, wherever it is at least that size (a kernel-2 stride-2 conv, as in
  ConvNeXt's downsamplers and patchify layers a rule asks for, with the paper's 1×1);
- for average pools where PyTorch divides every window by the same count;

and approximate otherwise (a smaller inner kernel keeps the middle taps; a max pool starts as
the average). The report says which at each site, and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from surgeon.layers.haar import HaarConv
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site

__all__ = ["HaarRewrite"]


def _exact_taps(site: Site) -> tuple[int, ...]:
    """The inner kernel that reproduces a stride-2 layer: ceil(((k-1)d + 1) / 2) per dim."""
    return tuple(
        math.ceil(((k - 1) * d + 1) / 2) for k, d in zip(site.kernel, site.dilation, strict=True)
    )


def _sizes(values: tuple[int, ...]) -> str:
    return "×".join(map(str, sorted(set(values))))


class HaarRewrite:
    """Replace a stride-2 convolution or pooling site with the Haar transform + a conv."""

    schema = ActionSchema(
        "haar",
        {
            "kernel_size": ParamSpec(
                "kernel_size",
                int,
                None,
                min=1,
                max=7,
                help="kernel of the convolution after the Haar transform; unset: the smallest "
                "size that reproduces the layer (1 for a kernel-2 conv, the paper's form); "
                "a smaller one keeps the middle taps (approximate)",
            ),
            "init": ParamSpec(
                "init",
                str,
                "transfer",
                choices=("transfer", "random"),
                help="transfer: from the original layer; random: PyTorch's default init",
            ),
        },
        "Haar wavelet downsampling: a level-1 Haar transform, then a stride-1 convolution",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op not in ("conv", "max_pool", "avg_pool"):
            raise SkipSite(f"haar does not apply to {site.op.replace('_', ' ')} layers")
        if site.stride != (2,) * site.dims:
            raise SkipSite(
                f"haar replaces stride-2 layers (a level-1 Haar transform halves every "
                f"dimension); this one has stride {_sizes(site.stride)}"
            )
        kernel_size = params.get("kernel_size")
        init = str(params["init"])
        try:
            if site.op == "conv":
                new, transfer = HaarConv.from_conv(
                    self._conv(editor, site), kernel_size=kernel_size, init=init
                )
            else:
                if not site.in_channels:
                    raise SkipSite("the number of channels is unknown (no shape was recorded)")
                if site.ceil_mode or site.padding == "same":
                    what = "ceil_mode" if site.ceil_mode else "'same' padding"
                    raise SkipSite(
                        f"pooling with {what}: its last window has no 2×2 block to transform "
                        "(lip and softpool keep such windows)"
                    )
                new, transfer = HaarConv.from_pool(
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
                    kernel_size=kernel_size,
                    init=init,
                )
        except ValueError as exc:
            raise SkipSite(str(exc)) from exc
        path = editor.replace_site(site, new, "haar")
        conv = new.conv
        description = (
            f"Haar + conv k{_sizes(tuple(conv.kernel_size))} "
            f"{conv.in_channels}→{conv.out_channels}"
            + (f" g{conv.groups}" if conv.groups > 1 else "")
        )
        note = self._why(site, tuple(conv.kernel_size), transfer)
        return Edit(site.name, "haar", description, transfer, (path,), path, note=note)

    def _conv(self, editor: ModelEditor, site: Site) -> nn.Module:
        if site.functional:
            raise SkipSite("functional convolution: its weights are not a module to transfer")
        if site.calls > 1:
            raise SkipSite(f"the conv module is called at {site.calls} places")
        return editor.module(site.module)

    def _why(self, site: Site, inner: tuple[int, ...], transfer: str) -> str:
        """The reason behind a site's transfer, for the report."""
        exact = _exact_taps(site)
        if transfer == "random":
            return ""
        if any(n < e for n, e in zip(inner, exact, strict=True)):
            return (
                f"inner kernel {_sizes(inner)} is smaller than {_sizes(exact)}, the size that "
                f"reproduces k{_sizes(site.kernel)} s2: it keeps the middle taps"
            )
        if site.op == "max_pool":
            return "max pooling has no linear equivalent: starts as the average of each window"
        if transfer == "approximate":
            return "PyTorch divides border windows by fewer elements: starts as the full average"
        if site.op == "conv":
            return f"the k{_sizes(site.kernel)} s2 kernel mixed into Haar bands: same function"
        return "the average of each window, mixed into Haar bands: same function"
