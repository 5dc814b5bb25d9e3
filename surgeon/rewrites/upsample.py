"""`upsample`: a transposed convolution becomes resize + conv or conv + pixel shuffle, with the
same output shape (the convolution arithmetic of Dumoulin & Visin, arXiv 1603.07285).

- `mode: pixel-shuffle` (`SubPixelConv`): a stride-1 convolution makes s^d phases of every output
  channel and a pixel shuffle interleaves them (Shi et al. 2016). With `init: transfer` this is
  exact for every transposed convolution: output position o = s·q + ρ only sees the taps t with
  t·d ≡ ρ + p (mod s), each reading input q + (ρ + p − t·d)/s, so phase ρ is an ordinary
  convolution; one kernel holds all phases, the left padding is the largest backward reach, and
  the result is cropped to the transposed output size (i−1)s − 2p + d(k−1) + output_padding + 1.
  A stride-2 kernel-4 padding-1 transposed conv is exactly a 3×3 conv (padding 1) + shuffle.
- `mode: resize-conv` (`ResizeConv`, Odena et al. 2016, "Deconvolution and Checkerboard
  Artifacts"): nearest-neighbour upsampling by s, then a stride-1 convolution with the
  transposed kernel flipped and divided by s^d, padded to the same output size. Every output
  phase then shares one kernel, so there is no checkerboard pattern; the transfer keeps the
  mean response and is reported `approximate` (no resize-conv reproduces the phases exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from surgeon.layers.resize_conv import ResizeConv
from surgeon.layers.sub_pixel import SubPixelConv, shuffle
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site

__all__ = ["ResizeConv", "SubPixelConv", "UpsampleRewrite", "shuffle"]


class UpsampleRewrite:
    """Replace a transposed convolution with resize + conv or conv + pixel shuffle."""

    schema = ActionSchema(
        "upsample",
        {
            "mode": ParamSpec(
                "mode",
                str,
                "resize-conv",
                choices=("resize-conv", "pixel-shuffle"),
                help="resize-conv: nearest upsampling then a conv (no checkerboard); "
                "pixel-shuffle: a conv then a pixel shuffle (sub-pixel convolution)",
            ),
            "init": ParamSpec(
                "init",
                str,
                "transfer",
                choices=("transfer", "random"),
                help="transfer: from the transposed conv (exact for pixel-shuffle); "
                "random: PyTorch's default init",
            ),
        },
        "a transposed convolution becomes resize + conv or conv + pixel shuffle, same output shape",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op != "conv_transpose":
            what = site.op.replace("_", " ")
            raise SkipSite(f"upsample replaces transposed convolutions; this site is {what}")
        if site.functional:
            raise SkipSite("functional transposed convolution: its weights are not a module")
        module = editor.module(site.module)
        if not isinstance(module, nn.modules.conv._ConvNd) or not module.transposed:
            raise SkipSite(f"{type(module).__name__} is not a transposed convolution module")
        if module.padding_mode != "zeros":
            raise SkipSite(
                f"padding_mode {module.padding_mode!r} (transposed convs only pad with zeros)"
            )
        if isinstance(site.padding, str):
            raise SkipSite(f"padding {site.padding!r}")
        mode, init = str(params["mode"]), str(params["init"])
        layer_type = SubPixelConv if mode == "pixel-shuffle" else ResizeConv
        new = layer_type(
            module.in_channels,
            module.out_channels,
            site.kernel,
            site.stride,
            site.padding,
            site.dilation,
            site.output_padding,
            groups=module.groups,
            bias=module.bias is not None,
        )
        if init == "transfer":
            new.transfer(
                module.weight.detach(), None if module.bias is None else module.bias.detach()
            )
            transfer = "exact" if mode == "pixel-shuffle" else "approximate"
        else:
            transfer = "random"
        path = editor.replace_site(site, new, "up")
        stride = "×".join(map(str, sorted(set(site.stride))))
        kernel = "×".join(map(str, sorted(set(new.conv.kernel_size))))
        if mode == "pixel-shuffle":
            description = f"conv k{kernel} → {new.conv.out_channels} ch + pixel shuffle ×{stride}"
        else:
            description = f"nearest ×{stride} + conv k{kernel}"
        return Edit(site.name, "upsample", description, transfer, (path,), path)  # type: ignore[arg-type]
