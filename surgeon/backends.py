"""Deployment backends: a module run as eager PyTorch, under `torch.compile` (Inductor) or in
ONNX Runtime, and candidates timed against each other on one of them.

`surgeon.fold` times each layer's exact formulations on the backend the model will run on;
`surgeon.export` writes ONNX files with the same exporter settings (`onnx_export`), so what is
timed is what is deployed. Every backend runs on the thread count torch has
(`torch.get_num_threads()`): ONNX Runtime gets it as its intra-op thread count.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from surgeon.errors import AnalysisError, UsageError

__all__ = [
    "BACKENDS",
    "ONNX_OPSET",
    "RECOMPILE_LIMIT",
    "Backend",
    "compiled",
    "dynamic_axes_names",
    "onnx_export",
    "onnx_session",
    "race",
    "runner",
]

Backend = Literal["eager", "inductor", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("eager", "inductor", "onnxruntime")
ONNX_OPSET = 17

RECOMPILE_LIMIT = 1024
"""Dynamo keeps at most `recompile_limit` compiled graphs per function (8 by default) and runs
it eagerly past that; every BlurPool or model variant compiled here shares its forward, so
compiling is done under this limit (`compiled`)."""


def dynamic_axes_names(example: Tensor) -> list[str]:
    """The names of an image tensor's dynamic axes: batch and every spatial dim."""
    spatial = (
        ["height", "width"] if example.dim() == 4 else [f"dim{i}" for i in range(2, example.dim())]
    )
    return ["batch", *spatial]


def onnx_export(
    model: nn.Module, example: Tensor, target: str | Path | io.BytesIO, output_count: int = 1
) -> list[str]:
    """Write `model` as ONNX to `target` with surgeon's exporter settings; the output names.

    PyTorch's TorchScript-based exporter (`dynamo=False`, opset `ONNX_OPSET`): it needs only
    onnx and onnxruntime, and with `dynamic_axes` on batch and spatial dims the layers' shape
    arithmetic stays in the graph. Warnings of the exporter are silenced (the numeric checks
    are what say whether a file is right).

    The shapes the exporter writes for the outputs of `If` branches (BlurPool's choice between
    reflect and replicate padding) come from one scripted function shared by every call, so
    different layers' branches would claim the same symbolic sizes, which ONNX Runtime then
    holds them to: those shapes are removed and left to ONNX Runtime's own inference."""
    try:
        import onnx
    except ImportError as exc:
        raise UsageError(
            "ONNX export needs the onnx package: pip install onnx onnxruntime"
        ) from exc
    dims = dynamic_axes_names(example)
    names = [f"output_{i}" if output_count > 1 else "output" for i in range(output_count)]
    axes: dict[str, dict[int, str]] = {
        "input": dict(zip([0, *range(2, example.dim())], dims, strict=True))
    }
    for name in names:
        axes[name] = {0: "batch", **{i: f"{name}_dim{i}" for i in range(2, example.dim())}}
    destination: Any = target if isinstance(target, io.BytesIO) else str(target)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            destination,
            dynamo=False,
            input_names=["input"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
        )
    proto = (
        onnx.load_from_string(target.getvalue())
        if isinstance(target, io.BytesIO)
        else onnx.load(str(target))
    )
    if _clear_branch_shapes(proto.graph):
        if isinstance(target, io.BytesIO):
            target.seek(0)
            target.truncate()
            target.write(proto.SerializeToString())
        else:
            onnx.save(proto, str(target))
    return names


def _clear_branch_shapes(graph: Any) -> bool:
    """Remove the shapes recorded for `If` outputs and inside branches; whether any were."""
    import onnx

    branch_outputs: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                branch = attribute.g
                for output in branch.output:
                    output.type.tensor_type.ClearField("shape")
                del branch.value_info[:]
                _clear_branch_shapes(branch)
                branch_outputs.update(node.output)
    kept = [info for info in graph.value_info if info.name not in branch_outputs]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return bool(branch_outputs)


def onnx_session(source: bytes | str | Path, *, profile: str | None = None) -> Any:
    """An ONNX Runtime CPU session on torch's thread count (sequential, errors-only logging).

    `profile` is a file prefix: ONNX Runtime then writes a per-node profile
    (`session.end_profiling()` returns its path)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise UsageError("ONNX files are run with onnxruntime: pip install onnxruntime") from exc
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # shape-inference chatter is not for the user
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    data = source if isinstance(source, bytes) else str(source)
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _recompile_limit() -> Iterator[None]:
    previous = torch.compiler.config.recompile_limit
    torch.compiler.config.recompile_limit = max(previous, RECOMPILE_LIMIT)
    try:
        yield
    finally:
        torch.compiler.config.recompile_limit = previous


def compiled(module: nn.Module, x: Tensor) -> Callable[[Tensor], Any]:
    """`torch.compile(module, dynamic=False)`, compiled for `x`'s shape by one call."""
    function = torch.compile(module, dynamic=False)
    with _recompile_limit(), torch.no_grad():
        function(x)
    return function


def runner(module: nn.Module, x: Tensor, backend: str) -> Callable[[], Tensor]:
    """A call of `module` on `x` as `backend` runs it (compiled or exported once here), under
    `torch.no_grad()`; it returns the first output as a tensor."""
    if backend == "eager":

        def eager() -> Tensor:
            with torch.no_grad():
                return _first(module(x))

        return eager
    if backend == "inductor":
        function = compiled(module, x)

        def inductor() -> Tensor:
            with torch.no_grad():
                return _first(function(x))

        return inductor
    if backend == "onnxruntime":
        buffer = io.BytesIO()
        try:
            onnx_export(module, x, buffer)
            session = onnx_session(buffer.getvalue())
        except UsageError:
            raise
        except Exception as exc:
            raise AnalysisError(
                f"ONNX export of {type(module).__name__} failed: {str(exc).splitlines()[0]}"
            ) from exc
        feed = {"input": x.detach().cpu().numpy()}

        def onnxruntime() -> Tensor:
            return torch.from_numpy(session.run(None, feed)[0])

        return onnxruntime
    raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _first(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def race(calls: Mapping[str, Callable[[], Any]], min_seconds: float = 0.05) -> dict[str, float]:
    """Milliseconds per call of each of `calls`: the best of interleaved rounds.

    Each round runs every call in turn (a few times when calls are short), for at least
    `min_seconds` per call and 7 rounds. The minimum, not the median: on a shared machine other
    processes only ever add time, so the fastest round is the closest to what each call costs
    on its own. With one torch thread the clock is that thread's CPU time (ONNX Runtime and
    Inductor's kernels then run on the calling thread too), which time spent descheduled
    cannot touch.
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    names: Sequence[str] = list(calls)
    for name in names:  # warm-up: allocator, oneDNN primitive caches, ONNX Runtime's arena
        calls[name]()
    once = math.inf
    for _ in range(3):  # the fastest of a few calls: one descheduled call must not set reps
        start = clock()
        calls[names[0]]()
        once = min(once, max(clock() - start, 1e-6))
    reps = max(1, min(50, int(0.01 / once)))
    rounds = max(7, int(min_seconds / (reps * once)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            start = clock()
            for _ in range(reps):
                calls[name]()
            times[name].append((clock() - start) / reps * 1e3)
    return {name: min(t) for name, t in times.items()}
