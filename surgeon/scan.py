"""`scan`: analyse a model on an example input and list its sites."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from surgeon.sites import Site, find_sites
from surgeon.trace import Analysis, analyse

__all__ = ["RegionInfo", "ScanResult", "scan"]


@dataclass(frozen=True)
class RegionInfo:
    """How one part of the model was analysed (`fx`, `export` or `hooks`) and why."""

    path: str
    method: str
    note: str


@dataclass(frozen=True)
class ScanResult:
    """The sites of a model and how the walker found them."""

    sites: tuple[Site, ...]
    regions: tuple[RegionInfo, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    failures: tuple[tuple[str, str, str], ...]

    @property
    def downsampling(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.role == "downsample")

    def summary(self) -> str:
        """One line: counts by role and how the model was covered."""
        counts: dict[str, int] = {}
        for site in self.sites:
            counts[site.role] = counts.get(site.role, 0) + 1
        parts = [f"{counts.get('downsample', 0)} downsampling sites"]
        parts += [
            f"{n} {role.replace('_', ' ')}" for role, n in counts.items() if role != "downsample"
        ]
        methods = ", ".join(f"{r.method} ({r.path})" if r.path else r.method for r in self.regions)
        return f"{'; '.join(parts)}; found by {methods}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shapes": [list(s) for s in self.input_shapes],
            "regions": [vars(r) for r in self.regions],
            "failures": [list(f) for f in self.failures],
            "sites": [s.to_dict() for s in self.sites],
        }


def scan_analysis(analysis: Analysis, example_args: Sequence[Any]) -> ScanResult:
    """Build a ScanResult from an existing Analysis."""
    return ScanResult(
        sites=tuple(find_sites(analysis)),
        regions=tuple(RegionInfo(r.path, r.method, r.note) for r in analysis.regions),
        input_shapes=tuple(
            tuple(t.shape) for t in tree_leaves(list(example_args)) if isinstance(t, torch.Tensor)
        ),
        failures=tuple(analysis.failures),
    )


def scan(model: nn.Module, example_input: Any) -> ScanResult:
    """Find every downsampling site of `model` on `example_input` (a tensor or a tuple of args)."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    return scan_analysis(analyse(model, args), args)
