"""Tiny models with room to move their strides, for the search tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PlainNet", "plain_net"]


class PlainNet(nn.Sequential):
    """Four 3×3 conv + BatchNorm + ReLU layers, the first and third at stride 2, then a pooled
    linear head: C(4, 2) = 6 legal placements of its two ×2 steps, milliseconds a CPU step."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate((width, width, 2 * width, 2 * width)):
            stride = 2 if i in (0, 2) else 1
            layers += [
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
            cin = cout
        super().__init__(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )


def plain_net(num_classes: int = 3, width: int = 4) -> nn.Module:
    """The factory the CLI tests name as `tests.search_fixtures:plain_net` (seeded weights)."""
    torch.manual_seed(0)
    return PlainNet(num_classes, width)
