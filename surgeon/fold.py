"""`fold`: rewrite a patched model's replacement layers into exact, cheaper-to-run equivalents.

SPD-Conv is space-to-depth (a copy) followed by a stride-1 convolution. Both are linear, so the
pair is one convolution on the original input:

    conv_K(space_to_depth_b(pad(x)))  ==  conv_{b·K}(pad(x), stride=b)

with the inner kernel's phase channels moved back into space (`W[o, c·P + r, q]` becomes tap
`b·q + r` of channel `c`). The folded form reads the input once and makes no copy; it has the
same MACs. Where the folded kernel's outer rows or columns are all zero (right after an exact
transfer, every SPD layer's are) they are trimmed and the padding shifted to match, which is
also exact and gives back the original layer's kernel.

BlurPool is not folded. Its reflect padding is applied to the map it blurs, so merging it into
the convolution before it (or into a 3×3 after it, whose zero padding then sees blurred
borders) is exact only away from the borders; the one exact merge, a blur followed by a 1×1
convolution, turns f²·C + C·C' MACs per position into f²·C·C' (16× for filter 4) and never
runs faster.

Each layer's form is chosen by timing both on the layer's real input shape (`choose="fastest"`),
or forced (`choose="folded"`, or per-layer `forms` when replaying a record). Every folded layer
is checked against the layer it replaces; the `FoldRecord` says what was done, with timings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from surgeon.edits import EditOp, ModelEditor
from surgeon.errors import PatchError
from surgeon.layers.folded import FoldedSpaceToDepthConv
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.transfer import spatial_kernel

__all__ = ["FoldRecord", "FoldedSpaceToDepthConv", "LayerFold", "fold", "fold_space_to_depth"]

Form = Literal["folded", "kept"]
Choice = Literal["fastest", "folded"]

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
    """What `fold` did at one layer: the form kept, why, and the measurements behind it."""

    name: str
    layer: str  # the source layer, e.g. "SPD b2 + conv k2 256→128"
    form: Form
    replacement: str  # what runs now, e.g. "Conv2d k4×4 s2 64→128 (trimmed to k3×3)"
    input_shape: tuple[int, ...]
    ms_kept: float | None  # best forward time of the source layer (None: not timed)
    ms_folded: float | None
    max_abs_diff: float
    rel_diff: float


@dataclass(frozen=True)
class FoldRecord:
    """Every foldable layer of a model, what `fold` chose for it and how it measured."""

    layers: tuple[LayerFold, ...]
    choose: str
    threads: int
    ops: tuple[EditOp, ...] = field(default=(), compare=False)
    """The edits made: one `Replace` per folded layer (what a checkpoint records)."""

    @property
    def folded(self) -> int:
        return sum(layer.form == "folded" for layer in self.layers)

    @property
    def forms(self) -> dict[str, str]:
        """{layer name: form}, to replay the same fold with `fold(..., forms=...)`."""
        return {layer.name: layer.form for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stored in exports' metadata and checkpoint manifests."""
        return {
            "choose": self.choose,
            "threads": self.threads,
            "folded": self.folded,
            "layers": [
                {**asdict(layer), "input_shape": list(layer.input_shape)} for layer in self.layers
            ],
        }

    def summary(self) -> str:
        """One line per layer: name, form, timings."""
        lines = [
            f"{self.folded} of {len(self.layers)} SPD layers folded "
            f"({self.choose}, {self.threads} threads)"
        ]
        for layer in self.layers:
            timing = ""
            if layer.ms_kept is not None and layer.ms_folded is not None:
                timing = f": SPD {layer.ms_kept:.3f} ms, folded {layer.ms_folded:.3f} ms"
            lines.append(f"  {layer.name} {tuple(layer.input_shape)} → {layer.form}{timing}")
        return "\n".join(lines)


def fold(
    model: nn.Module,
    example_input: Any,
    *,
    choose: Choice = "fastest",
    forms: Mapping[str, str] | None = None,
    trim: bool = True,
    min_seconds: float = 0.05,
) -> tuple[nn.Module, FoldRecord]:
    """Fold the model's SPD-Conv layers in place where that is faster; return it and the record.

    `example_input` (a tensor or a tuple of positional arguments) is run once to find each
    layer's input shape. With `choose="fastest"` each layer runs in both forms on a random
    input of that shape under no_grad, interleaved, for at least `min_seconds` each, and the
    faster one (best of interleaved rounds) wins; `choose="folded"` folds every layer without
    timing. `forms` (layer name → "folded" | "kept", e.g. a previous record's `forms`)
    overrides both. Raises PatchError if a folded layer's output differs from the original
    beyond float32 rounding.
    """
    if choose not in ("fastest", "folded"):
        raise ValueError(f"choose must be 'fastest' or 'folded', got {choose!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SpaceToDepthConv)}
    unknown = sorted(set(forms or {}) - set(layers))
    if unknown:
        raise PatchError(f"fold forms name layers the model does not have: {', '.join(unknown)}")
    shapes = _input_shapes(model, layers, example_input)
    editor = ModelEditor(model)
    try:
        records = _fold_layers(editor, layers, shapes, choose, forms, trim, min_seconds)
    except BaseException:  # all or nothing, as for patch
        editor.rollback()
        raise
    return model, FoldRecord(
        tuple(records),
        choose if forms is None else "replayed",
        torch.get_num_threads(),
        tuple(editor.ops),
    )


def _fold_layers(
    editor: ModelEditor,
    layers: Mapping[str, SpaceToDepthConv],
    shapes: Mapping[str, tuple[int, ...]],
    choose: str,
    forms: Mapping[str, str] | None,
    trim: bool,
    min_seconds: float,
) -> list[LayerFold]:
    records: list[LayerFold] = []
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        if name not in shapes:
            continue  # not reached by the example input: nothing to measure or check
        shape = shapes[name]
        folded = fold_space_to_depth(layer, trim=trim)
        weight = layer.conv.weight
        x = torch.randn(shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            expected, got = layer(x), folded(x)
        max_abs, rel = _difference(expected, got)
        if expected.shape != got.shape or rel > _FOLD_TOLERANCE:
            raise PatchError(
                f"folding {name} changed its output (shape {tuple(expected.shape)} → "
                f"{tuple(got.shape)}, relative difference {rel:.2e}); this is a bug in surgeon, "
                "please report it with the model and policy"
            )
        ms_kept = ms_folded = None
        if forms is not None and name in forms:
            form = forms[name]
            if form not in ("folded", "kept"):
                raise PatchError(f"fold form for {name} must be 'folded' or 'kept', got {form!r}")
        elif choose == "folded":
            form = "folded"
        else:
            ms_kept, ms_folded = _race(layer, folded, x, min_seconds)
            form = "folded" if ms_folded < ms_kept else "kept"
        if form == "folded":
            editor.replace(name, folded)
        records.append(
            LayerFold(
                name=name,
                layer=_describe_spd(layer),
                form=form,  # type: ignore[arg-type]
                replacement=_describe_folded(folded, layer)
                if form == "folded"
                else _describe_spd(layer),
                input_shape=tuple(shape),
                ms_kept=ms_kept,
                ms_folded=ms_folded,
                max_abs_diff=max_abs,
                rel_diff=rel,
            )
        )
    return records


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


def _race(
    first: nn.Module, second: nn.Module, x: Tensor, min_seconds: float
) -> tuple[float, float]:
    """Milliseconds per call of two modules on `x`: the best of interleaved rounds.

    The minimum, not the median: on a shared machine other processes only ever add time, so
    the fastest round is the closest to what each form costs on its own. When torch runs on
    one thread the clock is that thread's CPU time, which time spent descheduled cannot touch.
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.no_grad():
        first(x), second(x)  # warm-up: allocator, oneDNN primitive caches
        once = math.inf
        for _ in range(3):  # the fastest of a few calls: one descheduled call must not set reps
            start = clock()
            first(x)
            once = min(once, max(clock() - start, 1e-6))
        reps = max(1, min(50, int(0.01 / once)))
        rounds = max(7, int(min_seconds / (reps * once)))
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            for module, store in ((first, times[0]), (second, times[1])):
                start = clock()
                for _ in range(reps):
                    module(x)
                store.append((clock() - start) / reps * 1e3)
    return min(times[0]), min(times[1])


def _difference(expected: Tensor, got: Tensor) -> tuple[float, float]:
    if expected.shape != got.shape:
        return math.inf, math.inf
    worst = (expected.double() - got.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return worst, worst / scale if scale else worst


def _kernel_text(kernel: tuple[int, ...]) -> str:
    return "×".join(map(str, kernel))


def _describe_spd(layer: SpaceToDepthConv) -> str:
    conv = layer.conv
    return (
        f"SPD b{_kernel_text(layer.block)} + conv k{_kernel_text(tuple(conv.kernel_size))} "
        f"{conv.in_channels}→{conv.out_channels}"
    )


def _describe_folded(folded: FoldedSpaceToDepthConv, layer: SpaceToDepthConv) -> str:
    conv = folded.conv
    full = tuple(b * k for b, k in zip(layer.block, layer.conv.kernel_size, strict=True))
    text = (
        f"conv k{_kernel_text(tuple(conv.kernel_size))} s{_kernel_text(tuple(conv.stride))} "
        f"{conv.in_channels}→{conv.out_channels}"
    )
    if conv.groups > 1:
        text += f" g{conv.groups}"
    if tuple(conv.kernel_size) != full:
        text += f" (zero taps trimmed from k{_kernel_text(full)})"
    return text
