"""`fold`: rewrite a patched model's replacement layers into the exact formulation that runs
fastest on the backend it will be deployed with (eager PyTorch, Inductor, ONNX Runtime).

Three kinds of unit are considered, each with forms that compute the same outputs:

- **SPD-Conv** (`SpaceToDepthConv`): "kept", or "folded" into one strided convolution
  (`FoldedSpaceToDepthConv`). Space-to-depth by b then a K-tap convolution is linear, so

      conv_K(space_to_depth_b(pad(x)))  ==  conv_{b·K}(pad(x), stride=b)

  with the inner kernel's phase channels moved back into space (`W[o, c·P + r, q]` becomes tap
  `b·q + r` of channel `c`): no copy, the same MACs. Outer all-zero taps are trimmed (right
  after an exact transfer that gives back the original layer's kernel).
- **BlurPool** (inductor and onnxruntime only: eager mode has its own per-device formulation):
  the formulation graphs see, `BlurPool.export_form` ("gather", "pad", "separable", and "conv"
  for zero padding).
- **Blur + pointwise convolution** (`Sequential(BlurPool, 1×1 stride-1 conv)`, the anti-aliased
  shortcut): "kept", or "folded" into one f×f strided convolution on the input padded the
  blur's way (`FoldedBlurConv`), exact for every padding mode. "interior" folds a reflect or
  replicate blur into one zero-padded convolution, which equals the pair only away from the
  borders: made only with `interior_only=True`.

Each unit's form is chosen by timing every candidate on the unit's real input shape on the
backend (`choose="fastest"`), forced (`choose="folded"`), or replayed from a record (`forms`).
Every candidate is checked against the unit before it can be chosen, in eager mode and on the
backend; the `FoldRecord` says what was done, with the timings. Replacements go through the
`ModelEditor`, so a checkpoint records them and a failure leaves the model as it was.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from surgeon.backends import BACKENDS, Backend, race, runner
from surgeon.edits import EditOp, ModelEditor
from surgeon.errors import PatchError, UsageError
from surgeon.layers.blur import EXPORT_FORMS, BlurPool
from surgeon.layers.folded import FoldedSpaceToDepthConv
from surgeon.layers.folded_blur import FoldedBlurConv
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.transfer import spatial_kernel

__all__ = [
    "BACKENDS",
    "FoldRecord",
    "FoldedBlurConv",
    "FoldedSpaceToDepthConv",
    "LayerFold",
    "fold",
    "fold_space_to_depth",
]

Choice = Literal["fastest", "folded"]
Kind = Literal["spd", "blur", "pair"]

# A folded layer must match the layer it replaces to float32 rounding (relative to the output's
# magnitude); the sums are only reordered.
_FOLD_TOLERANCE = 1e-5


def fold_space_to_depth(layer: SpaceToDepthConv, *, trim: bool = True) -> FoldedSpaceToDepthConv:
    """The strided-convolution form of an SPD-Conv layer (same outputs to float32 rounding).

    The inner kernel (O, C·P/g, *K) becomes (O, C/g, *(b·K)): tap `b·q + r` of channel `c` is
    the inner tap `q` of phase channel `c·P + r`. With `trim`, trailing all-zero taps per
    spatial dim are dropped, and leading ones as far as the left padding allows (it is reduced
    by their count and must stay >= 0 for every input size).
    """
    dims = layer.dims
    weight = spatial_kernel(layer.conv.weight.detach(), layer.block, layer.phase_major)
    lows = [0] * dims
    if trim:
        for i in range(dims):
            taps = weight.abs().sum(dim=[d for d in range(weight.dim()) if d != 2 + i])
            nonzero = torch.nonzero(taps).flatten()
            if nonzero.numel() == 0:  # an all-zero kernel: keep one tap so shapes still work
                lows[i], high = 0, 1
            else:
                lows[i], high = int(nonzero[0]), int(nonzero[-1]) + 1
            # Never trim past the smallest left padding, so the left pad stays >= 0.
            lows[i] = min(
                lows[i], layer.offset[i] + (layer.padding[i] if layer.keep_op_padding else 0)
            )
            weight = weight.narrow(2 + i, lows[i], high - lows[i])
    return FoldedSpaceToDepthConv.from_layer(layer, weight.contiguous(), lows)


@dataclass(frozen=True)
class LayerFold:
    """What `fold` did at one unit: the form chosen, and the measurements behind it."""

    name: str
    kind: str  # "spd", "blur" or "pair"
    layer: str  # the unit as it was, e.g. "SPD b2 + conv k2 256→128"
    form: str  # "kept" (unchanged), "folded", "interior", or a BlurPool export form
    replacement: str  # what runs now, e.g. "conv k3×3 s2 64→128 (zero taps trimmed from k4×4)"
    input_shape: tuple[int, ...]
    timings: Mapping[str, float] = field(hash=False)  # best ms per form timed ({}: not timed)
    max_abs_diff: float  # of the chosen form against the unit, eager, on a random input
    rel_diff: float

    @property
    def changed(self) -> bool:
        return self.form != "kept"


@dataclass(frozen=True)
class FoldRecord:
    """Every unit `fold` considered, what it chose for each and how they measured."""

    layers: tuple[LayerFold, ...]
    choose: str
    threads: int
    backend: str = "eager"
    ops: tuple[EditOp, ...] = field(default=(), compare=False)
    """The edits made: one `Replace` per unit changed (what a checkpoint records)."""

    @property
    def folded(self) -> int:
        """How many units were rewritten (form other than "kept")."""
        return sum(layer.changed for layer in self.layers)

    @property
    def forms(self) -> dict[str, str]:
        """{unit name: form}, to replay the same fold with `fold(..., forms=...)`."""
        return {layer.name: layer.form for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stored in exports' metadata and checkpoint manifests."""
        return {
            "choose": self.choose,
            "threads": self.threads,
            "backend": self.backend,
            "folded": self.folded,
            "layers": [
                {**asdict(layer), "input_shape": list(layer.input_shape)} for layer in self.layers
            ],
        }

    def summary(self) -> str:
        """One line per unit: name, form, timings."""
        lines = [
            f"{self.folded} of {len(self.layers)} layers rewritten for {self.backend} "
            f"({self.choose}, {self.threads} threads)"
        ]
        for layer in self.layers:
            timing = ", ".join(f"{form} {ms:.3f} ms" for form, ms in layer.timings.items())
            lines.append(
                f"  {layer.name} {tuple(layer.input_shape)} → {layer.form}"
                + (f": {timing}" if timing else "")
            )
        return "\n".join(lines)


@dataclass
class _Unit:
    """A unit of the model `fold` may rewrite: its candidate forms, built on demand."""

    name: str
    kind: Kind
    module: nn.Module
    candidates: dict[str, Callable[[], nn.Module]]  # form -> builder (not "kept")
    exact: dict[str, bool]  # form -> whether it equals the unit everywhere
    blur: BlurPool | None = None  # a pair's blur


def fold(
    model: nn.Module,
    example_input: Any,
    *,
    backend: Backend | str = "eager",
    choose: Choice = "fastest",
    forms: Mapping[str, str] | None = None,
    trim: bool = True,
    interior_only: bool = False,
    min_seconds: float = 0.05,
) -> tuple[nn.Module, FoldRecord]:
    """Rewrite the model's replacement layers in place into the form fastest on `backend`;
    return the model and the record.

    `example_input` (a tensor or a tuple of positional arguments) is run once to find each
    unit's input shape. `backend` is what the model will run on: "eager", "inductor"
    (`torch.compile`) or "onnxruntime" (an ONNX export). With `choose="fastest"` each unit's
    forms run on a random input of its shape on that backend, interleaved, for at least
    `min_seconds` each, and the fastest (best of interleaved rounds) is kept; `choose="folded"`
    folds every SPD layer and blur + pointwise pair without timing (BlurPool forms are left as
    they are). `forms` (unit name → form, e.g. a previous record's `forms`) overrides both.
    `interior_only` allows the "interior" fold of reflect and replicate blurs (see the module
    docstring; `choose="folded"` then makes it). Raises PatchError if a form's output differs
    from the unit's beyond float32 rounding, UsageError for an unknown backend or choice.
    """
    if choose not in ("fastest", "folded"):
        raise UsageError(f"fold choose must be 'fastest' or 'folded', got {choose!r}")
    if backend not in BACKENDS:
        raise UsageError(f"unknown fold backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    units = _units(model, backend, trim, interior_only or _replays_interior(forms))
    unknown = sorted(set(forms or {}) - {unit.name for unit in units})
    if unknown:
        raise PatchError(f"fold forms name layers the model does not have: {', '.join(unknown)}")
    shapes = _input_shapes(model, {unit.name: unit.module for unit in units}, example_input)
    editor = ModelEditor(model)
    records: list[LayerFold] = []
    try:
        for unit in units:
            if unit.name not in shapes:  # not reached by the example input: nothing to measure
                continue
            shape = shapes[unit.name]
            records.append(
                _fold_unit(editor, unit, shape, backend, choose, forms, interior_only, min_seconds)
            )
    except BaseException:  # all or nothing, as for patch
        editor.rollback()
        raise
    return model, FoldRecord(
        tuple(records),
        choose if forms is None else "replayed",
        torch.get_num_threads(),
        backend,
        tuple(editor.ops),
    )


def _replays_interior(forms: Mapping[str, str] | None) -> bool:
    return forms is not None and "interior" in forms.values()


def _units(model: nn.Module, backend: str, trim: bool, interior: bool) -> list[_Unit]:
    """SPD layers, then BlurPools (not in eager mode), then blur + pointwise pairs: a pair is
    timed with its blur in the form chosen for it."""
    spd: list[_Unit] = []
    blurs: list[_Unit] = []
    pairs: list[_Unit] = []
    for name, module in model.named_modules():
        if isinstance(module, SpaceToDepthConv):
            folded = functools.partial(fold_space_to_depth, module, trim=trim)
            spd.append(_Unit(name, "spd", module, {"folded": folded}, {"folded": True}))
        elif isinstance(module, BlurPool) and backend != "eager":
            others = [f for f in _blur_forms(module) if f != module.export_form]
            builders: dict[str, Callable[[], nn.Module]] = {
                f: functools.partial(_with_form, module, f) for f in others
            }
            blurs.append(_Unit(name, "blur", module, builders, dict.fromkeys(others, True)))
        elif _is_pair(module):
            blur, conv = module[0], module[1]
            candidates: dict[str, Callable[[], nn.Module]] = {
                "folded": functools.partial(FoldedBlurConv.from_pair, blur, conv)
            }
            exact = {"folded": True}
            if interior and blur.pad_mode != "zero":
                candidates["interior"] = functools.partial(
                    FoldedBlurConv.from_pair, blur, conv, pad_mode="zero"
                )
                exact["interior"] = False
            pairs.append(_Unit(name, "pair", module, candidates, exact, blur))
    return spd + blurs + pairs


def _blur_forms(blur: BlurPool) -> list[str]:
    constant = blur.pad_mode == "zero" and not blur.ceil_mode
    return [f for f in EXPORT_FORMS if f != "conv" or constant]


def _with_form(blur: BlurPool, form: str) -> BlurPool:
    config = {**blur.config(), "export_form": form}
    return BlurPool(**config).to(device=blur.filter.device)


def _is_pair(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential) or len(module) != 2:
        return False
    blur, conv = module[0], module[1]
    return (
        isinstance(blur, BlurPool)
        and isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and len(conv.kernel_size) == blur.dims
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and not isinstance(conv.padding, str)
        and not any(conv.padding)
        and conv.padding_mode == "zeros"
        and conv.in_channels == blur.channels
    )


def _fold_unit(
    editor: ModelEditor,
    unit: _Unit,
    shape: tuple[int, ...],
    backend: str,
    choose: str,
    forms: Mapping[str, str] | None,
    interior_only: bool,
    min_seconds: float,
) -> LayerFold:
    module = editor.module(unit.name)  # a pair's blur may have been replaced by now
    timed = forms is None and choose == "fastest"
    if forms is not None:  # a replay: units it does not name stay as they are
        form = forms.get(unit.name, "kept")
        if form != "kept" and form not in unit.candidates:
            known = ", ".join(["kept", *unit.candidates])
            raise PatchError(f"fold form for {unit.name} must be one of {known}, got {form!r}")
    elif choose == "folded":
        form = "kept"
        if unit.kind in ("spd", "pair"):
            form = "interior" if interior_only and "interior" in unit.candidates else "folded"
    wanted = list(unit.candidates) if timed else [form] if form != "kept" else []
    built = {f: unit.candidates[f]() for f in wanted}
    reference = next(itertools.chain(module.parameters(), module.buffers()))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        expected = module(x)
    differences = {f: _check(unit, f, candidate, x, expected) for f, candidate in built.items()}
    timings: dict[str, float] = {}
    if timed:
        # a BlurPool's own form is timed under its name; choosing it keeps the layer
        own = module.export_form if isinstance(module, BlurPool) else "kept"
        timings = _time(module, own, built, x, expected, backend, unit.name, min_seconds)
        form = min(timings, key=timings.__getitem__)
        form = "kept" if form == own else form
    if form != "kept":
        editor.replace(unit.name, built[form])
    max_abs, rel = differences.get(form, (0.0, 0.0))
    return LayerFold(
        name=unit.name,
        kind=unit.kind,
        layer=_describe(module),
        form=form,
        replacement=_describe(built[form], module) if form != "kept" else _describe(module),
        input_shape=tuple(shape),
        timings=timings,
        max_abs_diff=max_abs,
        rel_diff=rel,
    )


def _check(
    unit: _Unit, form: str, candidate: nn.Module, x: Tensor, expected: Tensor
) -> tuple[float, float]:
    """(max abs, relative) difference of a form against the unit; PatchError beyond rounding
    (for the interior form, beyond rounding in the interior)."""
    with torch.no_grad():
        got = candidate(x)
    max_abs, rel = _difference(expected, got)
    compared = rel
    if not unit.exact[form] and expected.shape == got.shape:
        assert unit.blur is not None
        inner = _interior(unit.blur, x.shape[2:])
        compared = _difference(expected[inner], got[inner])[1] if inner else 0.0
    if expected.shape != got.shape or not compared <= _FOLD_TOLERANCE:
        where = "in the interior " if not unit.exact[form] else ""
        raise PatchError(
            f"the {form} form of {unit.name} changed its output {where}(shape "
            f"{tuple(expected.shape)} → {tuple(got.shape)}, relative difference {compared:.2e}); "
            "this is a bug in surgeon, please report it with the model and policy"
        )
    return max_abs, rel


def _interior(blur: BlurPool, sizes: torch.Size) -> tuple[slice, ...] | None:
    """The outputs whose filter window lies inside the map in every dim (None: there are
    none): where padding, whatever its mode, is not read."""
    left = (blur.filter_size - 1) // 2
    index: list[slice] = [slice(None), slice(None)]
    for size, stride in zip(sizes, blur.stride, strict=True):
        first = -(-left // stride)
        last = (size - blur.filter_size + left) // stride
        if last < first:
            return None
        index.append(slice(first, last + 1))
    return tuple(index)


def _time(
    module: nn.Module,
    own: str,
    built: Mapping[str, nn.Module],
    x: Tensor,
    expected: Tensor,
    backend: str,
    name: str,
    min_seconds: float,
) -> dict[str, float]:
    """Best ms per form on the backend; each form's output there is checked first."""
    calls: dict[str, Callable[[], Tensor]] = {}
    for form, candidate in {own: module, **built}.items():
        call = runner(candidate, x, backend)
        got = call()
        _, rel = _difference(expected, got.to(expected.device))
        if backend != "eager" and form != "interior" and not rel <= _FOLD_TOLERANCE:
            raise PatchError(
                f"the {form} form of {name} runs differently under {backend} (relative "
                f"difference {rel:.2e}); this is a bug in surgeon, please report it"
            )
        calls[form] = call
    return race(calls, min_seconds)


def _input_shapes(
    model: nn.Module, layers: Mapping[str, nn.Module], example_input: Any
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def _difference(expected: Tensor, got: Tensor) -> tuple[float, float]:
    if expected.shape != got.shape:
        return math.inf, math.inf
    worst = (expected.double() - got.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return worst, worst / scale if scale else worst


def _kernel_text(kernel: tuple[int, ...]) -> str:
    return "×".join(map(str, kernel))


def _describe(module: nn.Module, source: nn.Module | None = None) -> str:
    """A short description of a unit's form (for the record and `surgeon info`)."""
    if isinstance(module, SpaceToDepthConv):
        conv = module.conv
        return (
            f"SPD b{_kernel_text(module.block)} + conv k{_kernel_text(tuple(conv.kernel_size))} "
            f"{conv.in_channels}→{conv.out_channels}"
        )
    if isinstance(module, FoldedSpaceToDepthConv):
        conv = module.conv
        text = (
            f"conv k{_kernel_text(tuple(conv.kernel_size))} s{_kernel_text(tuple(conv.stride))} "
            f"{conv.in_channels}→{conv.out_channels}"
        )
        if conv.groups > 1:
            text += f" g{conv.groups}"
        if isinstance(source, SpaceToDepthConv):
            full = tuple(b * k for b, k in zip(source.block, source.conv.kernel_size, strict=True))
            if tuple(conv.kernel_size) != full:
                text += f" (zero taps trimmed from k{_kernel_text(full)})"
        return text
    if isinstance(module, BlurPool):
        return (
            f"BlurPool f{module.filter_size} s{_kernel_text(module.stride)} {module.pad_mode} "
            f"({module.export_form})"
        )
    if isinstance(module, FoldedBlurConv):
        conv = module.conv
        return (
            f"conv k{_kernel_text(tuple(conv.kernel_size))} s{_kernel_text(tuple(conv.stride))} "
            f"{conv.in_channels}→{conv.out_channels} on {module.pad_mode}-padded input"
        )
    if isinstance(module, nn.Sequential):
        return " → ".join(_describe(child) for child in module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kernel = _kernel_text(tuple(module.kernel_size))
        return f"conv k{kernel} {module.in_channels}→{module.out_channels}"
    return type(module).__name__
