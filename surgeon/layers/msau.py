"""SFM's adaptive upsampling (after MSAU, the multi-scale adaptive upsampling of Chen et al.,
"Spatial Frequency Modulation for Semantic Segmentation", TPAMI 2025, arXiv 2507.11893).

Where an encoder's adaptive resampling stretched detailed regions before downsampling, the
decoder's upsampling should undo the stretch (demodulate): sample the low-resolution map on a
grid that is sparse where it was dense. The authors published no code; the grid below is
decided here (docs/designs.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.layers.sfm import SaliencyOffsets
from surgeon.layers.transfer import Transfer

__all__ = ["AdaptiveUpsampling"]

_LINEAR = {2: "bilinear", 3: "trilinear"}


class AdaptiveUpsampling(nn.Module):
    """Bilinear upsampling whose source positions move away from salient positions.

    For an input (N, C, *S) (2 or 3 spatial dims) and an output size O per dim (the forward's
    `size` argument, else the constructor's `size`, else floor(S * scale_factor)), output
    position j reads

        src(j) = identity(j) - offset(src0(j))

    in input pixels, bilinearly (border padding), where identity(j) is F.interpolate's own
    source position for that mode: (j + 1/2) / scale - 1/2 (align_corners=False, with scale
    the given scale_factor, or O / S when a size is given) or j (S - 1) / (O - 1)
    (align_corners=True). The offsets come from `SaliencyOffsets` on the input (saliency
    sampler, several dilations: the multi-scale part), upsampled bilinearly to O; their sign
    is reversed, so the upsampling spreads out what an ARS stretch gathered (a first-order
    inverse of that warp).

    Exact at init: the offsets are zero and the layer is F.interpolate(x, mode='bilinear'
    or 'trilinear', same size or scale_factor and align_corners), to the float rounding of the
    normalised coordinates. Output sizes must be >= 2 per dim with align_corners=True. Traces
    and exports to ONNX (GridSample) with dynamic batch and spatial sizes; scripts.
    """

    def __init__(
        self,
        channels: int,
        *,
        dims: int = 2,
        size: Sequence[int] | None = None,
        scale_factor: float | Sequence[float] | None = None,
        align_corners: bool = False,
        radius: int = 1,
        dilations: Sequence[int] = (1, 2, 4),
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3 (grid_sample's), got {dims}")
        if size is not None and scale_factor is not None:
            raise ValueError("give size or scale_factor, not both (as F.interpolate takes)")
        self.channels = channels
        self.dims = dims
        # unset entries are -1 / 0.0 rather than empty lists: TorchScript types attributes
        # from their values, and an empty list has none
        self.size = [-1] * dims if size is None else [int(s) for s in size]
        if len(self.size) != dims:
            raise ValueError(f"size {self.size} has {len(self.size)} entries for {dims} dims")
        if scale_factor is None:
            scales = [0.0] * dims
        elif isinstance(scale_factor, (int, float)):
            scales = [float(scale_factor)] * dims
        else:
            scales = [float(s) for s in scale_factor]
        if len(scales) != dims:
            raise ValueError(f"scale_factor {scales} needs {dims} entries")
        self.scale_factor = scales
        self.align_corners = bool(align_corners)
        self.mode = _LINEAR[dims]
        self.offsets = SaliencyOffsets(channels, dims=dims, radius=radius, dilations=dilations)

    def forward(self, x: Tensor, size: list[int] | None = None) -> Tensor:
        sizes = list(x.shape[2:])
        target = size if size is not None else self.size
        scaled = target[0] < 0
        saliency = self.offsets(x)
        if scaled:
            if self.scale_factor[0] <= 0.0:
                raise ValueError("AdaptiveUpsampling without size or scale_factor needs size=")
            offsets = F.interpolate(
                saliency, scale_factor=self.scale_factor, mode=self.mode, align_corners=False
            )
        else:
            offsets = F.interpolate(saliency, size=target, mode=self.mode, align_corners=False)
        out = list(offsets.shape[2:])
        coords: list[Tensor] = []
        for i in range(self.dims - 1, -1, -1):  # grid_sample wants (x, y[, z]): last dim first
            shape = [1] * (self.dims + 1)
            shape[1 + i] = out[i]
            j = torch.arange(out[i], device=x.device, dtype=x.dtype).reshape(shape)
            if self.align_corners:
                base = j * (2.0 / (out[i] - 1)) - 1.0
                step = 2.0 / (sizes[i] - 1)
            elif scaled:
                base = (j * 2.0 + 1.0) / (self.scale_factor[i] * sizes[i]) - 1.0
                step = 2.0 / sizes[i]
            else:
                base = (j * 2.0 + 1.0) / out[i] - 1.0
                step = 2.0 / sizes[i]
            coords.append(base - offsets[:, i] * step)
        grid = torch.stack(coords, dim=-1)
        return F.grid_sample(x, grid, "bilinear", "border", align_corners=self.align_corners)

    def extra_repr(self) -> str:
        target = f"size={self.size}" if self.size[0] >= 0 else f"scale={self.scale_factor}"
        return (
            f"{self.channels}, dims={self.dims}, {target}, align_corners={self.align_corners}, "
            f"radius={self.offsets.radius}, dilations={self.offsets.dilations}"
        )

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable) that rebuild this layer."""
        return {
            "channels": self.channels,
            "dims": self.dims,
            "size": list(self.size) if self.size[0] >= 0 else None,
            "scale_factor": list(self.scale_factor) if self.scale_factor[0] > 0 else None,
            "align_corners": self.align_corners,
            "radius": self.offsets.radius,
            "dilations": list(self.offsets.dilations),
        }

    @classmethod
    def from_interpolate(
        cls,
        channels: int,
        *,
        dims: int,
        size: Sequence[int] | None = None,
        scale_factor: float | Sequence[float] | None = None,
        mode: str = "nearest",
        align_corners: bool | None = None,
        radius: int = 1,
        dilations: Sequence[int] = (1, 2, 4),
    ) -> tuple[AdaptiveUpsampling, Transfer]:
        """The layer for an F.interpolate / nn.Upsample site, and its transfer.

        Takes the call's size or scale_factor (for a size taken from another tensor at run
        time, give the scale_factor it amounts to, or pass that size to forward), mode and
        align_corners. "exact" for the linear mode of its dims ('bilinear', 'trilinear'):
        the layer starts as that interpolation. Other modes ('nearest', 'bicubic', 'area')
        are "approximate": the layer starts as bilinear interpolation.
        """
        layer = cls(
            channels,
            dims=dims,
            size=size,
            scale_factor=scale_factor,
            align_corners=bool(align_corners),
            radius=radius,
            dilations=dilations,
        )
        return layer, ("exact" if mode == _LINEAR.get(dims) else "approximate")
