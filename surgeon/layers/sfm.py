"""SFM's adaptive resampling (ARS): from "Spatial Frequency Modulation for Semantic
Segmentation" (Chen, Fu, Gu, Zheng & Dai, TPAMI 2025, arXiv 2507.11893).

Before a downsampling layer, ARS resamples the map on a learned non-uniform grid that is dense
where detail is: a dense grid stretches those regions over more positions, which lowers their
spatial frequency (the frequency scaling property), so less of them aliases when the layer
subsamples. The authors published no code; the grid below is decided here (docs/designs.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.layers.shapes import per_dim
from surgeon.layers.transfer import Transfer

__all__ = ["AdaptiveResampling", "SaliencyOffsets", "identity_grid"]

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def identity_grid(sizes: list[int], like: Tensor) -> list[Tensor]:
    """Per spatial dim, the normalised coordinate (2 i + 1) / L - 1 of each pixel centre i.

    That is `grid_sample`'s align_corners=False convention, under which this grid returns the
    input (to within the float rounding of the coordinates: exact for power-of-two sizes).
    Shapes broadcast against (N, *sizes); dtype and device follow `like`.
    """
    coords: list[Tensor] = []
    for i in range(len(sizes)):
        shape = [1] * (len(sizes) + 1)
        shape[1 + i] = sizes[i]
        centre = torch.arange(sizes[i], device=like.device, dtype=like.dtype) * 2.0 + 1.0
        coords.append((centre / sizes[i] - 1.0).reshape(shape))
    return coords


class SaliencyOffsets(nn.Module):
    """Per-position sampling offsets (pixels) towards salient neighbours, zero at init.

    A light predictor (depthwise 3-tap conv, ReLU, 1×1 conv to one saliency map per entry of
    `dilations`, the last conv zero-initialised) gives logits s; the importance is w = e^s,
    1 where s = 0 and outside the map. Per dilation d, with a Gaussian window g over taps
    t in [-radius, radius]^dims (sigma = radius / 2 + 1/2, sum 1), each position p moves to
    the importance-weighted centre of its window (the saliency sampler of Recasens et al.,
    "Learning to Zoom", ECCV 2018):

        offset_d(p) = sum_t g(t) w(p + d t) d t / sum_t g(t) w(p + d t)

    computed as conv(e^s - 1, g t) / (1 + conv(e^s - 1, g)), which is the same ratio but is
    exactly 0 at init (e^s - 1 = 0), and the offsets of all dilations are summed. Each is a
    convex combination of the taps, so |offset| <= radius * sum(dilations) per dim. Salient
    positions attract their neighbours' samples: the map is stretched around them.
    """

    if TYPE_CHECKING:  # a class-level annotation is a string TorchScript cannot resolve
        window: Tensor

    def __init__(self, channels: int, *, dims: int, radius: int, dilations: Sequence[int]) -> None:
        super().__init__()
        if radius < 1:
            raise ValueError(f"radius must be >= 1, got {radius}")
        if not dilations or min(dilations) < 1:
            raise ValueError(f"dilations must be positive, got {list(dilations)}")
        self.dims = dims
        self.radius = radius
        self.dilations = [int(d) for d in dilations]
        conv: Any = _CONVS[dims - 1]
        last = conv(channels, len(self.dilations), 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.predict = nn.Sequential(
            conv(channels, channels, 3, padding=1, groups=channels), nn.ReLU(), last
        )
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        sigma = radius / 2 + 0.5
        axes = torch.meshgrid(*([taps] * dims), indexing="ij")
        gauss = torch.exp(-torch.stack(axes).square().sum(0) / (2 * sigma**2))
        gauss = gauss / gauss.sum()
        window = torch.stack([gauss] + [gauss * a for a in axes])  # (1 + dims, *window)
        self.register_buffer("window", window[:, None].to(torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(N, dims, *S): the offset of every position, in pixels, dims in spatial order."""
        excess = torch.exp(self.predict(x)) - 1.0  # not expm1: ONNX has no such op
        weight = self.window if self.window.dtype == x.dtype else self.window.to(x.dtype)
        parts: list[Tensor] = []
        for k, dilation in enumerate(self.dilations):
            saliency = excess[:, k : k + 1]
            pad = self.radius * dilation
            if self.dims == 2:
                sums = F.conv2d(saliency, weight, None, 1, pad, dilation)
            else:
                sums = F.conv3d(saliency, weight, None, 1, pad, dilation)
            parts.append(sums[:, 1:] * float(dilation) / (1.0 + sums[:, :1]))
        return torch.stack(parts).sum(0)


class AdaptiveResampling(nn.Module):
    """Resample the map on a learned grid that is dense around salient positions (SFM's ARS).

    For an input (N, C, *S) (2 or 3 spatial dims) the output has the same shape:

        y = grid_sample(x, identity + offsets(x)), bilinear, border padding,
            align_corners=False

    with `SaliencyOffsets` (`radius`, `dilations`) giving the offsets in pixels. Place it
    before a downsampling layer, which stays as it is. At init the offsets are exactly zero
    and the grid is the identity of pixel centres (`identity_grid`), so y = x: "exact" up to
    the float rounding of the normalised coordinates (bitwise for power-of-two sizes; about
    size * 3e-8 pixels otherwise, measured in tests/test_layers_sfm.py). Traces and exports to
    ONNX (GridSample, opset 16+) with dynamic batch and spatial sizes; scripts.
    """

    def __init__(
        self,
        channels: int,
        *,
        dims: int = 2,
        radius: int = 2,
        dilations: Sequence[int] = (1,),
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3 (grid_sample's), got {dims}")
        self.channels = channels
        self.dims = dims
        self.offsets = SaliencyOffsets(channels, dims=dims, radius=radius, dilations=dilations)

    def forward(self, x: Tensor) -> Tensor:
        sizes = list(x.shape[2:])
        offsets = self.offsets(x)
        base = identity_grid(sizes, x)
        coords: list[Tensor] = []
        for i in range(self.dims - 1, -1, -1):  # grid_sample wants (x, y[, z]): last dim first
            coords.append(base[i] + offsets[:, i] * (2.0 / sizes[i]))
        grid = torch.stack(coords, dim=-1)
        return F.grid_sample(x, grid, "bilinear", "border", align_corners=False)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, dims={self.dims}, radius={self.offsets.radius}, "
            f"dilations={self.offsets.dilations}"
        )

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable) that rebuild this layer."""
        return {
            "channels": self.channels,
            "dims": self.dims,
            "radius": self.offsets.radius,
            "dilations": list(self.offsets.dilations),
        }

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_conv(
        cls, conv: nn.Module, *, radius: int = 2, dilations: Sequence[int] = (1,)
    ) -> tuple[AdaptiveResampling, Transfer]:
        """The ARS layer to put before a strided nn.Conv2d/3d (on its input), and "exact".

        The conv is kept as it is after it; at init ARS passes its input through.
        """
        dims = next((d for d, t in enumerate(_CONVS, start=1) if isinstance(conv, t)), 0)
        if dims not in (2, 3):
            raise ValueError(f"{type(conv).__name__} is not an nn.Conv2d/3d")
        assert isinstance(conv, (nn.Conv2d, nn.Conv3d))
        if max(conv.stride) == 1:
            raise ValueError(f"{type(conv).__name__} has stride 1: it does not downsample")
        layer = cls(conv.in_channels, dims=dims, radius=radius, dilations=dilations)
        return layer, "exact"

    @classmethod
    def from_pool(
        cls,
        pool_kind: str,
        channels: int,
        dims: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] | None,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        *,
        radius: int = 2,
        dilations: Sequence[int] = (1,),
    ) -> tuple[AdaptiveResampling, Transfer]:
        """The ARS layer to put before a strided pool, and "exact".

        Takes `SpaceToDepthConv.from_pool`'s arguments (`pool_arguments(module)` plus
        `channels`); the pool is kept as it is after ARS, so only its stride is checked.
        """
        if pool_kind not in ("max", "avg"):
            raise ValueError(f"pool_kind must be 'max' or 'avg', got {pool_kind!r}")
        s = kernel if stride is None or (isinstance(stride, Sequence) and not stride) else stride
        if max(per_dim(s, dims, "stride")) == 1:
            raise ValueError("the pool has stride 1: it does not downsample")
        return cls(channels, dims=dims, radius=radius, dilations=dilations), "exact"
