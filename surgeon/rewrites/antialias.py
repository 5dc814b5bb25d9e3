"""`antialias`: anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks
Shift-Invariant Again"): evaluate densely, low-pass filter, then subsample.

- MaxPool(k, s) -> MaxPool(k, 1) + BlurPool(s).
- AvgPool(k, s) -> BlurPool(s) (the paper's §3.3): average pooling already is blurred
  downsampling, with a box filter; the binomial filter takes its place rather than blurring the
  box-filtered map again. A fixed pad or crop (`StridePad`) gives the blur the length the
  stride-1 pool would have, (i + 2p - k + 1), so the output size is the pool's at every input
  size (ceil_mode through BlurPool's `ceil_source`); the function changes ("approximate").
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
from surgeon.layers.stride_pad import StridePad
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Neighbour, Site

__all__ = ["AntialiasRewrite"]

_POOL_TYPES: dict[str, dict[int, type[nn.Module]]] = {
    "max_pool": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "avg_pool": {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d},
}


def _dense_length_pads(site: Site, filter_size: int) -> tuple[tuple[int, int], ...]:
    """Per dim, the (left, right) zero pad (negative: crop) that turns the pool's input length
    i into i + 2p - k + 1, the length its stride-1 version gives, so BlurPool's length rule
    (ceil(L / s), or the ceil_mode pool's through `ceil_source`) gives the pool's output size.
    The left side centres the blur on the pool's windows (to half a pixel where the filter and
    the window differ in parity), without padding where none is needed."""
    assert not isinstance(site.padding, str)
    pads = []
    for k, p in zip(site.kernel, site.padding, strict=True):
        left = p - max(0, (k - 1 - (filter_size - 1) % 2) // 2)
        pads.append((left, 2 * p - k + 1 - left))
    return tuple(pads)


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
        if site.op == "avg_pool":
            return self._average(editor, site, params)
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
        dense = _POOL_TYPES["max_pool"][site.dims](
            site.kernel, stride=1, padding=site.padding, dilation=site.dilation
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

    def _average(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        """AvgPool(k, s) -> BlurPool(s) on the map the stride-1 pool would give (Zhang 2019,
        §3.3): one filter, the binomial in place of the box."""
        if site.divisor_override is not None:
            raise SkipSite("average pooling with divisor_override (a scaled sum, not an average)")
        kernel = "×".join(map(str, sorted(set(site.kernel))))
        note = (
            f"the box filter of the average pool (k{kernel}) is replaced by the binomial one, "
            "not blurred again (Zhang 2019, §3.3): the function changes"
        )
        if site.padding == "same":
            # timm's AvgPool2dSame: TF 'SAME' gives ceil(i / s) positions, BlurPool's own length
            blur = self._blur(site, params, site.in_channels)
            new: nn.Module = blur
        else:
            blur = self._blur(site, params, site.in_channels, ceil=site.ceil_mode)
            pads = _dense_length_pads(site, blur.filter_size)
            new = nn.Sequential(StridePad(pads), blur) if any(map(any, pads)) else blur
        path = editor.replace_site(site, new, "aa")
        description = f"BlurPool(f{blur.filter_size}, s{site.stride[0]}) in place of the box filter"
        return Edit(site.name, "antialias", description, "approximate", (path,), path, note=note)

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
