"""The registry of actions a policy can name: one module per rewrite, one entry each."""

from __future__ import annotations

import importlib

from surgeon.errors import PolicyError
from surgeon.rewrites.allconv import AllConvRewrite
from surgeon.rewrites.antialias import AntialiasRewrite
from surgeon.rewrites.aps import ApsRewrite
from surgeon.rewrites.base import (
    Edit,
    LayerChange,
    ModelEditor,
    ModelPlan,
    ModelRewrite,
    Rewrite,
    SkipSite,
    Target,
)
from surgeon.rewrites.dilate import DilateRewrite
from surgeon.rewrites.haar import HaarRewrite
from surgeon.rewrites.lip import LipRewrite
from surgeon.rewrites.lps import LpsRewrite
from surgeon.rewrites.relocate import RelocateRewrite
from surgeon.rewrites.sfm import SfmRewrite
from surgeon.rewrites.softpool import SoftPoolRewrite
from surgeon.rewrites.spd import SpdRewrite
from surgeon.rewrites.upsample import UpsampleRewrite
from surgeon.schema import ActionSchema

__all__ = [
    "Edit",
    "LayerChange",
    "ModelEditor",
    "ModelPlan",
    "ModelRewrite",
    "Rewrite",
    "SkipSite",
    "Target",
    "action_schemas",
    "get_rewrite",
    "load_plugin",
    "register_rewrite",
]

_REGISTRY: dict[str, Rewrite | ModelRewrite] = {
    "spd": SpdRewrite(),
    "antialias": AntialiasRewrite(),
    "allconv": AllConvRewrite(),
    "dilate": DilateRewrite(),
    "relocate": RelocateRewrite(),
    "upsample": UpsampleRewrite(),
    "aps": ApsRewrite(),
    "lps": LpsRewrite(),
    "haar": HaarRewrite(),
    "lip": LipRewrite(),
    "softpool": SoftPoolRewrite(),
    "sfm": SfmRewrite(),
}


def register_rewrite(
    rewrite: Rewrite | ModelRewrite, *, replace: bool = False
) -> Rewrite | ModelRewrite:
    """Make a rewrite (site-level, or model-level with `plan`) available to policies under
    `rewrite.schema.name`."""
    name = rewrite.schema.name
    if name in _REGISTRY and not replace and _REGISTRY[name] is not rewrite:
        raise ValueError(f"a rewrite named {name!r} is already registered")
    _REGISTRY[name] = rewrite
    return rewrite


def get_rewrite(name: str) -> Rewrite | ModelRewrite:
    return _REGISTRY[name]


def action_schemas() -> dict[str, ActionSchema]:
    """The parameter schema of every registered action, for policy validation."""
    return {name: rewrite.schema for name, rewrite in _REGISTRY.items()}


def load_plugin(module_name: str) -> None:
    """Import a user module that registers rewrites (`--plugin mypkg.mymodule`)."""
    try:
        importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code
        raise PolicyError(
            f"cannot import plugin {module_name!r}: {type(exc).__name__}: {exc}; "
            "check that it is installed and on PYTHONPATH"
        ) from exc
