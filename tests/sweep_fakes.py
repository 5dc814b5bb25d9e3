"""Tiny model factories for the sweep's own tests (`tests.sweep_fakes:tiny` & co.)."""

from __future__ import annotations

import time

import torch
from torch import nn


def tiny() -> nn.Module:
    """A two-stage conv net: a strided conv, a max pool, a global pool."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def hang() -> nn.Module:
    """Never returns: the sweep must kill it at its time budget."""
    while True:
        time.sleep(1)


def broken() -> nn.Module:
    """Fails to build."""
    raise RuntimeError("this factory is broken on purpose")


class _Logistic(nn.Module):
    """60 steps of the logistic map at r = 3.99: a difference in the last float bit of its
    input grows to order one, as in deep random-init nets that amplify rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(x.double())
        for _ in range(60):
            x = 3.99 * x * (1 - x)
        return x.float()


def chaotic() -> nn.Module:
    """A strided conv followed by a chaotic map: every SPD transfer is exact, yet the output
    moves, and so does the original's under the same per-site rounding."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), _Logistic(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def huge() -> nn.Module:
    """Ten billion parameters: built on the meta device only, never for real."""
    return nn.Sequential(*(nn.Linear(50_000, 50_000, bias=False) for _ in range(4)))


def plain() -> nn.Module:
    """No downsampling site at all: every policy leaves it as it is."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
