"""Benchmark surgeon's space_to_depth and BlurPool against reference formulations.

Each candidate runs on the same input, contiguous and channels-last: 3 warm-up rounds, then
30 timed rounds in which every candidate runs once in turn, reported as the median per
candidate. By default torch runs one thread and the time is that thread's CPU time, which
other processes on a shared machine do not inflate; `--threads 2` times wall-clock instead.
Outputs are checked against surgeon's before timing. The results replace the
"## Replacement layers" section of docs/benchmarks.md (created if missing); other sections
are kept.

glibc hands blocks above its mmap threshold back to the kernel on free, so a candidate whose
output is a few MB can page-fault its whole output afresh on every call, or not, depending on
what ran before it: a 2-5x swing that has nothing to do with the formulation. The script
re-runs itself with M_MMAP_THRESHOLD at its 32 MiB maximum and trimming off
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), the steady state of a process that keeps
running a model, so every candidate reuses freed memory the same way.

    .venv/bin/python scripts/bench_layers.py [--repeats 30] [--threads 1] [--output FILE]
    .venv/bin/python scripts/bench_layers.py --quick    # small shapes, 3 rounds, prints only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.layers import BlurPool, binomial_filter, space_to_depth

SECTION = "## Replacement layers"
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


def bench_spd(repeats: int, shapes: list[tuple[int, ...]] = SPD_SHAPES) -> list[Row]:
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
    repeats: int, shapes: list[tuple[int, ...]] = BLUR_SHAPES, filter_size: int = 4
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


# --------------------------------------------------------------------------- report


def machine() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"timm {timm.__version__}, {platform.system()} {platform.release()}",
    ]


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| op | input (N, C, H, W) | layout | candidate | median ms | vs surgeon |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for row in rows:
        ours = next(
            r
            for r in rows
            if r.role == "surgeon" and (r.op, r.shape, r.layout) == (row.op, row.shape, row.layout)
        )
        ratio = "—" if row.role == "surgeon" else f"{row.ms / ours.ms:.2f}x"
        name = (
            f"**{row.name}**"
            if row.role == "surgeon"
            else row.name + (f" ({row.note})" if row.note else "")
        )
        shape = "x".join(str(s) for s in row.shape)
        lines.append(f"| {row.op} | {shape} | {row.layout} | {name} | {row.ms:.2f} | {ratio} |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    lines = []
    for op in dict.fromkeys(r.op for r in rows):
        for layout in LAYOUTS:
            group = [r for r in rows if r.op == op and r.layout == layout]
            refs = sorted({r.name for r in group if r.role == "reference"})
            for ref in refs:
                wins = sum(
                    1
                    for shape in dict.fromkeys(r.shape for r in group)
                    if next(r.ms for r in group if r.shape == shape and r.role == "surgeon")
                    < next(r.ms for r in group if r.shape == shape and r.name == ref)
                )
                total = len({r.shape for r in group})
                lines.append(f"- {op}, {layout}: faster than {ref} on {wins} of {total} shapes")
    return lines


def section(rows: list[Row], repeats: int, load: tuple[float, float]) -> str:
    policy = "scheduled SCHED_FIFO (chrt), as the machine was shared"
    if os.sched_getscheduler(0) != os.SCHED_FIFO:
        policy = "normal scheduling"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    clock = (
        "CPU time of the one torch thread"
        if torch.get_num_threads() == 1
        else f"wall-clock time with {torch.get_num_threads()} torch threads"
    )
    text = [
        SECTION,
        "",
        f"Generated by `scripts/bench_layers.py` on {now}: float32, 3 warm-up rounds then "
        f"{repeats} timed rounds, each calling every candidate once, in an order shuffled "
        f"afresh each round; the median per "
        f"candidate; {clock}; glibc's allocator pinned (mmap threshold 32 MiB, no trimming) "
        f"so that no candidate page-faults a fresh output on some calls and not others; "
        f"{policy}.",
        "",
        *machine(),
        f"- load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
        "(other work on this machine shows up here; above ~0.5 treat small differences "
        "as noise)",
        "",
        "Candidates. `space_to_depth` (block 2) in surgeon's two channel orders: phase-major "
        "(phase p of channel c at p·C + c), which SPD-Conv layers of ungrouped convolutions "
        "use, and channel-major (c·4 + p, `F.pixel_unshuffle`'s), which grouped and depthwise "
        "convolutions and pools need; each against SPD-Conv's slicing + cat (phase-major, its "
        "phases in another order), `F.pixel_unshuffle` and a plain copy of the input; "
        "channel-major also against SPD-Conv's slicing written for that order (stack instead "
        "of cat), the like-for-like reference there. `BlurPool` (filter 4, stride 2, "
        "reflect): surgeon's against reflect padding + one 4x4 depthwise convolution "
        "(antialiased-cnns' formulation), timm's `BlurPool2d`, and padding + two 1-d "
        "depthwise convolutions; all but timm's give the same output.",
        "",
        *table(rows),
        "",
        "Summary:",
        "",
        *summary(rows),
        "",
        "How surgeon's versions work: PyTorch ops only, chosen per mode and memory layout. "
        "`space_to_depth` on a contiguous input is one view/permute/reshape copy whose inner "
        "loop runs along output rows. Phase-major order on a channels-last input is one reshape "
        "copy that moves runs of (last block dim × channels) values, whole channel vectors, "
        "with no interleave (below 8 channels, one strided copy per phase). Channel-major order "
        "on a channels-last input means interleaving the phases of every channel, which no "
        "plain copy does fast; surgeon writes float pairs as complex numbers (bit-exact) so "
        "that the interleave runs in a vectorised kernel. `BlurPool` on channels-last inputs of "
        "at least 2^20 elements and spatial sizes of at least 48 (whose output count the "
        "convolution's own padding gives, e.g. even sizes for filter 4) filters with the "
        "convolution's zero padding, so no padded copy of the input is made, then adds what "
        "the reflected border contributes: per spatial dim one small slab (the input rows the "
        "padding mirrors) filtered along the other dims and added to the border outputs. Other "
        "inputs pad then filter, the reference's own formulation, so those rows measure the "
        "same computation twice.",
        "",
    ]
    return "\n".join(text)


def write_section(path: Path, body: str) -> None:
    existing = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = existing.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        updated = existing.rstrip("\n") + "\n\n" + body
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        updated = "".join(lines[:start]) + body + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)


ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def pin_allocator() -> None:
    """Re-run this script with glibc's allocator settings pinned (see the module docstring)."""
    if all(os.environ.get(k) == v for k, v in ALLOCATOR.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per candidate")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the section instead of writing it"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time, else wall-clock)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes and 3 rounds, printed, never written: checks that the script runs",
    )
    args = parser.parse_args()
    pin_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    if args.quick:
        args.repeats, args.no_write = 3, True
        rows = bench_spd(3, QUICK_SPD_SHAPES) + bench_blur(3, QUICK_BLUR_SHAPES)
    else:
        rows = bench_spd(args.repeats) + bench_blur(args.repeats)
    body = section(rows, args.repeats, (load_before, os.getloadavg()[0]))
    if args.no_write:
        print(body)
    else:
        write_section(args.output, body)
        print(body)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
