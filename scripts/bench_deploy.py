"""Deployment benchmark: patched models against the original on the paths models are deployed
with, as latency ÷ MAC ratio, before and after `surgeon.fold` for that path.

    nice .venv/bin/python scripts/bench_deploy.py [--records DIR]   # full run: the record
    .venv/bin/python scripts/bench_deploy.py --quick   # tiny model and inputs, prints only
    .venv/bin/python scripts/bench_deploy.py --models resnet50 --paths onnxruntime --records /tmp/r

Paths: eager PyTorch, `torch.compile(model, dynamic=False)` (Inductor) and ONNX Runtime (CPU
provider, the same thread count, the file `surgeon.export` writes and checks), and with a CUDA
device CUDA graphs of the eager model (and TensorRT through ONNX Runtime's TensorRT provider
when it is installed); paths that cannot run here are listed as skipped with the reason.
Models: resnet50, mobilenet_v3_large, convnext_tiny and timm's resnet50d. Policies: every
built-in policy, read from the policy list at run time (new actions appear by themselves).
Batch 1 and 8, 3×224×224, float32, no_grad, one torch thread by default.

Replacement weights are dense: SPD kernels, transferred exactly, get small random values in
the taps the transfer leaves zero, as fine-tuning would give them (a fresh transfer folds back
into the original convolution and measures nothing). Each variant is timed interleaved with
the others of its model, batch and path; the best round sets the ratios (other processes only
ever add time; with one thread the clock is that thread's CPU time). Each row gives the
latency ratio to the original on the same path divided by the MAC ratio (target ≤ 1.1), for
the model as patched and after `fold(backend=path)` (what `surgeon export --format onnx
--fold` and `surgeon patch --fold --fold-for inductor` deploy). For every row above the target
at batch 8 the section shows a profile of that path (torch.profiler for eager and Inductor,
ONNX Runtime's own profiler), the patched model against the original by kind of operation and
by the operations that grew most. The ONNX Runtime formulations are compared per layer: the
fold records give every timed form, and SPD's SpaceToDepth operator is timed against the
Reshape/Transpose copy it replaces.

Writes its record, docs/records/bench/deploy.json (rows, profiles, fold choices, settings, load
averages and provenance); `make docs` renders the "## Deployment paths" section of
docs/benchmarks.md from it (scripts/bench_page.py's `render_deploy`).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import densify, interleaved, macs  # noqa: E402
from bench_layers import pin_allocator  # noqa: E402
from bench_page import BENCH_RECORDS, DEPLOY_BATCH, LATENCY_TARGET, save_section  # noqa: E402
from records import script_command  # noqa: E402

from surgeon.backends import compiled, onnx_export, onnx_session, race, runner  # noqa: E402
from surgeon.errors import SurgeonError  # noqa: E402
from surgeon.export import export  # noqa: E402
from surgeon.fold import FoldRecord, fold  # noqa: E402
from surgeon.layers import BlurPool, SpaceToDepthConv  # noqa: E402
from surgeon.layers.transfer import channel_major_kernel  # noqa: E402
from surgeon.models import load_model  # noqa: E402
from surgeon.patch import patch  # noqa: E402
from surgeon.policy_loader import list_builtin_policies  # noqa: E402

MODELS = ("resnet50", "mobilenet_v3_large", "convnext_tiny", "timm:resnet50d")
CPU_PATHS = ("eager", "inductor", "onnxruntime")
GPU_PATHS = ("cuda-graphs", "tensorrt")
TOP = 8  # operations listed per profile


# --------------------------------------------------------------------------- variants


def fold_units(model: nn.Module) -> bool:
    """Whether `fold` has anything to consider in `model` (SPD layers or BlurPools)."""
    return any(isinstance(m, (SpaceToDepthConv, BlurPool)) for m in model.modules())


def patched_models(
    name: str, policies: Sequence[str], x: torch.Tensor
) -> tuple[nn.Module, dict[str, tuple[nn.Module, int]]]:
    """The original model (seed 0) and {policy: (patched model with dense weights, sites)}."""
    torch.manual_seed(0)
    original = load_model(name, seed=0).model.eval()
    patched: dict[str, tuple[nn.Module, int]] = {}
    for policy in policies:
        model, report = patch(copy.deepcopy(original), policy, x[:1])
        model.eval()
        densify(model)
        patched[policy] = (model, report.patched)
    return original, patched


def folded_for(
    model: nn.Module, x: torch.Tensor, path: str, min_seconds: float
) -> tuple[nn.Module, FoldRecord]:
    """A copy of `model` folded for `path`, each unit in the form that timed fastest there."""
    backend = path if path in CPU_PATHS else "eager"
    return fold(copy.deepcopy(model), x, backend=backend, min_seconds=min_seconds)


# --------------------------------------------------------------------------- paths


def cpu_runner(
    path: str, model: nn.Module, x: torch.Tensor, workdir: Path, label: str
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """A call of `model` on `x` as `path` runs it, and what building it found out."""
    info: dict[str, Any] = {}
    if path == "eager":
        return lambda: model(x), info
    if path == "inductor":
        start = time.perf_counter()
        function = compiled(model, x)
        info["compile_s"] = time.perf_counter() - start
        return lambda: function(x), info
    target = workdir / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', label)}.onnx"
    start = time.perf_counter()
    result = export(model, "onnx", target, example_input=x, force=True)
    info["export_s"] = time.perf_counter() - start
    info["check_rel_diff"] = max(c.rel_diff for c in result.checks)
    info["onnx"] = str(target)
    session = onnx_session(target)
    feed = {"input": x.numpy()}
    return lambda: session.run(None, feed), info


def gpu_runner(path: str, model: nn.Module, x: torch.Tensor, workdir: Path, label: str) -> Any:
    """A replay of `model` on `x` on the GPU: a CUDA graph, or a TensorRT engine through ONNX
    Runtime's TensorRT provider."""
    device = torch.device("cuda")
    if path == "cuda-graphs":
        model = copy.deepcopy(model).to(device)
        static = x.to(device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static)
        return graph.replay
    import onnxruntime

    target = workdir / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', label)}-trt.onnx"
    onnx_export(model, x, target)
    session = onnxruntime.InferenceSession(
        str(target), providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    )
    feed = {"input": x.numpy()}
    return lambda: session.run(None, feed)


def gpu_skip_reason(path: str) -> str | None:
    """Why `path` cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if path == "tensorrt":
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed"
        if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu with TensorRT)"
    return None


def gpu_interleaved(calls: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, Any]:
    """{name: (best ms, median ms)} of interleaved replays, timed with CUDA events."""
    for call in calls.values():
        call()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


# --------------------------------------------------------------------------- profiles


def category(op: str, shapes: Sequence[Sequence[int]]) -> str:
    """A kind of operation, for comparing where time goes."""
    low = op.lower()
    if "compiledfxgraph" in low or "compiled" in low:
        return "Inductor's generated kernels"
    if "conv" in low:
        weight = shapes[1] if len(shapes) > 1 else ()
        depthwise = len(weight) >= 2 and weight[1] == 1
        return "depthwise convolution" if depthwise else "convolution"
    copies = ("pad", "copy", "cat", "spacetodepth", "transpose", "gather", "index", "slice")
    copies += ("concat", "reorder", "where", "clone", "contiguous", "reshape", "stack")
    if low == "if" or any(word in low for word in copies):
        return "copies, padding, rearrangement"
    if any(word in low for word in ("matmul", "addmm", "gemm", "linear")):
        return "matrix multiply"
    if "pool" in low:
        return "pooling"
    elementwise = ("norm", "relu", "swish", "sigmoid", "silu", "gelu", "add", "mul", "clip", "sum")
    if any(word in low for word in elementwise):
        return "normalisation, activation, elementwise"
    return "other"


def torch_profile(call: Callable[[], Any], steps: int = 3) -> dict[str, dict[str, Any]]:
    """{operation with its input shapes: {ms per call, category}} by torch.profiler (self CPU
    time: what the operation itself ran, its callees apart)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(steps):
            call()
    entries: dict[str, dict[str, Any]] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.self_cpu_time_total <= 0:
            continue
        shapes = [list(s) for s in (event.input_shapes or []) if s]
        key = f"{event.key} {shapes[0] if shapes else ''}".strip()
        entry = entries.setdefault(key, {"ms": 0.0, "category": category(event.key, shapes)})
        entry["ms"] += event.self_cpu_time_total / 1e3 / steps
    return entries


def ort_profile(onnx_path: str, x: torch.Tensor, workdir: Path, steps: int = 3) -> dict[str, Any]:
    """{operation: {ms per run, category}} from ONNX Runtime's profiler: one entry per node of
    the optimised graph (its type and name, which carries the module path)."""
    session = onnx_session(onnx_path, profile=str(workdir / "ort-profile"))
    feed = {"input": x.numpy()}
    for _ in range(steps + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    entries: dict[str, dict[str, Any]] = {}
    runs = steps + 1
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        shapes = [
            next(iter(item.values()))
            for item in event["args"].get("input_type_shape", [])
            if isinstance(item, dict) and item
        ]
        key = f"{op} {event['name'][: -len('_kernel_time')]}"
        entry = entries.setdefault(key, {"ms": 0.0, "category": category(op, shapes)})
        entry["ms"] += event["dur"] / 1e3 / runs
    return entries


def compare(original: Mapping[str, Any], patched: Mapping[str, Any]) -> dict[str, Any]:
    """Where the patched model's time goes against the original's: per category, and the
    operations that grew most."""
    categories: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for i, entries in enumerate((original, patched)):
        for entry in entries.values():
            categories[entry["category"]][i] += entry["ms"]
    grown = sorted(
        (
            (key, original.get(key, {}).get("ms", 0.0), entry["ms"])
            for key, entry in patched.items()
        ),
        key=lambda item: item[1] - item[2],
    )[:TOP]
    return {
        "categories": {name: list(pair) for name, pair in sorted(categories.items())},
        "grown": [list(item) for item in grown],
    }


# --------------------------------------------------------------------------- formulations


def spd_rearrangements(
    layers: Sequence[tuple[str, SpaceToDepthConv, tuple[int, ...]]], min_seconds: float
) -> list[dict[str, Any]]:
    """Per phase-major 2-d SPD layer shape: ONNX Runtime's SpaceToDepth operator against the
    Reshape/Transpose copy a channel-major twin exports as (the same outputs: its kernel is the
    same kernel in channel-major input order)."""
    rows = []
    seen = set()
    for name, layer, shape in layers:
        key = (shape, json.dumps(layer.config(), sort_keys=True))
        if key in seen or not layer.phase_major or layer.dims != 2:
            continue
        seen.add(key)
        twin = SpaceToDepthConv(**{**layer.config(), "order": "channel"})
        with torch.no_grad():
            twin.conv.weight.copy_(channel_major_kernel(layer.conv.weight, layer.block))
            if layer.conv.bias is not None:
                twin.conv.bias.copy_(layer.conv.bias)
        x = torch.randn(shape)
        calls = {
            "SpaceToDepth": runner(layer, x, "onnxruntime"),
            "Reshape/Transpose": runner(twin, x, "onnxruntime"),
        }
        rows.append({"layer": name, "shape": list(shape), "ms": race(calls, min_seconds)})
    return rows


# --------------------------------------------------------------------------- the run


def bench_model(
    name: str,
    policies: Sequence[str],
    batches: Sequence[int],
    paths: Sequence[str],
    size: int,
    rounds: int,
    workdir: Path,
    fold_seconds: float,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    folds: list[dict[str, Any]] = []
    spd_layers: list[tuple[str, SpaceToDepthConv, tuple[int, ...]]] = []
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=generator)
        original, patched = patched_models(name, policies, x)
        base_macs = macs(original, x)
        for path in paths:
            if path in GPU_PATHS and gpu_skip_reason(path):
                continue
            models: dict[str, nn.Module] = {"original": original}
            meta: dict[str, dict[str, Any]] = {"original": {"sites": 0, "macs": base_macs}}
            for policy, (model, sites) in patched.items():
                models[policy] = model
                meta[policy] = {"sites": sites, "macs": macs(model, x)}
                if fold_units(model) and path in CPU_PATHS:
                    print(f"[{name} x{batch} {path}] fold {policy}", file=sys.stderr, flush=True)
                    folded, record = folded_for(model, x, path, fold_seconds)
                    rewritten = f"{record.folded}/{len(record.layers)}"
                    if record.folded:
                        label = f"{policy}+fold"
                        models[label] = folded
                        meta[label] = {"sites": sites, "macs": macs(folded, x), "fold": rewritten}
                    else:  # nothing rewritten: the patched model is what this path deploys
                        meta[policy]["fold"] = rewritten
                    folds.append(
                        {
                            "model": name,
                            "batch": batch,
                            "path": path,
                            "policy": policy,
                            **record.to_dict(),
                        }
                    )
                    if path == "onnxruntime" and batch == max(batches):
                        spd_layers += [
                            (
                                f"{name} {layer.name}",
                                model.get_submodule(layer.name),
                                layer.input_shape,
                            )
                            for layer in record.layers
                            if layer.kind == "spd"
                        ]
            calls: dict[str, Callable[[], Any]] = {}
            for label, model in list(models.items()):
                print(f"[{name} x{batch} {path}] build {label}", file=sys.stderr, flush=True)
                try:
                    if path in CPU_PATHS:
                        calls[label], info = cpu_runner(
                            path, model, x, workdir, f"{name}-{batch}-{label}"
                        )
                        meta[label].update(info)
                    else:
                        calls[label] = gpu_runner(
                            path, model, x, workdir, f"{name}-{batch}-{label}"
                        )
                except SurgeonError as exc:  # surgeon refused it (an export check failed)
                    if label == "original":
                        raise
                    del models[label]
                    failures.append(
                        {
                            "model": name,
                            "batch": batch,
                            "path": path,
                            "variant": label,
                            "error": str(exc),
                        }
                    )
            print(f"[{name} x{batch} {path}] timing {len(calls)} variants", file=sys.stderr)
            if path in CPU_PATHS:
                with torch.no_grad():
                    timed = interleaved(calls, rounds)
            else:
                with torch.no_grad():
                    timed = gpu_interleaved(calls, rounds)
            best = timed["original"][0]
            for label in models:
                policy = label.removesuffix("+fold")
                mac_ratio = meta[label]["macs"] / base_macs
                row = {
                    "model": name,
                    "batch": batch,
                    "path": path,
                    "policy": policy,
                    "folded": label.endswith("+fold"),
                    "best": timed[label][0],
                    "median": timed[label][1],
                    "ratio": timed[label][0] / best,
                    "mac_ratio": mac_ratio,
                    "per_mac": timed[label][0] / best / mac_ratio,
                    **{k: v for k, v in meta[label].items() if k != "onnx"},
                }
                rows.append(row)
                print(f"[row] {json.dumps(row)}", file=sys.stderr, flush=True)
            if batch != DEPLOY_BATCH or path not in CPU_PATHS:
                continue
            for policy in patched:
                label = f"{policy}+fold" if f"{policy}+fold" in models else policy
                if label not in models:
                    continue
                deployed = next(
                    r
                    for r in rows[::-1]
                    if r["path"] == path
                    and r["policy"] == policy
                    and r["folded"] == (label != policy)
                )
                if deployed["per_mac"] <= LATENCY_TARGET:
                    continue
                print(f"[{name} x{batch} {path}] profile {label}", file=sys.stderr, flush=True)
                if path == "onnxruntime":
                    before = ort_profile(meta["original"]["onnx"], x, workdir)
                    after = ort_profile(meta[label]["onnx"], x, workdir)
                else:
                    with torch.no_grad():
                        before = torch_profile(calls["original"])
                        after = torch_profile(calls[label])
                comparison = compare(before, after)
                profiles.append(
                    {
                        "model": name,
                        "batch": batch,
                        "path": path,
                        "policy": policy,
                        "variant": label,
                        "per_mac": deployed["per_mac"],
                        "mac_ratio": deployed["mac_ratio"],
                        **comparison,
                    }
                )
    return {
        "rows": rows,
        "failures": failures,
        "profiles": profiles,
        "folds": folds,
        "spd_layers": spd_layers,
    }


# --------------------------------------------------------------------------- main


def _part(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", text):
        raise argparse.ArgumentTypeError(
            f"--part {text!r}: use lower-case letters, digits and underscores (e.g. mobilenet)"
        )
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, DEPLOY_BATCH])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=[*CPU_PATHS, *GPU_PATHS],
        help="default: all (--quick: eager and onnxruntime, Inductor's compiles being slow)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per variant")
    parser.add_argument(
        "--fold-seconds", type=float, default=0.05, help="fold's timing per form and layer"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch (and ORT) threads")
    parser.add_argument(
        "--records",
        type=Path,
        help="where the record goes (default docs/records/bench; --quick: nowhere)",
    )
    parser.add_argument(
        "--part",
        type=_part,
        help="write the record as deploy-PART.json, one part of the page's section (e.g. one "
        "model per core or per session); without it, deploy.json",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="checks that the script runs: resnet18 at 32×32, batch 8, the spd and antialias "
        "policies, 2 rounds; prints, never writes",
    )
    args = parser.parse_args(argv)
    policies = [name for name, _ in list_builtin_policies()]
    if args.quick:
        args.models, args.size, args.rounds = ["resnet18"], 32, 2
        args.batch = [DEPLOY_BATCH]
        args.paths = args.paths or ["eager", "onnxruntime"]
        args.fold_seconds = 0.001
        policies = ["spd", "antialias"]
    args.paths = args.paths or [*CPU_PATHS, *GPU_PATHS]
    if argv is None:
        pin_allocator()
    torch.set_num_threads(args.threads)
    before = list(os.getloadavg())
    started = time.perf_counter()
    results: dict[str, list[Any]] = collections.defaultdict(list)  # bench_model's keys
    skipped = [
        {"path": path, "reason": reason}
        for path in args.paths
        if path in GPU_PATHS and (reason := gpu_skip_reason(path))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result = bench_model(
                name,
                policies,
                args.batch,
                args.paths,
                args.size,
                args.rounds,
                Path(tmp),
                args.fold_seconds,
            )
            for key, values in result.items():
                results[key] += values
        print("[formulations] SpaceToDepth against Reshape/Transpose", file=sys.stderr)
        rearrangements = spd_rearrangements(results.pop("spd_layers"), args.fold_seconds)
    body = {
        **results,
        "spd_rearrangements": rearrangements,
        "skipped": skipped,
        "settings": {
            "models": args.models,
            "policies": policies,
            "batches": args.batch,
            "size": args.size,
            "paths": args.paths,
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "fold_seconds": args.fold_seconds,
            "seconds": time.perf_counter() - started,
        },
        "load": {"before": before, "after": list(os.getloadavg())},
    }
    print(f"[done] {body['settings']['seconds']:.0f} s", file=sys.stderr)
    records = args.records if args.records or args.quick else BENCH_RECORDS
    command = script_command(__file__, argv)
    name = f"deploy-{args.part}" if args.part else "deploy"
    print(save_section(name, body, command=command, directory=records, quick=args.quick))
    return body


if __name__ == "__main__":
    main()
