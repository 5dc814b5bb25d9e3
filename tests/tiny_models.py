"""Tiny importable model factories (`tests.tiny_models:tiny_resnet`) for checkpoint fixtures.

Small enough that a checkpoint's weights are a few KB, yet with every kind of site the
checkpoint format records: a strided stem conv, a max pool module, a residual block with a
strided 1x1 shortcut, and a functional `F.max_pool2d` call inside a block's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["tiny_resnet", "tiny_root_pool"]


class _Block(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus a strided 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class _PoolHead(nn.Module):
    """A functional max pool in forward (a site owned by this module), then a 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.max_pool2d(x, 2, 2))


class TinyResNet(nn.Module):
    """Stem conv (stride 2) + max pool, one residual stage at stride 2, a pooled head."""

    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _Block(width, 2 * width, 2)
        self.head = _PoolHead(2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.head(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(width: int = 4, num_classes: int = 3) -> nn.Module:
    """A TinyResNet with `width` stem channels (a few hundred parameters at width 4)."""
    return TinyResNet(width, num_classes)


class _RootPool(nn.Module):
    """The model's own forward calls F.max_pool2d: replacing it makes the model a GraphModule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv(x)), 2, 2)
        return self.fc(x.mean((2, 3)))


def tiny_root_pool() -> nn.Module:
    """A model whose own forward makes a functional max pool call (a site owned by the root)."""
    return _RootPool()
