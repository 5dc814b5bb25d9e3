"""What every rewrite shares: the Edit record, SkipSite, and the in-place model editor.

A rewrite turns (site, params) into an edit of the user's model. Module sites are replaced on
their parent with setattr, so the model keeps its class, methods and all other state-dict keys.
Functional sites (`F.max_pool2d` in a forward) need a graph edit: the module that makes the call
is re-traced with torch.fx, the call becomes a call to the new module, and that one module is
swapped for its GraphModule; only when the call is in the model's own forward does the whole
model become a GraphModule (the report says so).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import fx, nn

from surgeon.schema import ActionSchema
from surgeon.sites import Site
from surgeon.trace import Analysis, SurgeonTracer, default_leaves

__all__ = ["Edit", "ModelEditor", "Rewrite", "SkipSite", "Transfer"]

Transfer = Literal["exact", "approximate", "random", "kept"]


class SkipSite(Exception):
    """Raised by a rewrite that cannot apply at a site; the message is the reason reported."""


@dataclass(frozen=True)
class Edit:
    """What one rewrite did at one site."""

    site: str
    action: str
    replacement: str  # short description, e.g. "SpaceToDepthConv(b2, k3, 512→128)"
    transfer: Transfer
    modules: tuple[str, ...]  # qualified paths of the new or changed modules
    output_module: str | None = None  # module whose output is the site's output, if one is
    note: str = ""


class Rewrite(Protocol):
    """An action a policy can name: a schema for its parameters and the edit itself."""

    schema: ActionSchema

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit: ...


@dataclass
class _Pending:
    site: Site
    module: nn.Module
    attr: str


@dataclass
class ModelEditor:
    """Edits a model in place; functional-site edits are queued and applied per owner module."""

    model: nn.Module
    analysis: Analysis
    pending: dict[str, list[_Pending]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # what a model-level rewrite (dilate, relocate) keeps between its sites during one patch
    state: dict[str, Any] = field(default_factory=dict)

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path) if path else self.model

    def set_module(self, path: str, new: nn.Module) -> None:
        """Replace the submodule at `path` on its parent."""
        parent_path, _, attr = path.rpartition(".")
        parent = self.module(parent_path)
        if not attr:
            raise SkipSite("cannot replace the model itself")
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
            parent[int(attr)] = new
        else:
            setattr(parent, attr, new)

    def replace_site(self, site: Site, new: nn.Module, suffix: str) -> str:
        """Put `new` where the site's operation was; returns the new module's qualified path."""
        if not site.functional:
            self.set_module(site.module, new)
            return site.module
        owner, _, node = site.name.partition(":")
        attr = f"{node}_{suffix}".replace(".", "_")
        self.pending.setdefault(owner, []).append(_Pending(site, new, attr))
        return f"{owner}.{attr}" if owner else attr

    def finish(self) -> nn.Module:
        """Apply queued functional edits; returns the (possibly new) root module."""
        for owner, items in self.pending.items():
            self._rewrite_owner(owner, items)
        self.pending.clear()
        return self.model

    def _direct_calls(
        self, graph: fx.Graph, target: Any, owner: str, region_path: str
    ) -> list[fx.Node]:
        """Call nodes of `target` made directly by the owner's own forward, in order."""
        calls = []
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not target:
                continue
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            full = f"{region_path}.{path}" if region_path and path else (region_path or path)
            if full == owner:
                calls.append(node)
        return calls

    def _rewrite_owner(self, owner: str, items: list[_Pending]) -> None:
        module = self.module(owner)
        tracer = SurgeonTracer(*default_leaves())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                graph = tracer.trace(module)
            except Exception as exc:  # fx failures surface as many types
                reason = (
                    f"{owner or 'the model'} does not trace with torch.fx ({type(exc).__name__})"
                )
                raise SkipSite(reason) from exc
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        for item in items:
            region = self.analysis.region_of(owner) if owner else self.analysis.regions[0]
            if region is None or region.graph is None:
                raise SkipSite(f"no graph covers {owner!r}")
            node_name = item.site.name.partition(":")[2]
            original = next(n for n in region.graph.nodes if n.name == node_name)
            index = self._direct_calls(region.graph, original.target, owner, region.path).index(
                original
            )
            target = self._direct_calls(gm.graph, original.target, "", "")[index]
            gm.add_submodule(item.attr, item.module)
            with gm.graph.inserting_before(target):
                first = target.args[0] if target.args else target.kwargs["input"]
                new_node = gm.graph.call_module(item.attr, (first,))
            target.replace_all_uses_with(new_node)
            gm.graph.erase_node(target)
        gm.graph.lint()
        gm.recompile()
        if owner:
            self.set_module(owner, gm)
            self.notes.append(
                f"{owner} is now a torch.fx.GraphModule (it calls "
                f"{', '.join(sorted({i.site.type_name for i in items}))} in its forward)"
            )
        else:
            self.notes.append(
                f"the model is now a torch.fx.GraphModule: {type(module).__name__}'s own forward "
                "calls the replaced functions, so its class and methods are not kept"
            )
            self.model = gm


def describe_shape(t: torch.Tensor) -> str:
    return "×".join(map(str, t.shape))
