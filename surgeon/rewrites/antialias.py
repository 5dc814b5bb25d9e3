"""`antialias`: anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks
Shift-Invariant Again"): evaluate densely, low-pass filter, then subsample.

- MaxPool(k, s) -> MaxPool(k, 1) + BlurPool(s); AvgPool(k, s) -> AvgPool(k, 1) + BlurPool(s).
- A strided conv runs at stride 1 and BlurPool(s) goes after the activation that follows it
  (through its norm layer), as in the paper's ResNet; with no activation after it (a 1×1
  shortcut) BlurPool comes first and the conv runs at stride 1 on the blurred map.
The conv keeps its weights and no parameters are added.

Placement prefers edits that keep state-dict keys: the activation module (or the `act` of a
norm-act layer) becomes `Sequential(act, BlurPool)`; if the activation is shared (torchvision's
Bottleneck calls one ReLU three times) the consumer becomes `Sequential(BlurPool, consumer)`,
so only the targeted call changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from surgeon.layers.blur import BlurPool
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Neighbour, Site

__all__ = ["AntialiasRewrite"]

_POOL_TYPES: dict[str, dict[int, type[nn.Module]]] = {
    "max_pool": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "avg_pool": {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d},
}


class AntialiasRewrite:
    """Replace a strided site with its stride-1 form plus a BlurPool."""

    schema = ActionSchema(
        "antialias",
        {
            "filter_size": ParamSpec(
                "filter_size", int, 4, min=1, max=7, help="binomial filter size (1 = no blur)"
            ),
            "pad_mode": ParamSpec(
                "pad_mode",
                str,
                "reflect",
                choices=("reflect", "replicate", "zero"),
                help="how the blur pads borders",
            ),
        },
        "anti-aliasing: stride 1, then a binomial BlurPool with the original stride",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op in _POOL_TYPES:
            return self._pool(editor, site, params)
        if site.op == "conv":
            return self._conv(editor, site, params)
        raise SkipSite(f"antialias does not apply to {site.op.replace('_', ' ')} layers")

    def _blur(
        self, site: Site, params: Mapping[str, Any], channels: int, ceil: bool = False
    ) -> BlurPool:
        source: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
        if ceil:
            if isinstance(site.padding, str):
                raise SkipSite("ceil_mode with 'same' padding")
            source = (site.kernel, site.padding, site.dilation)
        return BlurPool(
            channels,
            dims=site.dims,
            filter_size=int(params["filter_size"]),
            stride=site.stride,
            pad_mode=str(params["pad_mode"]),
            ceil_source=source,
        )

    def _pool(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        blur = self._blur(site, params, site.in_channels, ceil=site.ceil_mode)
        if site.padding == "same":
            if site.functional:
                raise SkipSite("functional pooling with 'same' padding")
            # timm's MaxPool2dSame & co. pad in their forward: the module itself runs at stride
            # 1 (keeping its other settings), and the blur follows it
            same = type(editor.module(site.module)).__name__
            editor.set_attrs(site.module, stride=(1,) * site.dims)
            editor.wrap(site.module, after=[blur])
            description = (
                f"{same}(k{site.kernel[0]}, s1) + BlurPool(f{blur.filter_size}, s{site.stride[0]})"
            )
            return Edit(site.name, "antialias", description, "kept", (site.module,), site.module)
        dense: nn.Module
        if site.op == "max_pool":
            dense = _POOL_TYPES["max_pool"][site.dims](
                site.kernel, stride=1, padding=site.padding, dilation=site.dilation
            )
        else:
            if site.divisor_override is not None:
                raise SkipSite("average pooling with divisor_override")
            dense = _POOL_TYPES["avg_pool"][site.dims](
                site.kernel,
                stride=1,
                padding=site.padding,
                count_include_pad=site.count_include_pad,
            )
        if site.max_kernel == 1:
            new: nn.Module = blur
            description = f"BlurPool(f{blur.filter_size}, s{site.stride[0]})"
        else:
            new = nn.Sequential(dense, blur)
            description = (
                f"{type(dense).__name__}(k{site.kernel[0]}, s1) + "
                f"BlurPool(f{blur.filter_size}, s{site.stride[0]})"
            )
        path = editor.replace_site(site, new, "aa")
        return Edit(site.name, "antialias", description, "kept", (path,), path)

    def _conv(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.functional:
            raise SkipSite("functional convolution: its stride is not a module attribute")
        if site.calls > 1:
            raise SkipSite(f"the conv module is called at {site.calls} places")
        conv = editor.module(site.module)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            raise SkipSite(f"{type(conv).__name__} is not a convolution module")
        blur = self._blur(site, params, site.out_channels)
        chain = list(site.after)
        act_at = next((i for i, n in enumerate(chain) if n.kind == "act"), None)
        stride = site.stride[0]
        f = blur.filter_size
        if act_at is not None:
            placed = self._after_activation(editor, chain, act_at, blur)
            if placed is not None:
                editor.set_attrs(site.module, stride=(1,) * site.dims)
                path, how = placed
                return Edit(
                    site.name,
                    "antialias",
                    f"conv s1 → {how} → BlurPool(f{f}, s{stride})",
                    "kept",
                    (site.module, path),
                    None,
                )
        padding = site.padding
        same_size = padding == "same" or (
            not isinstance(padding, str)
            and all(
                2 * p == d * (k - 1)
                for p, d, k in zip(padding, site.dilation, site.kernel, strict=True)
            )
        )
        editor.set_attrs(site.module, stride=(1,) * site.dims)
        if act_at is None and same_size:
            # the paper's shortcut: blur, then the conv at stride 1 on the blurred map
            blur = self._blur(site, params, site.in_channels)
            editor.wrap(site.module, before=[blur])
            return Edit(
                site.name,
                "antialias",
                f"BlurPool(f{f}, s{stride}) → conv s1",
                "kept",
                (site.module,),
                site.module,
            )
        editor.wrap(site.module, after=[blur])
        why = (
            "no activation follows"
            if act_at is None
            else "the activation and its consumer are shared"
        )
        return Edit(
            site.name,
            "antialias",
            f"conv s1 → BlurPool(f{f}, s{stride})",
            "kept",
            (site.module,),
            site.module,
            note=f"blur placed right after the conv ({why})",
        )

    def _after_activation(
        self, editor: ModelEditor, chain: list[Neighbour], act_at: int, blur: BlurPool
    ) -> tuple[str, str] | None:
        act = chain[act_at]
        if act.is_module and not act.shared:
            module = editor.module(act.target)
            inner = getattr(module, "act", None)
            if not act.has_params:
                editor.wrap(act.target, after=[blur])
                return f"{act.target}.1", act.type_name
            if isinstance(inner, nn.Module) and not any(True for _ in inner.parameters()):
                editor.wrap(f"{act.target}.act", after=[blur])
                return f"{act.target}.act.1", act.type_name
        consumer = chain[act_at + 1] if act_at + 1 < len(chain) else None
        if consumer is not None and consumer.is_module and not consumer.shared:
            editor.wrap(consumer.target, before=[blur])
            return f"{consumer.target}.0", f"{act.type_name} (blur before {consumer.type_name})"
        return None
