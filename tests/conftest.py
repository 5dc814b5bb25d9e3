"""Shared fixtures: small models, a deterministic console for render tests, hermetic caches."""

from __future__ import annotations

import importlib.util
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from rich.console import Console

from tests.hubcache import HubCache, session_caches

# The model caches of this test session: temporary, never the developer's, and offline; set
# before anything imports huggingface_hub (torch hub reads TORCH_HOME on every call, so tests
# may point it elsewhere).
_CACHES = session_caches()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def hub_cache() -> Iterator[HubCache]:
    """The session's Hugging Face hub cache, for seeding; seeded repositories are removed after
    the test."""
    from huggingface_hub import constants

    root = _CACHES / "huggingface" / "hub"
    assert Path(constants.HF_HUB_CACHE) == root, (
        f"huggingface_hub was imported before conftest set HF_HOME: its cache is "
        f"{constants.HF_HUB_CACHE}, not {root}"
    )
    cache = HubCache(root)
    yield cache
    cache.remove_seeded()


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
