"""`export`: a patched model as a deployable file (TorchScript, ONNX, torch.export), checked.

Every export has a dynamic batch and dynamic spatial sizes (the replacement layers compute
their padding from the input's shape, never from the example's), and is checked numerically
against eager PyTorch by running the *written file* (torch.jit.load, onnxruntime,
torch.export.load) at the example size and at a second, odd size with batch 2. The file is
written to a hidden temporary sibling and renamed into place only when both checks pass, so a
failed export leaves nothing behind.

    result = export("out/resnet50-spd", "onnx", fold_layers=True)  # a checkpoint directory
    result = export(model, "torchscript", "model.pt", example_input=torch.randn(1, 3, 224, 224))

With `fold_layers`, the replacement layers are first rewritten by `surgeon.fold` into the
formulations fastest on the backend the format is run with (`FOLD_BACKENDS`: ONNX files on
ONNX Runtime, ExportedPrograms under Inductor, TorchScript as eager PyTorch), timed there.
ONNX goes through PyTorch's TorchScript-based exporter (`dynamo=False`, see
`surgeon.backends.onnx_export`): it needs only onnx and onnxruntime, and with `dynamic_axes`
it keeps batch and spatial sizes symbolic through our layers' shape arithmetic. TorchScript is
scripted (`method="script"`), traced (`"trace"`), or scripted with tracing as the fallback
(`"auto"`, the default; the result says which ran).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from surgeon import __version__
from surgeon.backends import (
    BACKENDS,
    ONNX_OPSET,
    dynamic_axes_names,
    onnx_export,
    onnx_session,
)
from surgeon.checkpoint.atomic import temporary_file
from surgeon.errors import AnalysisError, Argument, OutputError, PatchError, UsageError
from surgeon.fold import Choice, FoldRecord, fold

__all__ = [
    "FOLD_BACKENDS",
    "FORMATS",
    "ExportResult",
    "NumericCheck",
    "check_sizes",
    "default_export_path",
    "export",
]

Format = Literal["torchscript", "onnx", "exported-program"]
FORMATS: tuple[str, ...] = ("torchscript", "onnx", "exported-program")
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx", "exported-program": ".pt2"}
FOLD_BACKENDS: dict[str, str] = {
    "torchscript": "eager",
    "onnx": "onnxruntime",
    "exported-program": "inductor",
}
"""The backend `fold_layers` times formulations on, per format: where such files are run
(ExportedPrograms are what AOTInductor and `torch.compile` deploy)."""
METADATA_FILE = "surgeon.json"  # the name of the metadata entry inside each exported file

# Relative to the eager output's largest magnitude: float32 kernels differ in summation order
# (oneDNN vs onnxruntime's MLAS), which moves results by ~1e-6 of their scale.
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class NumericCheck:
    """One comparison of the exported file against eager PyTorch."""

    input_shape: tuple[int, ...]
    max_abs_diff: float
    rel_diff: float


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote and how it was checked."""

    path: Path
    format: str
    method: str  # script | trace | torch.onnx (TorchScript-based, opset 17) | torch.export
    checks: tuple[NumericCheck, ...]
    bytes: int
    fold: FoldRecord | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what `surgeon export --json` prints."""
        return {
            "path": str(self.path),
            "format": self.format,
            "method": self.method,
            "bytes": self.bytes,
            "checks": [
                {
                    "input_shape": list(c.input_shape),
                    "max_abs_diff": c.max_abs_diff,
                    "rel_diff": c.rel_diff,
                }
                for c in self.checks
            ],
            "fold": self.fold.to_dict() if self.fold else None,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """One line: what was written, and the worst relative difference of the checks."""
        worst = max((c.rel_diff for c in self.checks), default=0.0)
        sizes = ", ".join("x".join(map(str, c.input_shape)) for c in self.checks)
        folded = ""
        if self.fold is not None:
            folded = (
                f", {self.fold.folded} of {len(self.fold.layers)} layers rewritten for "
                f"{self.fold.backend}"
            )
        return (
            f"wrote {self.path} ({self.format} via {self.method}, "
            f"{self.bytes / 1e6:.1f} MB{folded}); "
            f"matches eager PyTorch at {sizes} (max relative difference {worst:.1e})"
        )


def default_export_path(directory: str | Path, format: str, *, folded: bool = False) -> Path:
    """`DIR/model.pt|.onnx|.pt2` (`model-folded.*` with fold) inside a checkpoint directory."""
    _check_format(format)
    return Path(directory) / f"model{'-folded' if folded else ''}{SUFFIXES[format]}"


def check_sizes(example_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two input shapes an export is checked at: the example's, and batch 2 at an odd
    size about 3/4 of it per spatial dim (so batch and every spatial size differ)."""
    shape = tuple(int(s) for s in example_shape)
    second = (2, shape[1], *(max(3, (s * 3 // 4) | 1) for s in shape[2:]))
    if second[2:] == shape[2:]:
        second = (2, shape[1], *(s + 2 for s in shape[2:]))
    return shape, second


def export(
    source: nn.Module | str | Path,
    format: str,
    path: str | Path | None = None,
    *,
    example_input: Tensor | None = None,
    input_size: Sequence[int] | None = None,
    fold_layers: bool | Choice = False,
    fold_backend: str | None = None,
    interior_only: bool = False,
    method: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
) -> ExportResult:
    """Export a patched model to `format` at `path`, check the file, and say what was done.

    `source` is a checkpoint directory (rebuilt with `surgeon.load`; its manifest gives the
    example size) or an nn.Module (then pass `example_input`, or `input_size` as C×H×W). The
    model must take one tensor (N, C, *spatial). `fold_layers` rewrites the replacement layers
    first (`surgeon.fold`; True or "fastest": per layer, whichever form times fastest on
    `fold_backend`, by default `FOLD_BACKENDS[format]`; "folded": every SPD layer and blur +
    pointwise pair folded); `interior_only` allows the fold that is exact only away from the
    borders, and the file is then checked against the folded model. A module passed in is
    copied, never changed. `path` defaults to `default_export_path` for a directory. Raises
    UsageError (bad format or inputs), OutputError (path exists without `force`, or cannot be
    written), AnalysisError (the exporter failed) and PatchError (the file's outputs differ
    from eager PyTorch by more than `tolerance`, relative to the output's magnitude).
    """
    _check_format(format)
    if method not in ("auto", "script", "trace"):
        raise UsageError(f"torchscript method must be auto, script or trace, got {method!r}")
    if fold_backend is not None and fold_backend not in BACKENDS:
        raise UsageError(
            f"unknown fold backend {fold_backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    choose: Choice | None = None
    if fold_layers:
        choose = "fastest" if fold_layers is True else fold_layers
    if path is None:
        if not isinstance(source, (str, Path)):
            raise UsageError("pass a path to export an nn.Module to")
        path = default_export_path(source, format, folded=choose is not None)
    target = Path(os.path.abspath(path))
    _check_target(target, force=force)  # before any slow work
    model, example, name, info = _resolve_source(
        source, example_input, input_size, trust_import=trust_import, plugins=plugins
    )

    shapes = check_sizes(example.shape)
    generator = torch.Generator().manual_seed(0)
    inputs = [example] + [
        torch.randn(s, generator=generator).to(example.device, example.dtype) for s in shapes[1:]
    ]
    source_model, was_training = model, model.training
    model.eval()
    try:
        with torch.no_grad():
            references = [_leaves(model(x), name) for x in inputs]
        record: FoldRecord | None = None
        if choose is not None:
            if not isinstance(source, (str, Path)):
                model = copy.deepcopy(model)
            backend = fold_backend or FOLD_BACKENDS[format]
            model, record = fold(
                model, example, backend=backend, choose=choose, interior_only=interior_only
            )
            if any(layer.form == "interior" for layer in record.layers):
                # opted into a fold that changes the borders: the file must match the model
                # it was written from
                with torch.no_grad():
                    references = [_leaves(model(x), name) for x in inputs]
        metadata = {
            "surgeon": __version__,
            "format": format,
            "source": info,
            "input": {"example_shape": list(example.shape), "dynamic": dynamic_axes_names(example)},
            "fold": record.to_dict() if record else None,
        }
        writer = {"torchscript": _torchscript, "onnx": _onnx, "exported-program": _exported_program}
        with temporary_file(target) as tmp:
            method_used, notes, runner = writer[format](model, example, tmp, metadata, method, name)
            checks = tuple(
                _check(runner, x, expected, format, name, tolerance)
                for x, expected in zip(inputs, references, strict=True)
            )
            size = tmp.stat().st_size
            os.replace(tmp, target)
    finally:
        source_model.train(was_training)
    return ExportResult(Path(path), format, method_used, checks, size, record, tuple(notes))


# --------------------------------------------------------------------------- inputs


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")


def _resolve_source(
    source: nn.Module | str | Path,
    example_input: Tensor | None,
    input_size: Sequence[int] | None,
    *,
    trust_import: Collection[str],
    plugins: Collection[str],
) -> tuple[nn.Module, Tensor, str, dict[str, Any]]:
    """(model, example input, a name for messages, what to record about the source)."""
    if isinstance(source, nn.Module):
        name = type(source).__name__
        info: dict[str, Any] = {"module": f"{type(source).__module__}.{type(source).__qualname__}"}
        if example_input is None:
            if input_size is None:
                raise UsageError("pass example_input (or input_size) to export an nn.Module")
            example_input = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        return source, _one_image_tensor(example_input, name), name, info

    from surgeon.checkpoint.resolve import resolve_checkpoint
    from surgeon.models import example_inputs

    directory = Path(source)
    resolved = resolve_checkpoint(directory, trust_import=trust_import, plugins=plugins)
    model, spec = resolved.model, resolved.loaded.spec.text
    name = f"{spec} ({directory})"
    info = {"checkpoint": str(directory), "model": spec, "policy": resolved.policy}
    if example_input is None:
        size = tuple(input_size) if input_size else resolved.loaded.input_size
        task = resolved.loaded.task
        args = example_inputs(task, size)
        if len(args) != 1:
            raise UsageError(
                f"{name}: export supports models that take one image tensor, not {task} models"
            )
        example_input = args[0]
    return model, _one_image_tensor(example_input, name), name, info


def _one_image_tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() < 3 or not value.is_floating_point():
        raise UsageError(
            f"{name}: export supports models that take one floating-point tensor (N, C, *spatial); "
            f"got {type(value).__name__}{tuple(value.shape) if isinstance(value, Tensor) else ''}"
        )
    return value


# --------------------------------------------------------------------------- writers

# Each writer saves the model to `tmp` and returns (method, notes, a function that runs the
# saved file on one input and returns its output tensors in pytree-flattened order).
Runner = Callable[[Tensor], list[Tensor]]


def _torchscript(
    model: nn.Module, example: Tensor, tmp: Path, metadata: dict[str, Any], method: str, name: str
) -> tuple[str, list[str], Runner]:
    notes: list[str] = []
    scripted: torch.jit.ScriptModule | None = None
    used = method
    if method in ("auto", "script"):
        try:
            with _quiet():
                scripted = torch.jit.script(model)
            used = "script"
        except Exception as exc:
            if method == "script":
                raise AnalysisError(
                    f"scripting {name} failed: {_first_line(exc)}; try method='trace'"
                ) from exc
            notes.append(f"scripting failed ({_first_line(exc)}); traced instead")
    if scripted is None:
        used = "trace"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            try:
                scripted = torch.jit.trace(model, (example,), check_trace=False, strict=False)
            except Exception as exc:
                raise AnalysisError(f"tracing {name} failed: {_first_line(exc)}") from exc
        traced_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        if traced_warnings:
            notes.append(
                f"tracing warned {len(traced_warnings)}× (a Python value was frozen into the "
                f"graph), e.g. {_first_line(traced_warnings[0].message)}"
            )
    assert scripted is not None
    with _quiet():
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})
        loaded = torch.jit.load(str(tmp), map_location="cpu")

    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return _leaves(loaded(x), name)

    return used, notes, run


def _onnx(
    model: nn.Module, example: Tensor, tmp: Path, metadata: dict[str, Any], method: str, name: str
) -> tuple[str, list[str], Runner]:
    try:
        import onnxruntime  # noqa: F401 (checked before the slow export)
    except ImportError as exc:
        raise UsageError(
            "ONNX export is checked with onnxruntime: pip install onnx onnxruntime"
        ) from exc
    with torch.no_grad():
        outputs = _leaves(model(example), name)
    try:
        onnx_export(model, example, tmp, len(outputs))
    except Exception as exc:
        raise AnalysisError(f"ONNX export of {name} failed: {_first_line(exc)}") from exc
    _onnx_metadata(tmp, metadata)
    try:
        session = onnx_session(tmp)
    except Exception as exc:
        raise AnalysisError(
            f"onnxruntime cannot load the ONNX export of {name}: {_first_line(exc)}"
        ) from exc

    def run(x: Tensor) -> list[Tensor]:
        result = session.run(None, {"input": x.detach().cpu().numpy()})
        return [torch.from_numpy(r) for r in result]

    return f"torch.onnx (TorchScript-based, opset {ONNX_OPSET})", [], run


def _onnx_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store the metadata as an ONNX metadata_props entry (skipped without the onnx package)."""
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_FILE, json.dumps(metadata)
    onnx.save(proto, str(path))


def _exported_program(
    model: nn.Module, example: Tensor, tmp: Path, metadata: dict[str, Any], method: str, name: str
) -> tuple[str, list[str], Runner]:
    dynamic = torch.export.Dim.DYNAMIC
    spec = {0: dynamic, **{i: dynamic for i in range(2, example.dim())}}
    # torch.export specialises a dim of size 1 to a constant; trace with batch 2 so the batch
    # stays symbolic (the program still runs with batch 1).
    traced_input = (
        example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()
    )
    try:
        with _quiet():
            program = torch.export.export(model, (traced_input,), dynamic_shapes=(spec,))
    except Exception as exc:
        raise AnalysisError(f"torch.export of {name} failed: {_first_line(exc)}") from exc
    torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(metadata)})
    loaded = torch.export.load(tmp).module()

    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return _leaves(loaded(x), name)

    return "torch.export", [], run


# --------------------------------------------------------------------------- checks and files


def _check(
    run: Runner, x: Tensor, expected: list[Tensor], format: str, name: str, tolerance: float
) -> NumericCheck:
    shape_text = "x".join(map(str, x.shape))
    try:
        got = run(x)
    except Exception as exc:
        raise PatchError(
            f"the {format} export of {name} fails at input {shape_text}: {_first_line(exc)}"
        ) from exc
    if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in expected]:
        raise PatchError(
            f"the {format} export of {name} gives output shapes {[tuple(t.shape) for t in got]} "
            f"at input {shape_text}, eager PyTorch {[tuple(t.shape) for t in expected]}; "
            "nothing was written"
        )
    worst = scale = 0.0
    for a, b in zip(expected, got, strict=True):
        if a.is_floating_point() and a.numel():
            worst = max(worst, (a.double() - b.double().to(a.device)).abs().max().item())
            scale = max(scale, a.double().abs().max().item())
    rel = worst / scale if scale else worst
    if not rel <= tolerance:  # also catches NaN
        raise PatchError(
            f"the {format} export of {name} differs from eager PyTorch at input {shape_text}: "
            f"relative difference {rel:.1e} > {tolerance:.0e}; nothing was written"
        )
    return NumericCheck(tuple(x.shape), worst, rel)


def _leaves(output: Any, name: str) -> list[Tensor]:
    leaves, _ = tree_flatten(output)
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if not tensors:
        raise UsageError(f"{name} returns no tensors; nothing to export")
    return [t.detach() for t in tensors]


def _check_target(target: Path, *, force: bool) -> None:
    if target.is_dir():
        raise OutputError(f"{target} is a directory; pass a file path to export to")
    if target.exists() and not force:
        raise OutputError(f"{target} exists; pass ", Argument("force", True), " to replace it")
    if target.parent.exists() and not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: {target.parent} is not a directory")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporters warn about their own deprecation and about constants they fold; the
    # numeric checks are what tell the user whether the result is right.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(message: object) -> str:
    lines = str(message).strip().splitlines()
    line = lines[0] if lines else type(message).__name__
    return line if len(line) <= 200 else line[:197] + "..."
