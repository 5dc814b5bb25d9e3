"""Tiny model factories for the sweep's own tests (`tests.sweep_fakes:tiny` & co.)."""

from __future__ import annotations

import time

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
