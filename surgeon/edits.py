"""Edit operations on a model, and the editor through which every rewrite changes a model.

Five operations describe every change surgeon makes to a user's model:

- `Replace(path, module)`: `module` stands where the submodule at `path` was;
- `Wrap(path, before, after)`: the submodule at `path` becomes
  `Sequential(*before, original, *after)` (a blur after an activation, a pad before a conv);
- `SetAttrs(path, attrs)`: new `stride`, `dilation` or `padding` of an existing conv or pool,
  or a new `padding_mode` of a conv;
- `ReplaceCall(owner, function, index, attr, module, keywords)`: the `index`-th direct call of
  a known function (`max_pool2d`, named as in `surgeon.calls`) in the forward of the module at
  `owner` becomes a call of `module` on the call's input (and on the call's own arguments named
  in `keywords`, passed by name: an interpolation's `size` taken from another tensor at run
  time), registered on the owner as `attr`; the owner becomes an `fx.GraphModule` (the model
  itself when `owner` is "");
- `Link(leader, followers)`: the layers at those paths share run-time state (a residual
  shortcut's polyphase sampler takes its main path's component), made by the `link`
  classmethod of the leader's registered layer class; nothing in any state dict changes.

`perform` applies one operation and returns how to undo it. `ModelEditor` is the single mutation
point of a patch: each change a rewrite asks for is performed, logged as an operation (the
checkpoint's edit plan, replayed in order by `load`) and given an undo entry, so that `rollback`
restores the exact original modules, attribute values and parameter tensors after any failure.
Paths are recorded as they are when the operation is applied.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from surgeon.calls import FUNCTION_OPS, bind_arguments, function_name
from surgeon.layers.registry import build_module, module_spec, registered_layers
from surgeon.sites import Site
from surgeon.submodules import set_submodule
from surgeon.trace import Analysis, SurgeonTracer, call_owner, default_leaves

__all__ = [
    "GEOMETRY_ATTRS",
    "PADDING_MODES",
    "EditError",
    "EditOp",
    "Link",
    "ModelEditor",
    "Replace",
    "ReplaceCall",
    "SetAttrs",
    "Undo",
    "Wrap",
    "direct_calls",
    "op_from_dict",
    "op_to_dict",
    "perform",
]

GEOMETRY_ATTRS = ("stride", "dilation", "padding")
"""The attributes `SetAttrs` may change on a conv or pool module: its geometry (and, on a
convolution, `padding_mode`, one of `PADDING_MODES`)."""

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
"""The padding modes `SetAttrs` may give a convolution (a policy's `padding: circular` gives
every padded conv "circular")."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Undo = Callable[[], None]


class EditError(Exception):
    """An operation does not apply to the model as it is (a missing path or call, an owner that
    does not trace), or its data does not describe one; the message says which and why, and
    `field` names the operation's field at fault ("path", "module", "before[1]", ...)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Replace:
    """`module` stands where the submodule at `path` was."""

    path: str
    module: nn.Module = field(compare=False)


@dataclass(frozen=True)
class Wrap:
    """The submodule at `path` becomes `Sequential(*before, original, *after)`."""

    path: str
    before: tuple[nn.Module, ...] = field(default=(), compare=False)
    after: tuple[nn.Module, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class SetAttrs:
    """New geometry (`GEOMETRY_ATTRS`) of the conv or pool at `path`: JSON values (a list of
    ints per dimension, or a padding string such as "same"); or a conv's `padding_mode`."""

    path: str
    attrs: Mapping[str, Any] = field(hash=False)


@dataclass(frozen=True)
class ReplaceCall:
    """The `index`-th direct call of `function` in the forward of `owner` calls `module` (set on
    the owner as `attr`) instead, on the call's input and, by name, on those of the call's
    arguments that `keywords` names and the call gives."""

    owner: str
    function: str
    index: int
    attr: str
    module: nn.Module = field(compare=False)
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Link:
    """The layers at `leader` and `followers` are linked by `type(leader).link(leader,
    followers)`, a classmethod of a class in the layer registry that links them and returns
    how to undo it (`PolyphaseSampling.link`: the followers take the leader's selection)."""

    leader: str
    followers: tuple[str, ...]


EditOp = Replace | Wrap | SetAttrs | ReplaceCall | Link


def op_to_dict(op: EditOp) -> dict[str, Any]:
    """The operation as JSON data; new modules as layer specs of the layer registry (their
    weights are not included: they come from the checkpoint's state dict). TypeError when a
    module is of a type the registry does not know."""
    if isinstance(op, Replace):
        return {"op": "replace", "path": op.path, "module": module_spec(op.module)}
    if isinstance(op, Wrap):
        return {
            "op": "wrap",
            "path": op.path,
            "before": [module_spec(m) for m in op.before],
            "after": [module_spec(m) for m in op.after],
        }
    if isinstance(op, SetAttrs):
        return {"op": "set_attrs", "path": op.path, "attrs": dict(op.attrs)}
    if isinstance(op, Link):
        return {"op": "link", "leader": op.leader, "followers": list(op.followers)}
    data = {
        "op": "replace_call",
        "owner": op.owner,
        "function": op.function,
        "index": op.index,
        "attr": op.attr,
        "module": module_spec(op.module),
    }
    if op.keywords:  # written only when used, so earlier manifests read the same
        data["keywords"] = list(op.keywords)
    return data


def _build(spec: Mapping[str, Any], field: str) -> nn.Module:
    try:
        return build_module(spec)
    except ValueError as exc:
        raise EditError(str(exc), field) from exc


def op_from_dict(data: Mapping[str, Any]) -> EditOp:
    """The operation JSON data describes, its new modules freshly built from the layer
    registry; EditError (one line, naming the layer type and argument) for a spec the
    registry refuses. The data's shape is checked by the manifest schema first."""
    kind = data["op"]
    if kind == "replace":
        return Replace(data["path"], _build(data["module"], "module"))
    if kind == "wrap":
        before = tuple(_build(s, f"before[{i}]") for i, s in enumerate(data["before"]))
        after = tuple(_build(s, f"after[{i}]") for i, s in enumerate(data["after"]))
        return Wrap(data["path"], before, after)
    if kind == "set_attrs":
        return SetAttrs(data["path"], dict(data["attrs"]))
    if kind == "replace_call":
        module = _build(data["module"], "module")
        keywords = tuple(data.get("keywords", ()))
        return ReplaceCall(
            data["owner"], data["function"], data["index"], data["attr"], module, keywords
        )
    if kind == "link":
        return Link(data["leader"], tuple(data["followers"]))
    raise EditError(f"unknown edit operation {kind!r}", "op")


def _module_at(model: nn.Module, path: str, field: str = "path") -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise EditError(f"the model has no module {path!r}", field) from exc


def _put(model: nn.Module, path: str, new: nn.Module) -> Undo:
    if not path:
        raise EditError("the model itself cannot be replaced by path", "path")
    _module_at(model, path)
    old = set_submodule(model, path, new)

    def undo() -> None:
        set_submodule(model, path, old)

    return undo


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return int(value)


def _module_value(value: Any) -> Any:
    return tuple(int(v) for v in value) if isinstance(value, list) else value


def _set_attrs(model: nn.Module, op: SetAttrs) -> Undo:
    module = _module_at(model, op.path)
    allowed = (*GEOMETRY_ATTRS, "padding_mode") if isinstance(module, _CONVS) else GEOMETRY_ATTRS
    unknown = [key for key in op.attrs if key not in allowed or not hasattr(module, key)]
    if unknown:
        raise EditError(
            f"{type(module).__name__} at {op.path!r} has no {unknown[0]!r} to set", "attrs"
        )
    mode = op.attrs.get("padding_mode", "zeros")
    if mode not in PADDING_MODES:
        raise EditError(f"padding_mode {mode!r} is not one of {', '.join(PADDING_MODES)}", "attrs")
    state = vars(module)
    # a conv keeps its padding twice: as given, and reversed for F.pad (non-zero padding modes)
    saved = {
        key: state[key] for key in (*op.attrs, "_reversed_padding_repeated_twice") if key in state
    }
    for key, value in op.attrs.items():
        setattr(module, key, _module_value(value))
    if "padding" in op.attrs and "_reversed_padding_repeated_twice" in state:
        module._reversed_padding_repeated_twice = _reversed_padding(module)  # type: ignore[assignment]

    def undo() -> None:
        for key, value in saved.items():
            setattr(module, key, value)

    return undo


def _reversed_padding(conv: nn.Module) -> list[int]:
    """F.pad's (last dim first, low then high) padding for a conv's `padding` attribute."""
    padding = conv.padding
    kernel: tuple[int, ...] = conv.kernel_size  # type: ignore[assignment]
    if isinstance(padding, str):
        pairs = [(0, 0)] * len(kernel)
        if padding == "same":
            dilation: tuple[int, ...] = conv.dilation  # type: ignore[assignment]
            spans = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            pairs = [(s // 2, s - s // 2) for s in spans]
    else:
        pairs = [(int(p), int(p)) for p in padding]  # type: ignore[union-attr]
    return [v for low_high in reversed(pairs) for v in low_high]


def direct_calls(graph: fx.Graph, function: str, owner: str = "") -> list[fx.Node]:
    """The calls of the known function `function` made directly by the forward of the module
    at `owner` (relative to the traced root), in graph order."""
    return [
        node
        for node in graph.nodes
        if node.op == "call_function"
        and function_name(node.target) == function
        and call_owner(node) == owner
    ]


class _OwnerTracer(SurgeonTracer):
    """Traces an owner whose call is replaced, keeping the wrappers edits made (an
    nn.Sequential holding one of surgeon's layers: a pad before a layer, a blur after an
    activation, a resampling before a strided conv) as modules, so that they keep running as
    one module at their path, and the report's hooks see them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Sequential and any(
            type(child).__module__.startswith("surgeon.layers") for child in m.children()
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _owner_graph(module: nn.Module, owner: str) -> fx.GraphModule:
    """A new GraphModule computing `module`'s forward (a copy of its graph if it already is
    one, so the original object stays intact for undo)."""
    if isinstance(module, fx.GraphModule):
        return fx.GraphModule(module, copy.deepcopy(module.graph), type(module).__name__)
    tracer = _OwnerTracer(*default_leaves())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph = tracer.trace(module)
        except Exception as exc:  # fx failures surface as many types
            raise EditError(
                f"{owner or 'the model'} does not trace with torch.fx ({type(exc).__name__})",
                "owner",
            ) from exc
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _replace_call(model: nn.Module, op: ReplaceCall) -> tuple[nn.Module, Undo]:
    owner = _module_at(model, op.owner, "owner")
    gm = _owner_graph(owner, op.owner)
    calls = direct_calls(gm.graph, op.function)
    if not 0 <= op.index < len(calls):
        raise EditError(
            f"{op.owner or 'the model'} makes {len(calls)} direct {op.function} call(s) in its "
            f"forward, so there is no call number {op.index}",
            "index",
        )
    if hasattr(gm, op.attr):
        raise EditError(f"{op.owner or 'the model'} already has an attribute {op.attr!r}", "attr")
    target = calls[op.index]
    bound = bind_arguments(FUNCTION_OPS[target.target][0], target.args, dict(target.kwargs))
    passed = {key: bound[key] for key in op.keywords if bound.get(key) is not None}
    gm.add_submodule(op.attr, op.module)
    with gm.graph.inserting_before(target):
        new_node = gm.graph.call_module(op.attr, (bound["input"],), passed)
    target.replace_all_uses_with(new_node)
    gm.graph.erase_node(target)
    gm.graph.lint()
    gm.recompile()
    if op.owner:
        return model, _put(model, op.owner, gm)
    return gm, lambda: None  # the caller keeps the original root


def _link(model: nn.Module, op: Link) -> Undo:
    leader = _module_at(model, op.leader, "leader")
    followers = [_module_at(model, p, f"followers[{i}]") for i, p in enumerate(op.followers)]
    cls = type(leader)
    link = getattr(cls, "link", None)
    if cls not in registered_layers().values() or not callable(link):
        raise EditError(
            f"{cls.__name__} at {op.leader!r} is not a registered layer with a link(leader, "
            "followers) classmethod",
            "leader",
        )
    try:
        undo: Undo = link(leader, followers)
    except ValueError as exc:
        raise EditError(
            f"cannot link {op.leader!r} to {list(op.followers)}: {exc}", "followers"
        ) from exc
    return undo


def perform(model: nn.Module, op: EditOp) -> tuple[nn.Module, Undo]:
    """Apply `op` to `model`; returns the model's root afterwards (a new GraphModule only when
    a call in the root's own forward was replaced) and a function that undoes the change.
    EditError when the operation does not apply."""
    if isinstance(op, Replace):
        return model, _put(model, op.path, op.module)
    if isinstance(op, Wrap):
        original = _module_at(model, op.path)
        return model, _put(model, op.path, nn.Sequential(*op.before, original, *op.after))
    if isinstance(op, SetAttrs):
        return model, _set_attrs(model, op)
    if isinstance(op, Link):
        return model, _link(model, op)
    return _replace_call(model, op)


@dataclass
class _Pending:
    """A functional call to replace when the editor finishes (calls are rewritten per owner)."""

    owner: str
    function: str
    index: int  # among the owner's direct calls of `function` in the analysis graph
    attr: str
    module: nn.Module
    type_name: str
    keywords: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """The path `module` will have once the call is replaced."""
        return f"{self.owner}.{self.attr}" if self.owner else self.attr


@dataclass
class ModelEditor:
    """Changes a model in place, one logged operation at a time, and can undo all of them.

    `ops` is the edit plan so far; `rollback()` restores the model exactly (the original module
    objects, attribute values and parameter tensors; the root object is the one passed in).
    Functional-call replacements are queued by `replace_function` and performed by `finish`,
    and so is a `link` that names a module such a replacement puts in.
    """

    model: nn.Module
    analysis: Analysis | None = None
    ops: list[EditOp] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _undo: list[Undo] = field(default_factory=list, repr=False)
    _pending: list[_Pending | Link] = field(default_factory=list, repr=False)
    _traced: set[str] = field(default_factory=set, repr=False)  # owners known to trace

    def module(self, path: str) -> nn.Module:
        """The submodule at `path` ("" for the model) as it is now."""
        return self.model.get_submodule(path)

    def apply(self, op: EditOp) -> None:
        """Perform `op`, log it and remember how to undo it."""
        previous = self.model
        self.model, undo = perform(self.model, op)
        if self.model is not previous:  # the root's own forward became a GraphModule

            def undo_root(undo: Undo = undo) -> None:
                undo()
                self.model = previous

            undo = undo_root
        self._undo.append(undo)
        self.ops.append(op)

    def replace(self, path: str, module: nn.Module) -> str:
        """Put `module` where the submodule at `path` was; returns `path`."""
        self.apply(Replace(path, module))
        return path

    def wrap(
        self, path: str, before: Sequence[nn.Module] = (), after: Sequence[nn.Module] = ()
    ) -> str:
        """Make the submodule at `path` `Sequential(*before, it, *after)`; returns the path the
        original module now has (`path.<len(before)>`)."""
        self.apply(Wrap(path, tuple(before), tuple(after)))
        return f"{path}.{len(before)}" if path else str(len(before))

    def set_attrs(self, path: str, **attrs: Any) -> None:
        """Set the geometry (`stride`, `dilation`, `padding`) of the conv or pool at `path`."""
        self.apply(SetAttrs(path, {key: _json_value(v) for key, v in attrs.items()}))

    def link(self, leader: str, followers: Sequence[str]) -> None:
        """Link the layer at `leader` to those at `followers` (`Link`); queued until `finish`
        when a path lies in a module that a queued call replacement will put in."""
        op = Link(leader, tuple(followers))
        queued = [p.path for p in self._pending if isinstance(p, _Pending)]
        if any(
            path == q or path.startswith(f"{q}.") for path in (leader, *followers) for q in queued
        ):
            self._pending.append(op)
        else:
            self.apply(op)

    def replace_site(
        self, site: Site, new: nn.Module, suffix: str, keywords: Sequence[str] = ()
    ) -> str:
        """Put `new` where the site's operation is: the site's module, or (functional sites,
        queued until `finish`) the call, with `new` set on the owner as `<node>_<suffix>` and
        called with the call's arguments named in `keywords` too. Returns the path `new` has
        (or will have)."""
        if not site.functional:
            return self.replace(site.module, new)
        owner, _, node = site.name.partition(":")
        attr = f"{node}_{suffix}".replace(".", "_")
        return self.replace_function(owner, node, new, attr, site.type_name, keywords)

    def replace_function(
        self,
        owner: str,
        node_name: str,
        module: nn.Module,
        attr: str,
        type_name: str,
        keywords: Sequence[str] = (),
    ) -> str:
        """Queue replacing the call at analysis node `node_name`, made by the forward of the
        module at `owner`, with `module` (given the call's arguments named in `keywords`);
        returns the path `module` will have."""
        if self.analysis is None:
            raise EditError("replacing a function call needs the analysis of the model")
        region = self.analysis.region_of(owner) if owner else self.analysis.regions[0]
        if region is None or region.graph is None:
            raise EditError(f"no graph covers {owner or 'the model'!r}")
        node = next((n for n in region.graph.nodes if n.name == node_name), None)
        function = function_name(node.target) if node is not None else None
        if node is None or function is None:
            raise EditError(f"{owner}:{node_name} is not a call of a known function")
        relative = owner[len(region.path) + 1 :] if region.path else owner
        index = direct_calls(region.graph, function, relative).index(node)
        if owner not in self._traced:
            # an owner traced only as part of a larger region may not trace on its own: say so
            # now (EditError), so that this site is skipped rather than `finish` failing
            _owner_graph(self.module(owner), owner)
            self._traced.add(owner)
        pending = _Pending(owner, function, index, attr, module, type_name, tuple(keywords))
        self._pending.append(pending)
        return pending.path

    def finish(self) -> nn.Module:
        """Perform the queued function-call replacements, then the queued links; returns the
        model's root (a GraphModule when the root's own forward made a replaced call)."""
        owners: dict[str, list[_Pending]] = {}
        links: list[Link] = []
        for item in self._pending:
            if isinstance(item, Link):
                links.append(item)
            else:
                owners.setdefault(item.owner, []).append(item)
        self._pending.clear()
        for owner, items in owners.items():
            # the last call first, so the indices of earlier calls still hold when each is done
            for item in sorted(items, key=lambda i: (i.function, -i.index)):
                self.apply(
                    ReplaceCall(
                        owner, item.function, item.index, item.attr, item.module, item.keywords
                    )
                )
            types = ", ".join(sorted({i.type_name for i in items}))
            if owner:
                self.notes.append(
                    f"{owner} is now a torch.fx.GraphModule (it calls {types} in its forward)"
                )
            else:
                self.notes.append(
                    "the model is now a torch.fx.GraphModule: "
                    f"{type(self.model).__name__}'s own forward calls the replaced functions, "
                    "so its class and methods are not kept"
                )
        for link in links:
            self.apply(link)
        return self.model

    def mark(self) -> tuple[int, int]:
        """A point to `rollback` to: the operations performed and queued so far."""
        return len(self.ops), len(self._pending)

    def rollback(self, mark: tuple[int, int] = (0, 0)) -> nn.Module:
        """Undo every operation performed after `mark` (all of them by default), last first,
        and drop the calls queued after it; returns the model's root afterwards."""
        done, queued = mark
        while len(self._undo) > done:
            self._undo.pop()()
            self.ops.pop()
        del self._pending[queued:]
        return self.model
