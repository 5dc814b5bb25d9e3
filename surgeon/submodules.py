"""A model's submodules by qualified path: set one, find one's path, count parameters.

The one implementation of each, so that every edit puts a module where another was the same way
(`nn.Sequential` and `nn.ModuleList` children by index, everything else by attribute).
"""

from __future__ import annotations

from torch import nn

__all__ = ["count_params", "path_of", "set_submodule"]


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` (not "": the model itself has no parent); returns what was there."""
    parent_path, _, attr = path.rpartition(".")
    if not attr:
        raise ValueError("cannot replace the model itself by path")
    parent = model.get_submodule(parent_path)
    old = parent.get_submodule(attr)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    return old


def path_of(model: nn.Module, module: nn.Module) -> str | None:
    """The qualified path of `module` inside `model` ("" for the model), or None if absent."""
    return next((name for name, m in model.named_modules() if m is module), None)


def count_params(module: nn.Module) -> int:
    """The number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
