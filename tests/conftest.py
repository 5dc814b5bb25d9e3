"""Shared fixtures: small models and a deterministic console for render tests."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def console() -> Console:
    """A console that renders to text deterministically (as rich's own tests do)."""
    return Console(width=160, file=io.StringIO(), color_system=None, legacy_windows=False)


def rendered(console: Console) -> str:
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()
