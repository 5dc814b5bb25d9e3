"""Deployment benchmarks: patched vs original latency, CLI wall time, patch time vs graph size,
checkpoint load time.

    python scripts/bench.py                        # every part, one record per part
    python scripts/bench.py --only latency --models resnet50
    python scripts/bench.py --quick                # tiny models and inputs: prints, writes nothing
    python scripts/bench.py --only load --quick    # smoke run (resnet18)

Each part writes its record, docs/records/bench/<part>.json (the measurement, its settings and
provenance), replacing that part's previous record; `make docs` renders docs/benchmarks.md
from the records. Timings are interleaved across the variants compared, and the best of the
rounds is used for ratios: on a shared machine other processes only ever add time. Nothing
here is asserted.

(a) latency: resnet50, mobilenet_v3_large and convnext_tiny, original vs patched with each
    built-in policy, batch 1 and 8, 224×224, float32, no_grad, eager and folded (`surgeon.fold`,
    per layer the faster form), beside the ratio of their MACs: the compute-bound expectation.
    SPD kernels get small random values in the taps an exact transfer leaves zero, as after
    fine-tuning, so that folding cannot simply trim them away. Latency and scaling run with
    glibc's allocator pinned as in scripts/bench_layers.py (the script re-runs itself so);
    the CLI processes get glibc's defaults, as a user's would.
(b) cli: whole-process wall time of `surgeon patch resnet50 --policy spd --out DIR` vs a Python
    process that only imports torchvision and builds resnet50, both exiting the way the
    `surgeon` script does (`os._exit` after flushing, the same garbage-collector threshold),
    with a phase breakdown and, for context, the build-only process exiting normally.
(c) scaling: `patch(model, "spd")` time against traced-graph size for resnet18 → 152.
(d) load: `surgeon.load` of a resnet50 SPD checkpoint (format version 2: the recorded edits
    applied, no tracing or forward pass) against building resnet50 and reading the same
    safetensors file into it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_layers import ALLOCATOR, pin_allocator  # noqa: E402
from bench_page import BENCH_RECORDS, save_section  # noqa: E402
from records import script_command  # noqa: E402

from surgeon.cli import GC_THRESHOLD  # noqa: E402
from surgeon.fold import fold  # noqa: E402
from surgeon.layers.spd import SpaceToDepthConv  # noqa: E402
from surgeon.models import example_inputs, load_model  # noqa: E402
from surgeon.patch import patch  # noqa: E402
from surgeon.policy_loader import list_builtin_policies  # noqa: E402

PARTS = ("latency", "cli", "scaling", "load")
LATENCY_MODELS = ("resnet50", "mobilenet_v3_large", "convnext_tiny")
SCALING_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _load() -> list[float]:
    return list(os.getloadavg())


# --------------------------------------------------------------------------- (a) latency


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def densify(model: nn.Module) -> None:
    """Give SPD kernels non-zero values everywhere, as fine-tuning would."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SpaceToDepthConv):
                weight = module.conv.weight
                scale = weight.abs().max().clamp_min(1e-3) * 0.01
                weight.add_(torch.randn(weight.shape, generator=generator) * scale)


def interleaved(
    variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3
) -> dict[str, tuple[float, float]]:
    """{name: (best ms, median ms)}, each round running every variant once in turn.

    With one torch thread the clock is the thread's CPU time: time spent descheduled by other
    processes on a shared machine is not counted, so ratios stay meaningful under load.
    """
    clock = _clock()
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = clock()
            run()
            times[name].append((clock() - start) * 1e3)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def _clock() -> Callable[[], float]:
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def bench_latency(
    models: Sequence[str], policies: Sequence[str], rounds: int, batch: int, size: int = 224
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name in models:
        torch.manual_seed(0)
        original = load_model(name).model.eval()
        base_macs = macs(original, x)
        variants: dict[str, nn.Module] = {"original": original}
        info: dict[str, dict[str, Any]] = {}
        for policy in policies:
            model, report = patch(copy.deepcopy(original), policy, x)
            model.eval()
            densify(model)
            variants[policy] = model
            info[policy] = {"patched": report.patched, "macs": macs(model, x)}
            if any(isinstance(m, SpaceToDepthConv) for m in model.modules()):
                folded, record = fold(copy.deepcopy(model), x, choose="fastest")
                variants[f"{policy}+fold"] = folded.eval()
                info[policy]["fold"] = f"{record.folded}/{len(record.layers)}"
                info[policy]["folded_macs"] = macs(folded, x)
        print(f"[latency] timing {name} x{batch}: {', '.join(variants)}", file=sys.stderr)
        with torch.no_grad():
            timed = interleaved({k: functools.partial(m, x) for k, m in variants.items()}, rounds)
        best_original = timed["original"][0]
        rows.append(
            {
                "model": name,
                "batch": batch,
                "size": size,
                "policy": "original",
                "patched": 0,
                "macs": base_macs,
                "best": best_original,
                "median": timed["original"][1],
            }
        )
        for policy in policies:
            row: dict[str, Any] = {
                "model": name,
                "batch": batch,
                "size": size,
                "policy": policy,
                "patched": info[policy]["patched"],
                "macs": info[policy]["macs"],
                "mac_ratio": info[policy]["macs"] / base_macs,
                "best": timed[policy][0],
                "median": timed[policy][1],
                "ratio": timed[policy][0] / best_original,
            }
            if f"{policy}+fold" in timed:
                row["fold"] = info[policy]["fold"]
                row["folded_mac_ratio"] = info[policy]["folded_macs"] / base_macs
                row["folded_best"] = timed[f"{policy}+fold"][0]
                row["folded_ratio"] = timed[f"{policy}+fold"][0] / best_original
            rows.append(row)
            print(f"[latency] {json.dumps(row)}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- (b) CLI

_PHASES = r"""
import gc, json, sys, tempfile, time
gc.set_threshold(GC_THRESHOLD)  # as the `surgeon` script sets it
t0 = time.process_time()
import torch, torchvision
t1 = time.process_time()
import surgeon.cli, surgeon.api, surgeon.patch, surgeon.report, surgeon.models
t2 = time.process_time()
from surgeon.models import load_model, example_inputs
loaded = load_model("resnet50")
args = example_inputs(loaded.task, loaded.input_size)
t3 = time.process_time()
from surgeon.patch import patch, resolve_policy
policy = resolve_policy("spd")
model, report = patch(loaded.model, policy, args, model_name="resnet50")
t4 = time.process_time()
import io
from rich.console import Console
from surgeon.report import render_patch
render_patch(report, Console(file=io.StringIO(), width=160))
t5 = time.process_time()
from surgeon.api import save
with tempfile.TemporaryDirectory() as d:
    save(d + "/out", model, loaded, report, policy.to_dict())
t6 = time.process_time()
print(json.dumps({"_timm": "timm" in sys.modules, "import torch+torchvision": t1 - t0,
    "import surgeon": t2 - t1,
    "build resnet50": t3 - t2, "patch (trace, scan, rewrite, verify)": t4 - t3,
    "render report": t5 - t4, "save checkpoint": t6 - t5}))
"""


def like_surgeon(code: str) -> str:
    """A `python -c` program that runs `code` the way the `surgeon` script runs a command:
    cyclic garbage collected as rarely, and an exit without the interpreter's teardown
    (`os._exit` once the standard streams are flushed), so that a baseline process and
    `surgeon` exit alike."""
    return (
        f"import gc, os, sys\ngc.set_threshold({GC_THRESHOLD})\n{code}\n"
        "sys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)\n"
    )


BUILD = "import torchvision\ntorchvision.models.resnet50()"


def cli_commands(out: str) -> dict[str, list[str]]:
    """The processes the CLI benchmark times, by row name; the baselines exit as `surgeon`
    does, and one more builds the model and exits normally, to show what teardown costs."""
    surgeon = Path(sys.executable).parent / "surgeon"
    return {
        "build only": [sys.executable, "-c", like_surgeon(BUILD)],
        "surgeon patch": [str(surgeon), "patch", "resnet50", "--policy", "spd", "--out", out],
        "import torch": [sys.executable, "-c", like_surgeon("import torch")],
        "build only, interpreter teardown": [sys.executable, "-c", BUILD],
    }


def bench_cli(repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        commands = cli_commands(f"{tmp}/r50-spd")
        commands["surgeon patch"].append("--force")
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        # Same thread count as the rest of the run: idle OpenMP threads spin-wait, which on an
        # oversubscribed machine doubles a process's CPU time without doing any work.
        # ... and glibc's default allocator settings: this is what a user's process gets
        env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR}
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        for _ in range(repeats):
            for name, command in commands.items():
                start, cpu_start = time.perf_counter(), _children_cpu()
                subprocess.run(
                    command,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                )
                walls[name].append(time.perf_counter() - start)
                cpus[name].append(_children_cpu() - cpu_start)
                print(
                    f"[cli] {name}: {walls[name][-1]:.2f} s, CPU {cpus[name][-1]:.2f} s",
                    file=sys.stderr,
                )
    phases: list[dict[str, float]] = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _PHASES.replace("GC_THRESHOLD", str(GC_THRESHOLD))],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        phases.append(json.loads(out.stdout.strip().splitlines()[-1]))
    timm_imported = any(p.pop("_timm") for p in phases)
    best_phases = {k: min(p[k] for p in phases) for k in phases[0]}
    return {
        "walls": {k: [min(v), statistics.median(v)] for k, v in walls.items()},
        "cpus": {k: [min(v), statistics.median(v)] for k, v in cpus.items()},
        "phases": best_phases,
        "timm_imported": timm_imported,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- (d) load


def bench_load(model_name: str, repeats: int) -> dict[str, Any]:
    """`surgeon.load` of MODEL-spd against building MODEL and reading its safetensors, in one
    warm process, interleaved: CPU seconds per run."""
    import safetensors.torch
    import torchvision

    import surgeon

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / f"{model_name}-spd"
        loaded = load_model(model_name)
        args = example_inputs(loaded.task, loaded.input_size)
        model, report = patch(loaded.model, "spd", args, model_name=model_name)
        surgeon.save(directory, model, loaded, report, "spd")
        weights = directory / "model.safetensors"

        def baseline() -> None:
            built = torchvision.models.get_model(model_name)
            built.load_state_dict(safetensors.torch.load_file(weights), strict=False)

        def load() -> None:
            surgeon.load(directory)

        runs: dict[str, list[float]] = {"build + read safetensors": [], "surgeon.load": []}
        for _ in range(repeats):
            for name, run in (("build + read safetensors", baseline), ("surgeon.load", load)):
                start = time.process_time()
                run()
                runs[name].append(time.process_time() - start)
                print(f"[load] {name}: {runs[name][-1]:.2f} s CPU", file=sys.stderr)
    return {name: [min(v), statistics.median(v)] for name, v in runs.items()}


# --------------------------------------------------------------------------- (c) scaling


def bench_scaling(models: Sequence[str], repeats: int, size: int) -> list[dict[str, Any]]:
    rows = []
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name in models:
        torch.manual_seed(0)
        original = load_model(name).model.eval()
        nodes = len(torch.fx.symbolic_trace(original).graph.nodes)
        times = []
        for _ in range(repeats):
            model = copy.deepcopy(original)
            clock = _clock()
            start = clock()
            patch(model, "spd", x)
            times.append(clock() - start)
        rows.append(
            {"model": name, "nodes": nodes, "best": min(times), "median": statistics.median(times)}
        )
        print(f"[scaling] {json.dumps(rows[-1])}", file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, action="append")
    parser.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds per variant")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="latency batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="CLI and scaling repeats")
    parser.add_argument("--scaling-size", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for latency and scaling (1: steadiest on a shared machine)",
    )
    parser.add_argument(
        "--records",
        type=Path,
        help="where the records go (default docs/records/bench; --quick: nowhere)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="checks that the script runs: resnet18 at 64×64, 2 rounds, 1 repeat, scaling over "
        "resnet18/34 at 32×32, the load benchmark on resnet18; its numbers mean nothing",
    )
    args = parser.parse_args(argv)
    latency_size, load_model_name = 224, "resnet50"
    scaling_models: Sequence[str] = SCALING_MODELS
    if args.quick:
        args.models, args.batch, args.rounds, args.repeats = ["resnet18"], [1], 2, 1
        args.scaling_size, load_model_name = 32, "resnet18"
        latency_size, scaling_models = 64, SCALING_MODELS[:2]
    records = args.records if args.records or args.quick else BENCH_RECORDS
    command = script_command(__file__, argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    pinned = all(os.environ.get(k) == v for k, v in ALLOCATOR.items())
    for part in args.only or PARTS:
        before = _load()
        body: dict[str, Any]
        if part == "latency":
            policies = [name for name, _ in list_builtin_policies()]
            rows = [
                row
                for batch in args.batch
                for row in bench_latency(args.models, policies, args.rounds, batch, latency_size)
            ]
            settings = {"rounds": args.rounds, "size": latency_size, "allocator_pinned": pinned}
            body = {"rows": rows, "settings": settings}
        elif part == "cli":
            body = {**bench_cli(args.repeats), "settings": {"repeats": args.repeats}}
        elif part == "scaling":
            rows = bench_scaling(scaling_models, args.repeats, args.scaling_size)
            settings = {"repeats": args.repeats, "size": args.scaling_size}
            body = {"rows": rows, "settings": {**settings, "allocator_pinned": pinned}}
        else:
            repeats = 2 if args.quick else args.repeats
            body = {
                "model": load_model_name,
                "runs": bench_load(load_model_name, repeats),
                "settings": {"repeats": repeats},
            }
        body["settings"]["threads"] = torch.get_num_threads()
        body["load"] = {"before": before, "after": _load()}
        print(save_section(part, body, command=command, directory=records, quick=args.quick))


if __name__ == "__main__":
    if "--only" not in sys.argv or any(p in sys.argv for p in ("latency", "scaling")):
        pin_allocator()  # latency and scaling time with the allocator pinned
    main()
