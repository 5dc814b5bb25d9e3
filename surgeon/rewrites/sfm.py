"""`sfm`: adaptive resampling from "Spatial Frequency Modulation for Semantic Segmentation"
(Chen et al., TPAMI 2025, arXiv 2507.11893).

- At a downsampling site (a strided convolution or pooling layer, 2-d or 3-d), adaptive
  resampling (`AdaptiveResampling`, the paper's ARS) goes in front of it: the map is resampled
  on a learned grid that is dense around detail, lowering its frequency before the layer
  subsamples. The layer itself stays (`Sequential(ARS, layer)` at its path; a functional pool
  becomes that Sequential with the equivalent pooling module).
- At an upsampling site (role `upsample`: an `F.interpolate` call or `nn.Upsample`), the
  matching non-uniform upsampling (`AdaptiveUpsampling`, after the paper's MSAU) replaces the
  interpolation; an interpolation to a size read from another tensor at run time (torchvision's
  segmentation heads upsample to the input's size) keeps reading it.

Both predictors start at the identity grid, so the transfer is exact at step 0 (to the float
rounding of the grid's coordinates) for downsampling sites and for (bi/tri)linear
interpolation; nearest, bicubic or area interpolation starts as bilinear (approximate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import fx, nn

from surgeon.calls import bind_arguments
from surgeon.layers.msau import AdaptiveUpsampling
from surgeon.layers.sfm import AdaptiveResampling
from surgeon.rewrites.base import Edit, ModelEditor, SkipSite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site

__all__ = ["SfmRewrite"]

_POOLS: dict[str, dict[int, Callable[..., nn.Module]]] = {
    "max_pool": {2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "avg_pool": {2: nn.AvgPool2d, 3: nn.AvgPool3d},
}
_ROUNDING = "exact to the float rounding of the identity grid's coordinates"


def _pool_module(site: Site) -> nn.Module:
    """The pooling module that computes what a functional pooling site's call computes."""
    if site.op == "max_pool":
        return _POOLS["max_pool"][site.dims](
            site.kernel, site.stride, site.padding, site.dilation, ceil_mode=site.ceil_mode
        )
    return _POOLS["avg_pool"][site.dims](
        site.kernel,
        site.stride,
        site.padding,
        ceil_mode=site.ceil_mode,
        count_include_pad=site.count_include_pad,
        divisor_override=site.divisor_override,
    )


def _interpolation(editor: ModelEditor, site: Site) -> dict[str, Any]:
    """The interpolation's own arguments: size, scale_factor, align_corners,
    recompute_scale_factor (a module's attributes, or the call's arguments in the graph)."""
    if not site.functional:
        module = editor.module(site.module)
        if not isinstance(module, nn.Upsample):
            raise SkipSite(f"{type(module).__name__} is not an nn.Upsample")
        return {
            "size": module.size,
            "scale_factor": module.scale_factor,
            "align_corners": module.align_corners,
            "recompute_scale_factor": module.recompute_scale_factor,
        }
    owner, _, node_name = site.name.partition(":")
    analysis = editor.analysis
    region = None
    if analysis is not None:
        region = analysis.region_of(owner) if owner else analysis.regions[0]
    graph = region.graph if region is not None else None
    node = next((n for n in graph.nodes if n.name == node_name), None) if graph else None
    if node is None:
        raise SkipSite("the interpolation call is not in a traced graph")
    return bind_arguments("interpolate", node.args, dict(node.kwargs))


def _computed(size: Any) -> bool:
    """True for an interpolation size computed in the forward (an fx node, or a tuple holding
    one: `x.shape[-2:]`, `(h * 2, w * 2)`), False for a constant."""
    if isinstance(size, (list, tuple)):
        return any(isinstance(item, fx.Node) for item in size)
    return isinstance(size, fx.Node)


class SfmRewrite:
    """Adaptive resampling before a downsampling site; adaptive upsampling at an upsampling
    site."""

    schema = ActionSchema(
        "sfm",
        {
            "radius": ParamSpec(
                "radius",
                int,
                2,
                min=1,
                max=4,
                help="downsampling sites: how far (pixels) a sample may move towards salient "
                "neighbours",
            ),
            "upsample_radius": ParamSpec(
                "upsample_radius",
                int,
                1,
                min=1,
                max=4,
                help="upsampling sites: the same, per dilation (1, 2, 4: the multi-scale part)",
            ),
        },
        "SFM: adaptive resampling before downsampling (ARS); adaptive upsampling at "
        "upsampling sites (MSAU); both start at the identity",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.role == "upsample":
            return self._upsample(editor, site, int(params["upsample_radius"]))
        if site.op not in ("conv", "max_pool", "avg_pool"):
            raise SkipSite(f"sfm does not apply to {site.op.replace('_', ' ')} layers")
        if site.dims not in (2, 3):
            raise SkipSite(f"{site.dims}-d maps: grid_sample resamples 2-d and 3-d maps only")
        if site.max_stride < 2:
            raise SkipSite("the layer does not subsample")
        if not site.in_channels:
            raise SkipSite("the number of channels is unknown (no shape was recorded)")
        radius = int(params["radius"])
        resample = AdaptiveResampling(site.in_channels, dims=site.dims, radius=radius)
        description = f"ARS (radius {radius}) → {site.type_name}"
        if not site.functional:
            editor.wrap(site.module, before=[resample])
            path = site.module
        elif site.op == "conv":
            raise SkipSite("functional convolution: its weights are not a module to keep")
        else:
            path = editor.replace_site(site, nn.Sequential(resample, _pool_module(site)), "sfm")
        note = f"the original layer after an identity resampling at init: {_ROUNDING}"
        return Edit(site.name, "sfm", description, "exact", (path,), path, note=note)

    def _upsample(self, editor: ModelEditor, site: Site, radius: int) -> Edit:
        if site.op != "interpolate":
            raise SkipSite(
                f"sfm's adaptive upsampling replaces interpolation; this site is "
                f"{site.op.replace('_', ' ')}"
            )
        if site.dims not in (2, 3):
            raise SkipSite(f"{site.dims}-d maps: grid_sample resamples 2-d and 3-d maps only")
        if all(n == 1 for n in site.in_shape[-site.dims :]):
            raise SkipSite("a 1×1 map: the interpolation is a broadcast, nothing to resample")
        call = _interpolation(editor, site)
        size, scale = call.get("size"), call.get("scale_factor")
        keywords: tuple[str, ...] = ()
        if _computed(size):
            keywords, size = ("size",), None  # computed at run time: passed on as the call does
        elif isinstance(size, int):
            size = [size] * site.dims
        new, transfer = AdaptiveUpsampling.from_interpolate(
            site.in_channels,
            dims=site.dims,
            size=size,
            scale_factor=scale,
            mode=site.mode,
            align_corners=call.get("align_corners"),
            radius=radius,
        )
        note = f"the {site.mode} interpolation itself at init: {_ROUNDING}"
        if transfer == "approximate":
            note = f"{site.mode} interpolation: starts as bilinear"
        elif scale is not None and size is None and call.get("recompute_scale_factor"):
            scales = scale if isinstance(scale, (list, tuple)) else [scale]
            if any(float(f) != int(f) for f in scales):
                transfer = "approximate"
                note = "recompute_scale_factor with a fractional scale: PyTorch then samples "
                note += "at out/in, this layer at the given scale"
        path = editor.replace_site(site, new, "sfm", keywords)
        description = f"MSAU {'bi' if site.dims == 2 else 'tri'}linear (radius {radius}, d1,2,4)"
        return Edit(site.name, "sfm", description, transfer, (path,), path, note=note)
