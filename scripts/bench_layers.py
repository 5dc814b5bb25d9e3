"""Benchmark surgeon's space_to_depth and BlurPool against reference formulations.

Each candidate runs on the same input, contiguous and channels-last: 3 warm-up rounds, then
30 timed rounds in which every candidate runs once in turn, reported as the median per
candidate. By default torch runs one thread and the time is that thread's CPU time, which
other processes on a shared machine do not inflate; `--threads 2` times wall-clock instead.
Outputs are checked against surgeon's before timing. The result is one record,
docs/records/bench/layers.json (with its provenance); `make docs` renders the "Replacement
layers" section of docs/benchmarks.md from it.

glibc hands blocks above its mmap threshold back to the kernel on free, so a candidate whose
output is a few MB can page-fault its whole output afresh on every call, or not, depending on
what ran before it, which has nothing to do with the formulation. The script re-runs itself
with M_MMAP_THRESHOLD at its 32 MiB maximum and trimming off (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_), the steady state of a process that keeps running a model, so every
candidate reuses freed memory the same way.

    python scripts/bench_layers.py [--repeats 30] [--threads 1]
    python scripts/bench_layers.py --quick    # small shapes, 3 rounds: prints, writes nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_page import BENCH_RECORDS, save_section
from records import script_command

from surgeon.layers import BlurPool, binomial_filter, space_to_depth

SPD_SHAPES = [(8, 64, 112, 112), (8, 256, 56, 56), (32, 128, 28, 28), (1, 3, 224, 224)]
BLUR_SHAPES = [(8, 64, 112, 112), (8, 256, 56, 56), (32, 128, 28, 28), (8, 64, 111, 111)]
# --quick: one small shape of each kind, to check the script runs (its numbers mean nothing)
QUICK_SPD_SHAPES = [(2, 16, 16, 16), (1, 3, 16, 16)]
QUICK_BLUR_SHAPES = [(2, 16, 16, 16), (2, 16, 15, 15)]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

Candidate = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Row:
    op: str
    shape: tuple[int, ...]
    layout: str
    name: str
    ms: float
    role: str  # "surgeon", "reference" (what surgeon must beat) or "context"
    note: str = ""


# --------------------------------------------------------------------------- references


def slicing_cat(x: torch.Tensor) -> torch.Tensor:
    # SPD-Conv's own formulation (phase-major channel order)
    return torch.cat(
        [x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1
    )


# surgeon's two channel orders: phase-major feeds SPD-Conv of ungrouped convs (nearly all),
# channel-major (pixel_unshuffle's) grouped and depthwise convs and pools
SPD_ORDERS = {
    "space_to_depth phase-major": "phase",
    "space_to_depth channel-major": "channel",
}


def slicing_stack(x: torch.Tensor) -> torch.Tensor:
    # SPD-Conv's slicing written for the channel-major order: stack the phases after the
    # channels instead of concatenating them before
    return torch.stack(
        [x[..., ::2, ::2], x[..., ::2, 1::2], x[..., 1::2, ::2], x[..., 1::2, 1::2]], dim=2
    ).flatten(1, 2)


def spd_candidates(order: str) -> dict[str, tuple[Candidate, str]]:
    ours = lambda x: space_to_depth(x, (2, 2), order)  # noqa: E731
    candidates: dict[str, tuple[Candidate, str]] = {
        f"surgeon space_to_depth ({order})": (ours, "surgeon"),
        "slicing + cat (SPD-Conv)": (slicing_cat, "reference"),
    }
    if order == "channel":
        candidates["slicing + stack (SPD-Conv's slicing, this order)"] = (
            slicing_stack,
            "reference",
        )
    candidates["F.pixel_unshuffle"] = (lambda x: F.pixel_unshuffle(x, 2), "reference")
    candidates["x.clone() (copy floor)"] = (lambda x: x.clone(), "context")
    return candidates


def explicit_phase_major(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., a::2, b::2] for a in range(2) for b in range(2)], dim=1)


def blur_candidates(
    channels: int, filter_size: int, device: str = "cpu"
) -> dict[str, tuple[Candidate, str, str]]:
    from timm.layers import BlurPool2d

    row = binomial_filter(filter_size, 1).to(device)
    full = binomial_filter(filter_size, 2)[None, None].repeat(channels, 1, 1, 1).to(device)
    tall = row.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    wide = row.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    left, right = (filter_size - 1) // 2, filter_size // 2
    pads = (left, right, left, right)

    def reflect_pad_conv(x: torch.Tensor) -> torch.Tensor:
        # antialiased-cnns' formulation, written from its description
        return F.conv2d(F.pad(x, pads, mode="reflect"), full, stride=2, groups=channels)

    def separable(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, pads, mode="reflect")
        return F.conv2d(
            F.conv2d(x, tall, stride=(2, 1), groups=channels), wide, stride=(1, 2), groups=channels
        )

    ours = BlurPool(channels, filter_size=filter_size).to(device)
    timm_blur = BlurPool2d(channels, filt_size=filter_size, stride=2).eval().to(device)
    return {
        "surgeon BlurPool": (ours, "surgeon", ""),
        "reflect pad + depthwise conv": (reflect_pad_conv, "reference", ""),
        "timm BlurPool2d": (
            timm_blur,
            "reference",
            "symmetric padding: output ceil(L/2) + 1 for even L",
        ),
        "separable (pad + 2 x 1-d conv)": (separable, "reference", ""),
        "x.clone() (copy floor)": (lambda x: x.clone(), "context", ""),
    }


# --------------------------------------------------------------------------- timing


def cpu_ms(candidate: Candidate, x: torch.Tensor) -> float:
    """Milliseconds of one call: the thread's CPU time with one torch thread, else wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    candidate(x)
    return (clock() - start) * 1e3


def interleaved(
    candidates: dict[str, Candidate],
    x: torch.Tensor,
    repeats: int,
    measure: Callable[[Candidate, torch.Tensor], float] = cpu_ms,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """Each candidate's times over `repeats` interleaved rounds (each round calls every
    candidate once, in a shuffled order), after `warmup` rounds. Interleaving shares out what
    drifts during a run (the allocator's cached blocks, other processes) between the candidates
    instead of handing it to whichever ran at the time."""
    for _ in range(warmup):
        for candidate in candidates.values():
            candidate(x)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    order = random.Random(0)
    for _ in range(repeats):
        # a fresh order each round: a candidate that runs right after another one read x finds
        # more of it in cache than one that follows a copy, so none may always follow the same
        order.shuffle(names)
        for name in names:
            samples[name].append(measure(candidates[name], x))
    return samples


def time_each(candidates: dict[str, Candidate], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds per candidate over `repeats` interleaved rounds."""
    samples = interleaved(candidates, x, repeats)
    return {name: statistics.median(times) for name, times in samples.items()}


def bench_spd(repeats: int, shapes: Sequence[tuple[int, ...]] = SPD_SHAPES) -> list[Row]:
    rows = []
    for op, order in SPD_ORDERS.items():
        expected = explicit_phase_major if order == "phase" else lambda x: F.pixel_unshuffle(x, 2)
        for shape in shapes:
            for layout, memory_format in LAYOUTS.items():
                x = torch.randn(shape).contiguous(memory_format=memory_format)
                candidates = spd_candidates(order)
                ours = candidates[f"surgeon space_to_depth ({order})"][0](x)
                if not torch.equal(ours, expected(x)):
                    raise AssertionError(f"{op} is not the permutation on {shape} {layout}")
                times = time_each({n: c for n, (c, _) in candidates.items()}, x, repeats)
                rows += [Row(op, shape, layout, n, times[n], candidates[n][1]) for n in candidates]
    return rows


def bench_blur(
    repeats: int, shapes: Sequence[tuple[int, ...]] = BLUR_SHAPES, filter_size: int = 4
) -> list[Row]:
    rows = []
    for shape in shapes:
        for layout, memory_format in LAYOUTS.items():
            x = torch.randn(shape).contiguous(memory_format=memory_format)
            candidates = blur_candidates(shape[1], filter_size)
            ours = candidates["surgeon BlurPool"][0](x)
            reference = candidates["reflect pad + depthwise conv"][0](x)
            error = float((ours - reference).abs().max())
            if ours.shape != reference.shape or error > 1e-5:
                raise AssertionError(
                    f"BlurPool differs from pad + conv on {shape} {layout}: {error}"
                )
            times = time_each({n: c for n, (c, _, _) in candidates.items()}, x, repeats)
            rows += [
                Row(
                    f"BlurPool f={filter_size}",
                    shape,
                    layout,
                    n,
                    times[n],
                    candidates[n][1],
                    candidates[n][2],
                )
                for n in candidates
            ]
    return rows


ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def pin_allocator() -> None:
    """Re-run this script with glibc's allocator settings pinned (see the module docstring)."""
    if all(os.environ.get(k) == v for k, v in ALLOCATOR.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per candidate")
    parser.add_argument(
        "--records",
        type=Path,
        help="where the record goes (default docs/records/bench; --quick: nowhere)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time, else wall-clock)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes and 3 rounds: checks that the script runs (its numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = os.getloadavg()
    if args.quick:
        args.repeats = 3
        rows = bench_spd(3, QUICK_SPD_SHAPES) + bench_blur(3, QUICK_BLUR_SHAPES)
    else:
        rows = bench_spd(args.repeats) + bench_blur(args.repeats)
    scheduling = "normal scheduling"
    if os.sched_getscheduler(0) == os.SCHED_FIFO:
        scheduling = "scheduled SCHED_FIFO (chrt)"
    body = {
        "settings": {
            "repeats": args.repeats,
            "warmup": 3,
            "threads": torch.get_num_threads(),
            "allocator_pinned": all(os.environ.get(k) == v for k, v in ALLOCATOR.items()),
            "scheduling": scheduling,
        },
        "rows": [dataclasses.asdict(row) for row in rows],
        "load": {"before": list(before), "after": list(os.getloadavg())},
    }
    records = args.records if args.records or args.quick else BENCH_RECORDS
    command = script_command(__file__, argv)
    print(save_section("layers", body, command=command, directory=records, quick=args.quick))


if __name__ == "__main__":
    pin_allocator()
    main()
