"""Shared fixtures: small models and a deterministic console for render tests."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

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


def load_script(name: str) -> ModuleType:
    """Import `scripts/NAME.py` as module NAME (scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
