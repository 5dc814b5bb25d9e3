"""Tracing for analysis: qualified module paths and shapes for every node, with a fallback chain.

The graphs built here are for reading only; the patched model is always the user's own module,
edited in place. The chain, per region of the model:
  1. torch.fx with a tracer that treats convolution/pooling/norm layers, torchvision.ops modules
     and timm's registered no-trace modules and functions as leaves;
  2. if a module does not trace, its children are tried the same way (largest first);
  3. a module with no traceable children is tried with torch.export (non-strict);
  4. whatever no graph covers is seen through forward hooks (module sites only).
Every region records which method produced it, so a scan can say how each site was found.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from surgeon.errors import AnalysisError, Argument
from surgeon.submodules import count_params

__all__ = [
    "Analysis",
    "CallRecord",
    "Reference",
    "Region",
    "SurgeonTracer",
    "analyse",
    "call_owner",
    "counted_forward",
    "default_leaves",
    "snapshot",
]

Method = Literal["fx", "export", "hooks"]

# Modules we never trace into: the sites themselves and the layers around them.
_LEAF_BASES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def default_leaves() -> tuple[
    tuple[type[nn.Module], ...], tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]
]:
    """Leaf types that are always leaves (timm's no-trace registry), leaf types that are leaves
    only when they hold no submodules (torchvision.ops: RoIAlign yes, Conv2dNormActivation no),
    and functions to autowrap."""
    # A model can only hold timm modules or call timm functions once timm is imported, so a
    # torchvision model is analysed without paying for `import timm` (~0.5-1 s).
    return _default_leaves("timm" in sys.modules)


@cache
def _default_leaves(
    with_timm: bool,
) -> tuple[
    tuple[type[nn.Module], ...], tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]
]:
    import torchvision.ops

    ops_types = tuple(
        obj
        for obj in vars(torchvision.ops).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module)
    )
    always: list[type[nn.Module]] = []
    functions: list[Callable[..., Any]] = []
    if with_timm:
        from timm.layers import _fx as timm_fx

        always += list(timm_fx.get_notrace_modules())
        functions += [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return tuple(dict.fromkeys(always)), ops_types, tuple(dict.fromkeys(functions))


class SurgeonTracer(fx.Tracer):
    """An fx tracer whose leaves are surgeon's layers of interest plus registered no-trace ones."""

    def __init__(
        self,
        leaf_types: tuple[type[nn.Module], ...] = (),
        simple_leaf_types: tuple[type[nn.Module], ...] = (),
        autowrap_functions: tuple[Callable[..., Any], ...] = (),
    ) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self.simple_leaf_types = simple_leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _LEAF_BASES) or type(m) in self.leaf_types:
            return True
        if type(m).__module__.startswith("surgeon.layers"):
            return True  # our own replacement layers: sites of a patched model stay visible
        if type(m) in self.simple_leaf_types and next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class CallRecord:
    """One call of a module seen by a forward hook: the shapes of its tensor inputs and outputs."""

    in_shapes: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]


@dataclass
class Region:
    """A part of the model analysed by one method; `path` is its qualified module name."""

    path: str
    method: Method
    module: nn.Module
    graph: fx.Graph | None = None
    graph_module: fx.GraphModule | None = None
    note: str = ""

    @property
    def label(self) -> str:
        """How sites in this region were found, e.g. `fx`, `fx (backbone)`."""
        return f"{self.method} ({self.path})" if self.path else self.method

    def qualify(self, target: str) -> str:
        """The model-level qualified name of a module path relative to this region."""
        return f"{self.path}.{target}" if self.path and target else (self.path or target)

    def owner(self, node: fx.Node) -> str:
        """The model-level path of the module whose own forward makes the call at `node`."""
        return self.qualify(call_owner(node))


def call_owner(node: fx.Node) -> str:
    """The path, relative to the traced root, of the module whose own forward makes the call
    at `node` ("" for the root's forward), from the tracer's module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


@dataclass
class Analysis:
    """What tracing found: regions with graphs, per-module call records, and what failed."""

    model: nn.Module
    regions: list[Region]
    calls: dict[str, list[CallRecord]]
    order: list[str]  # module names in the order of their first call
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (path, method, reason)
    reference: Reference | None = None  # the hook run's results, when asked for (patch)

    def region_of(self, name: str) -> Region | None:
        """The graph region covering a qualified module name, if any."""
        best: Region | None = None
        for region in self.regions:
            if region.method == "hooks":
                continue
            inside = not region.path or name == region.path or name.startswith(region.path + ".")
            if inside and (best is None or len(region.path) > len(best.path)):
                best = region
        return best


@dataclass
class Reference:
    """The original model's hook run, kept so that patch() need not run the model again: its
    output, FLOPs per module path ("" for the total), and copies of the first (args, output) of
    every leaf module whose output has another shape than its first input (resolution changes)."""

    output: Any
    flops: dict[str, int]
    captured: dict[str, tuple[Any, Any]]


def counted_forward(model: nn.Module, args: tuple[Any, ...]) -> tuple[Any, dict[str, int]]:
    """Run `model` without gradients under FlopCounterMode: (output, FLOPs per module path, with
    "" for the total)."""
    # FlopCounterMode's module tracker hooks autograd on every module input that requires
    # grad; a view of a parameter taken under no_grad (timm CaiT's `cls_token.expand(...)`)
    # requires grad but has no grad_fn and breaks it. Counting needs no gradients: turn them off.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            output = model(*args)
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
    prefix = type(model).__name__ + "."
    flops = {
        key[len(prefix) :]: sum(ops.values())
        for key, ops in counter.get_flop_counts().items()
        if key.startswith(prefix)
    }
    flops[""] = counter.get_total_flops()
    return output, flops


def snapshot(args: Any, output: Any) -> tuple[Any, Any]:
    """Copies of a call's tensors (args, output) that in-place ops run later, such as a
    ReLU(inplace=True) after the module, cannot change."""

    def copy(value: Any) -> Any:
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    return tree_map(copy, args), tree_map(copy, output)


def _shapes(value: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


class _Recorder:
    """Forward hooks on every module: call records, the first inputs of container modules and,
    with `capture`, copies of the first (args, output) of resolution-changing leaf modules."""

    def __init__(self, model: nn.Module, *, capture: bool = False) -> None:
        self.calls: dict[str, list[CallRecord]] = {}
        self.inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.order: list[str] = []
        self.capture = capture
        self.captured: dict[str, tuple[Any, Any]] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name), with_kwargs=True)
            for name, module in model.named_modules()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            records = self.calls.setdefault(name, [])
            record = CallRecord(_shapes((args, kwargs)), _shapes(output))
            records.append(record)
            if len(records) == 1:
                self.order.append(name)
                # copies: an in-place activation after the module (ReLU(inplace=True)) would
                # change them; only where the resolution changes (the candidate sites), as
                # copying every activation would double the run's memory
                if (
                    self.capture
                    and not kwargs
                    and next(module.children(), None) is None
                    and record.in_shapes[:1] != record.out_shapes[:1]
                ):
                    self.captured[name] = snapshot(args, output)
                # inputs of the modules the chain may trace on their own (not torch.nn's leaves)
                if isinstance(module, _CONTAINERS) or not type(module).__module__.startswith(
                    "torch.nn."
                ):
                    self.inputs[name] = (args, kwargs)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _run(model: nn.Module, args: tuple[Any, ...], *, count: bool) -> Any:
    try:
        if count:
            return counted_forward(model, args)
        with torch.no_grad():
            return model(*args), None
    except Exception as exc:
        raise AnalysisError(
            f"the model failed on the example input ({_one_line(exc)}); check ",
            Argument("input_size"),
            " and ",
            Argument("kwargs"),
        ) from exc


def _try_fx(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> fx.GraphModule | str:
    if kwargs:
        return "called with keyword arguments"
    tracer = SurgeonTracer(*default_leaves())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(module)
            gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
            ShapeProp(gm).propagate(*args)
    except Exception as exc:  # fx raises many types; any failure means "try the next method"
        return _one_line(exc)
    return gm


def _try_export(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.export.ExportedProgram | str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, args, kwargs, strict=False)
    except Exception as exc:  # as above: any failure falls through to hooks
        return _one_line(exc)


def _children(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield (f"{path}.{name}" if path else name), child


def _refuse_quantized(model: nn.Module) -> None:
    """Quantized layers keep packed integer weights that no replacement can take over, and their
    strides are invisible to the walker: say so instead of reporting a model without sites."""
    keys = [k for k, v in model.state_dict().items() if getattr(v, "is_quantized", False)]
    if not keys:
        return
    modules = dict(model.named_modules())

    def owner(key: str) -> str:
        while key and key not in modules:
            key = key.rpartition(".")[0]
        return key

    layers = list(dict.fromkeys(map(owner, keys)))
    more = f" and {len(layers) - 1} more" if len(layers) > 1 else ""
    raise AnalysisError(
        f"the model is quantized ({layers[0] or 'the model'}: "
        f"{type(modules[layers[0]]).__name__}{more}); surgeon rewrites float models: patch the "
        "float model (torchvision: quantize=False), then quantize it"
    )


def analyse(
    model: nn.Module,
    example_args: tuple[Any, ...],
    *,
    use_export: bool = True,
    reference: bool = False,
) -> Analysis:
    """Run the model once with hooks, then cover it with graph regions (see module docstring).

    With `reference`, that run also counts FLOPs and keeps what patch() verifies against
    (`Analysis.reference`), so patching runs the original model once, not twice.
    The model is put in eval mode for the analysis and left in the mode it came in.
    AnalysisError for a quantized model (see `_refuse_quantized`).
    """
    _refuse_quantized(model)
    was_training = model.training
    model.eval()
    recorder = _Recorder(model, capture=reference)
    try:
        output, flops = _run(model, example_args, count=reference)
    finally:
        recorder.close()
    regions: list[Region] = []
    failures: list[tuple[str, str, str]] = []

    def cover(path: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        traced = _try_fx(module, args, kwargs)
        if isinstance(traced, fx.GraphModule):
            regions.append(Region(path, "fx", module, traced.graph, traced))
            return
        failures.append((path, "fx", traced))
        called = [
            (p, c)
            for p, c in _children(module, path)
            if p in recorder.calls and p in recorder.inputs
        ]
        if called:
            for child_path, child in sorted(called, key=lambda pc: -count_params(pc[1])):
                child_args, child_kwargs = recorder.inputs[child_path]
                cover(child_path, child, child_args, child_kwargs)
            return
        if use_export:
            exported = _try_export(module, args, kwargs)
            if isinstance(exported, torch.export.ExportedProgram):
                regions.append(Region(path, "export", module, exported.graph, note=traced))
                return
            failures.append((path, "export", exported))
        regions.append(Region(path, "hooks", module, note=traced))

    with torch.no_grad():
        cover("", model, example_args, {})
    model.train(was_training)
    if any(r.method != "fx" for r in regions) or len(regions) > 1:
        covered = {r.path for r in regions}
        # Modules under a failed container that had no inputs recorded (never called) or
        # that sit beside traced children are still visible to hooks.
        if "" not in covered:
            regions.append(Region("", "hooks", model, note="modules outside traced regions"))
    kept = Reference(output, flops, recorder.captured) if flops is not None else None
    return Analysis(model, regions, recorder.calls, recorder.order, failures, kept)
