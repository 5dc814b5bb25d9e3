"""CUDA checks of surgeon's layers and patched models: correctness against the CPU, and speed
against the same reference formulations as scripts/bench_layers.py and the original models.

    python scripts/bench_cuda.py [--rounds 50] [--records DIR]

Needs a CUDA device; nothing in the test suite does. Writes one record,
docs/records/bench/cuda.json (naming the card, with its provenance); `make docs` renders the
"CUDA" section of docs/benchmarks.md from it. Correctness runs with TF32 off, so CUDA and CPU
are both float32 throughout; timing runs with PyTorch's defaults (cuDNN convolutions may use TF32).
Times come from CUDA events: the median of `--rounds` interleaved rounds for the layers, the
best for the models (as scripts/bench.py does on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import LATENCY_MODELS, densify, macs  # noqa: E402
from bench_layers import (  # noqa: E402
    BLUR_SHAPES,
    LAYOUTS,
    SPD_ORDERS,
    SPD_SHAPES,
    blur_candidates,
    explicit_phase_major,
    interleaved,
    slicing_cat,
    slicing_stack,
)
from bench_page import BENCH_RECORDS, save_section  # noqa: E402
from records import script_command  # noqa: E402

from surgeon.layers import BlurPool, SpaceToDepthConv, space_to_depth  # noqa: E402
from surgeon.models import load_model  # noqa: E402
from surgeon.patch import patch  # noqa: E402
from surgeon.policy_loader import list_builtin_policies  # noqa: E402

Candidate = Callable[[torch.Tensor], Any]


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """float32 matrix products and convolutions on CUDA, as on the CPU, inside the block."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cuda_ms(candidate: Candidate, x: Any) -> float:
    """Milliseconds of one call between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    candidate(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def cuda_time(candidates: dict[str, Candidate], x: Any, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call from CUDA events, `rounds` interleaved rounds after 5 warm-ups."""
    return interleaved(candidates, x, rounds, measure=cuda_ms, warmup=5)


# --------------------------------------------------------------------------- correctness


def layer_errors() -> list[tuple[str, float]]:
    """Largest |CUDA - CPU| per layer case, float32 on both (TF32 off)."""
    rows: list[tuple[str, float]] = []
    generator = torch.Generator().manual_seed(0)
    convs = {
        "SPD-Conv of 3x3 s2 p1 conv, 13x11 input": (nn.Conv2d(16, 24, 3, 2, 1), (2, 16, 13, 11)),
        "SPD-Conv of 1x1 s2 conv": (nn.Conv2d(32, 64, 1, 2), (2, 32, 14, 14)),
        "SPD-Conv of 7x7 s2 p3 stem": (nn.Conv2d(3, 16, 7, 2, 3), (2, 3, 33, 31)),
        "SPD-Conv of depthwise 5x5 s2": (nn.Conv2d(24, 24, 5, 2, 2, groups=24), (2, 24, 20, 20)),
    }
    for name, (conv, shape) in convs.items():
        layer = SpaceToDepthConv.from_conv(conv)[0].eval()
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = layer(x)
            got = layer.cuda()(x.cuda()).cpu()
            original = conv(x)
        rows.append((name, float((got - expected).abs().max())))
        rows.append((f"{name}: CUDA vs the original conv (exact transfer)", _gap(got, original)))
    for filter_size, pad_mode in ((3, "reflect"), (4, "reflect"), (5, "zero"), (4, "replicate")):
        blur = BlurPool(16, filter_size=filter_size, pad_mode=pad_mode)
        for layout, memory_format in LAYOUTS.items():
            x = torch.randn(2, 16, 29, 30, generator=generator).contiguous(
                memory_format=memory_format
            )
            with torch.no_grad():
                expected = blur(x)
                got = blur.cuda()(x.cuda()).cpu()
            blur.cpu()
            rows.append((f"BlurPool f={filter_size} {pad_mode}, {layout}", _gap(got, expected)))
    for order in ("phase", "channel"):
        x = torch.randn(2, 8, 12, 10, generator=generator)
        got = space_to_depth(x.cuda(), (2, 2), order).cpu()
        rows.append((f"space_to_depth ({order})", _gap(got, space_to_depth(x, (2, 2), order))))
    return rows


def _gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max())


# --------------------------------------------------------------------------- layers


def bench_layers(rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for op, order in SPD_ORDERS.items():
        for shape in SPD_SHAPES:
            for layout, memory_format in LAYOUTS.items():
                x = torch.randn(shape, device="cuda").contiguous(memory_format=memory_format)
                ours: Candidate = functools.partial(space_to_depth, block=(2, 2), order=order)
                expected = explicit_phase_major(x) if order == "phase" else F.pixel_unshuffle(x, 2)
                if not torch.equal(ours(x), expected):
                    raise AssertionError(f"{op} is not the permutation on CUDA {shape} {layout}")
                candidates: dict[str, Candidate] = {
                    "surgeon": ours,
                    "slicing + cat (SPD-Conv)": slicing_cat,
                    "F.pixel_unshuffle": lambda t: F.pixel_unshuffle(t, 2),
                    "x.clone() (copy floor)": lambda t: t.clone(),
                }
                if order == "channel":
                    candidates["slicing + stack (this order)"] = slicing_stack
                rows += _layer_rows(op, shape, layout, cuda_time(candidates, x, rounds))
    for shape in BLUR_SHAPES:
        for layout, memory_format in LAYOUTS.items():
            x = torch.randn(shape, device="cuda").contiguous(memory_format=memory_format)
            found = blur_candidates(shape[1], 4, device="cuda")
            candidates = {
                "surgeon" if name == "surgeon BlurPool" else name: run
                for name, (run, _, _) in found.items()
            }
            with torch.no_grad():
                rows += _layer_rows("BlurPool f=4", shape, layout, cuda_time(candidates, x, rounds))
    return rows


def _layer_rows(
    op: str, shape: tuple[int, ...], layout: str, samples: dict[str, list[float]]
) -> list[dict[str, Any]]:
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return [
        {
            "op": op,
            "shape": shape,
            "layout": layout,
            "name": name,
            "ms": ms,
            "vs": ms / medians["surgeon"],
        }
        for name, ms in medians.items()
    ]


# --------------------------------------------------------------------------- models


def bench_models(batches: list[int], rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    policies = [name for name, _ in list_builtin_policies()]
    for name in LATENCY_MODELS:
        torch.manual_seed(0)
        original = load_model(name).model.eval()
        probe = torch.randn(1, 3, 224, 224)
        variants: dict[str, nn.Module] = {"original": original}
        errors: dict[str, float] = {}
        for policy in policies:
            model, report = patch(copy.deepcopy(original), policy, probe)
            if not report.patched:
                continue
            densify(model)
            variants[policy] = model.eval()
        model_macs = {policy: macs(model, probe) for policy, model in variants.items()}
        base_macs = model_macs["original"]
        for policy, model in variants.items():
            with torch.no_grad(), tf32_off():
                expected = model(probe)
                got = model.cuda()(probe.cuda()).cpu()
            errors[policy] = _gap(got, expected) / float(expected.abs().max())
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, device="cuda")
            with torch.no_grad():
                samples = cuda_time(dict(variants), x, rounds)
            best = {p: min(t) for p, t in samples.items()}
            for policy in variants:
                ratio = model_macs[policy] / base_macs
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "policy": policy,
                        "ms": best[policy],
                        "ratio": best[policy] / best["original"],
                        "mac_ratio": ratio,
                        "per_mac": best[policy] / best["original"] / ratio,
                        "error": errors[policy],
                    }
                )
        for model in variants.values():
            model.cpu()
        torch.cuda.empty_cache()
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--records", type=Path, default=BENCH_RECORDS, help="where the record goes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device; this machine has none")
    failures: list[str] = []
    errors: list[tuple[str, float]] = []
    layers: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    # one CUDA run is all there may be: a part that fails is recorded and the rest goes on
    try:
        with tf32_off():
            errors = layer_errors()
    except Exception as exc:
        failures.append(f"correctness: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    try:
        layers = bench_layers(args.rounds)
    except Exception as exc:
        failures.append(f"layers: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    try:
        models = bench_models(args.batch, args.rounds)
    except Exception as exc:
        failures.append(f"models: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    body = {
        "card": torch.cuda.get_device_name(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "errors": errors,
        "layers": layers,
        "models": models,
        "failures": failures,
        "settings": {"rounds": args.rounds, "batches": args.batch},
    }
    command = script_command(__file__, argv)
    print(save_section("cuda", body, command=command, directory=args.records))


if __name__ == "__main__":
    main()
