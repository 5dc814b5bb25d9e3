"""Shared fixtures: small models, a deterministic console for render tests, hermetic caches."""

from __future__ import annotations

import copy
import importlib.util
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn

from tests.hubcache import HubCache, session_caches

# The model caches of this test session: temporary, never the developer's, and offline; set
# before anything imports huggingface_hub (torch hub reads TORCH_HOME on every call, so tests
# may point it elsewhere).
_CACHES = session_caches()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def _no_user_home(_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test runs (subprocesses included) writes to the user's home or caches: HOME
    and XDG_CACHE_HOME are a temporary directory, and the model caches (TORCH_HOME, HF_HOME)
    stay the session's, which huggingface_hub fixed at import."""
    monkeypatch.setenv("HOME", str(_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(_home / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(_CACHES / "torch"))
    monkeypatch.setenv("HF_HOME", str(_CACHES / "huggingface"))


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
    """A console that renders to text deterministically (as rich's own tests do), wide enough
    that the patch table's nine columns keep each cell on one line."""
    return Console(width=220, file=io.StringIO(), color_system=None, legacy_windows=False)


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


@pytest.fixture(scope="session")
def _built_models() -> dict[tuple[str, tuple[tuple[str, Any], ...]], nn.Module]:
    return {}


@pytest.fixture
def fresh_model(
    _built_models: dict[tuple[str, tuple[tuple[str, Any], ...]], nn.Module],
) -> Callable[..., nn.Module]:
    """`fresh_model("resnet50", **kwargs)`: a private copy (eval mode, random init from seed 0)
    of a model built once per test session, so tests that edit it in place rebuild nothing."""
    from surgeon.models import load_model

    def make(name: str, **kwargs: Any) -> nn.Module:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in _built_models:
            _built_models[key] = load_model(name, kwargs=kwargs, seed=0).model
        return copy.deepcopy(_built_models[key]).eval()

    return make
