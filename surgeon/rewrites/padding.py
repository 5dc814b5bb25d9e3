"""`padding: circular`: every padded convolution and pool of the model pads circularly.

A policy-level setting (`Policy.padding`), applied by `patch` after the rules' actions, because
exact invariance to circular shifts (APS, Chaman & Dokmanić 2021) needs every layer of the
model to commute with them, not only the downsampling sites. Each change is an edit through
the editor (recorded, undone on failure):

- a convolution (`nn.Conv1d/2d/3d` whose forward is PyTorch's own) gets
  `padding_mode="circular"` (`SetAttrs`): PyTorch then pads with `F.pad(mode="circular")`
  before an unpadded convolution, for integer padding and for 'same' (its uneven split for
  even kernels included);
- a max or average pool gets padding 0 and a `StridePad(mode="circular")` in front of it with
  its former padding (`SetAttrs`, then `Wrap`): the windows at the border see the values from
  the other side instead of -inf (max pools) or zeros (average pools, whose every position is
  then a real value, so the divisor is the full window whatever `count_include_pad` says);
- a `StridePad` (the asymmetric padding `dilate` and `relocate` put in front of a layer) is
  replaced by a circular one with the same amounts.

Kept, each with its reason in the report: a layer whose forward pads on its own (timm's
dynamic 'same' `Conv2dSame` and `MaxPool2dSame`, weight-standardised convs), transposed convs
(PyTorch pads them with zeros only), ceil_mode pools (their last window overhangs the map),
pools that return indices, pools reached by several paths (one wrap would leave the other
unpadded), functional calls (`F.max_pool2d` in a forward), and a layer whose map at the
example input is smaller than its padding (PyTorch's circular padding wraps at most once).
Layers without padding need no change. The layers surgeon puts in pad their own way and are
left alone (APS and LPS wrap circularly; BlurPool per its `pad_mode`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from surgeon.edits import ModelEditor
from surgeon.layers.stride_pad import StridePad
from surgeon.sites import Site
from surgeon.trace import Analysis

__all__ = ["PaddingChange", "circular_padding", "map_sizes"]

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_MAX_POOLS: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass(frozen=True)
class PaddingChange:
    """One padded layer under `padding: circular`: what it padded with, and what it pads with
    now (`after` empty and `reason` said when it keeps its padding)."""

    layer: str  # module path (or `owner:node` for a functional call)
    op: str  # its type name
    before: str  # e.g. "zeros p1", "-inf p1", "constant (0, 1)"
    after: str  # e.g. "circular p1"; "" when kept
    reason: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.after)


Sizes = Mapping[nn.Module, tuple[int, ...]]


def map_sizes(analysis: Analysis) -> dict[nn.Module, tuple[int, ...]]:
    """The smallest spatial size of the map entering each conv and pool module the analysis saw
    called, by module (read before any edit: the rewrites move modules to other paths)."""
    out: dict[nn.Module, tuple[int, ...]] = {}
    kinds = _CONVS + _MAX_POOLS + _AVG_POOLS
    for path, records in analysis.calls.items():
        try:
            module = analysis.model.get_submodule(path)
        except AttributeError:
            continue
        shapes = [r.in_shapes[0] for r in records if r.in_shapes and len(r.in_shapes[0]) > 2]
        if isinstance(module, kinds) and shapes:
            out[module] = tuple(min(dims) for dims in zip(*(s[2:] for s in shapes), strict=False))
    return out


def _too_small(pads: Sequence[int], size: tuple[int, ...] | None) -> str:
    """Why PyTorch cannot pad a map of `size` circularly by `pads` (per dim), or ""."""
    if (
        size is None
        or len(size) != len(pads)
        or all(p <= n for p, n in zip(pads, size, strict=True))
    ):
        return ""
    return (
        f"its map ({'×'.join(map(str, size))} at the example input) is smaller than its padding: "
        "PyTorch's circular padding wraps around at most once"
    )


def _base(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> type[nn.Module] | None:
    return next((b for b in bases if isinstance(module, b)), None)


def _amounts(value: Any, dims: int) -> tuple[int, ...]:
    return (
        tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims
    )


def _text(amounts: Sequence[int]) -> str:
    return str(amounts[0]) if len(set(amounts)) == 1 else "×".join(map(str, amounts))


def _conv(
    editor: ModelEditor,
    path: str,
    conv: nn.Module,
    base: type[nn.Module],
    size: tuple[int, ...] | None,
) -> PaddingChange | None:
    kernel: tuple[int, ...] = conv.kernel_size  # type: ignore[assignment]
    dilation: tuple[int, ...] = conv.dilation  # type: ignore[assignment]
    padding: Any = conv.padding
    mode = str(conv.padding_mode)
    shown: str
    if isinstance(padding, str):
        spans = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        widest = [span - span // 2 if padding == "same" else 0 for span in spans]
        padded = any(widest)
        shown = padding
    else:
        widest = list(_amounts(padding, len(kernel)))
        padded = any(widest)
        shown = _text(widest)
    if not padded or mode == "circular":
        return None
    before = f"{mode} p{shown}"
    name = type(conv).__name__
    if type(conv).forward is not base.forward:
        return PaddingChange(path, name, before, "", "pads in its own forward (not padding_mode)")
    small = _too_small(widest, size)
    if small:
        return PaddingChange(path, name, before, "", small)
    editor.set_attrs(path, padding_mode="circular")
    return PaddingChange(path, name, before, f"circular p{shown}")


def _pool(
    editor: ModelEditor,
    path: str,
    pool: nn.Module,
    base: type[nn.Module],
    paths: int,
    size: tuple[int, ...] | None,
) -> PaddingChange | None:
    dims = int(base.__name__[-2])
    attrs = vars(pool)
    padding = attrs.get("padding", 0)
    name = type(pool).__name__
    if isinstance(padding, str):  # timm's 'same' pools keep it as a string and pad in forward
        return PaddingChange(path, name, f"zeros p{padding}", "", "pads in its own forward")
    amounts = _amounts(padding, dims)
    if not any(amounts):
        return None
    is_max = base in _MAX_POOLS
    fill = "-inf" if is_max else "zeros" if attrs.get("count_include_pad", True) else "uncounted"
    before = f"{fill} p{_text(amounts)}"
    reason = ""
    if type(pool).forward is not base.forward:
        reason = "pads in its own forward"
    elif attrs.get("ceil_mode", False):
        reason = "ceil_mode: its last window overhangs the map"
    elif attrs.get("return_indices", False):
        reason = "returns indices, which a pad in front would shift"
    elif paths > 1:
        reason = f"the same module is reached by {paths} paths; one wrap would miss the others"
    else:
        reason = _too_small(amounts, size)
    if reason:
        return PaddingChange(path, name, before, "", reason)
    editor.set_attrs(path, padding=(0,) * dims)
    editor.wrap(path, before=[StridePad([(p, p) for p in amounts], "circular")])
    return PaddingChange(path, name, before, f"circular p{_text(amounts)}")


def _stride_pad(editor: ModelEditor, path: str, pad: StridePad) -> PaddingChange | None:
    if pad.mode == "circular" or not any(v for pair in pad.pad for v in pair):
        return None
    fill = pad.mode if pad.mode != "constant" else f"constant {pad.value:g}"
    amounts = ", ".join(f"{low}+{high}" for low, high in pad.pad)
    editor.replace(path, StridePad([list(pair) for pair in pad.pad], "circular"))
    return PaddingChange(path, "StridePad", f"{fill} ({amounts})", f"circular ({amounts})")


def circular_padding(
    editor: ModelEditor, functional: Sequence[Site] = (), sizes: Sizes | None = None
) -> tuple[PaddingChange, ...]:
    """Make every padded conv and pool of `editor.model` pad circularly, through the editor;
    one `PaddingChange` per padded layer (changed or kept with its reason), in module order.
    `functional` are the functional sites the patch left as calls: reported as kept; `sizes`
    (`map_sizes` of the analysis) keeps the layers whose map is smaller than their padding."""
    sizes = sizes or {}
    model = editor.model
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    found: list[tuple[str, nn.Module]] = []
    ours: list[str] = []  # surgeon's layers: their insides pad as the layer decides
    for path, module in model.named_modules():
        if any(path.startswith(f"{p}.") for p in ours):
            continue
        if type(module).__module__.startswith("surgeon.layers"):
            ours.append(path)
            if isinstance(module, StridePad):
                found.append((path, module))
            continue
        found.append((path, module))
    changes: list[PaddingChange] = []
    for path, module in found:
        change: PaddingChange | None = None
        if isinstance(module, StridePad):
            change = _stride_pad(editor, path, module)
        elif (conv := _base(module, _CONVS)) is not None:
            change = _conv(editor, path, module, conv, sizes.get(module))
        elif (pool := _base(module, _MAX_POOLS + _AVG_POOLS)) is not None:
            change = _pool(editor, path, module, pool, counts[id(module)], sizes.get(module))
        elif isinstance(module, _TRANSPOSED):
            amounts = _amounts(module.padding, len(module.kernel_size))  # type: ignore[arg-type]
            if any(amounts):
                change = PaddingChange(
                    path,
                    type(module).__name__,
                    f"zeros p{_text(amounts)}",
                    "",
                    "transposed convolutions pad with zeros only",
                )
        if change is not None:
            changes.append(change)
    for site in functional:
        amounts = site.padding if not isinstance(site.padding, str) else ()
        if site.padding == "same" or any(amounts):
            shown = site.padding if isinstance(site.padding, str) else _text(amounts)
            fill = "-inf" if site.op == "max_pool" else "zeros"
            changes.append(
                PaddingChange(
                    site.name,
                    f"F.{site.type_name}",
                    f"{fill} p{shown}",
                    "",
                    "a functional call in its owner's forward",
                )
            )
    return tuple(changes)
