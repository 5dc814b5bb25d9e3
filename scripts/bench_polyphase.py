"""Benchmark what a polyphase site costs: the layer at stride 1, then APS (or LPS).

Budget (issue 19): an APS site costs at most 1.3× its stride-1 layer plus one copy of that
layer's output, i.e. choosing and gathering the component may cost about as much as copying
the map once, and little more. Each site runs on ResNet-18's shapes at 224 px (batch 8),
contiguous and channels-last, timed as scripts/bench_layers.py times its candidates (one torch
thread's CPU time, interleaved rounds, medians, glibc's allocator pinned), in evaluation mode
under `torch.no_grad()`. Writes its record, docs/records/bench/polyphase.json; `make docs`
renders the "## Polyphase sampling" section of docs/benchmarks.md from it.

    .venv/bin/python scripts/bench_polyphase.py [--repeats 30] [--records DIR]
    .venv/bin/python scripts/bench_polyphase.py --quick    # small shapes, 3 rounds, prints only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_layers import interleaved, pin_allocator  # noqa: E402
from bench_page import BENCH_RECORDS, save_section  # noqa: E402
from records import script_command  # noqa: E402

from surgeon.layers import AdaptivePolyphaseSampling, LearnablePolyphaseSampling  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class Site:
    """A strided layer of ResNet-18 and the input it sees."""

    name: str
    shape: tuple[int, ...]
    build: Callable[[int], nn.Module]  # stride -> the layer


SITES = [
    Site("stem conv 7×7, 3→64", (8, 3, 224, 224), lambda s: nn.Conv2d(3, 64, 7, s, 3)),
    Site("max pool 3×3", (8, 64, 112, 112), lambda s: nn.MaxPool2d(3, s, 1)),
    Site("conv 3×3, 64→128", (8, 64, 56, 56), lambda s: nn.Conv2d(64, 128, 3, s, 1)),
    Site("conv 3×3, 256→512", (8, 256, 14, 14), lambda s: nn.Conv2d(256, 512, 3, s, 1)),
]
# --quick: one small shape of each kind, to check the script runs (its numbers mean nothing)
QUICK_SITES = [
    Site("conv 3×3, 8→16", (2, 8, 16, 16), lambda s: nn.Conv2d(8, 16, 3, s, 1)),
    Site("max pool 3×3", (2, 8, 15, 15), lambda s: nn.MaxPool2d(3, s, 1)),
]


@dataclass(frozen=True)
class Row:
    site: str
    shape: tuple[int, ...]
    layout: str
    name: str
    ms: float


def candidates(site: Site, channels: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """What runs at one site: the original strided layer, the stride-1 layer, that plus one
    copy of its output (the budget's unit), and the site with APS, APS + LPF and LPS."""
    strided, dense = site.build(2).eval(), site.build(1).eval()
    dense.load_state_dict(strided.state_dict())
    aps = AdaptivePolyphaseSampling(channels).eval()
    blurred = AdaptivePolyphaseSampling(channels, filter_size=3).eval()
    lps = LearnablePolyphaseSampling(channels).eval()
    return {
        "strided layer (the original)": strided,
        "stride-1 layer": dense,
        "stride-1 layer + copy of its output": lambda x: dense(x).clone(),
        "APS site (stride-1 layer + APS)": lambda x: aps(dense(x)),
        "APS + LPF site (filter 3)": lambda x: blurred(dense(x)),
        "LPS site": lambda x: lps(dense(x)),
    }


def bench(sites: list[Site], repeats: int) -> list[Row]:
    rows = []
    for site in sites:
        for layout, memory_format in LAYOUTS.items():
            x = torch.randn(site.shape).contiguous(memory_format=memory_format)
            with torch.no_grad():
                channels = site.build(1)(x).shape[1]
                runs = candidates(site, channels)
                for layer in runs.values():
                    if isinstance(layer, nn.Module):
                        layer.to(memory_format=memory_format)
                expected = runs["strided layer (the original)"](x).shape
                got = runs["APS site (stride-1 layer + APS)"](x).shape
                if got != expected:
                    raise AssertionError(f"{site.name}: APS gives {tuple(got)}, not {expected}")
                samples = interleaved(runs, x, repeats)
            rows += [
                Row(site.name, site.shape, layout, name, statistics.median(times))
                for name, times in samples.items()
            ]
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per candidate")
    parser.add_argument(
        "--records",
        type=Path,
        help="where the record goes (default docs/records/bench; --quick: nowhere)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes and 3 rounds, printed, never written: checks that the script runs",
    )
    args = parser.parse_args(argv)
    if argv is None:
        pin_allocator()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    before = list(os.getloadavg())
    repeats = 3 if args.quick else args.repeats
    rows = bench(QUICK_SITES if args.quick else SITES, repeats)
    body = {
        "rows": [asdict(row) for row in rows],
        "settings": {"repeats": repeats, "threads": 1},
        "load": {"before": before, "after": list(os.getloadavg())},
    }
    records = args.records if args.records or args.quick else BENCH_RECORDS
    command = script_command(__file__, argv)
    print(save_section("polyphase", body, command=command, directory=records, quick=args.quick))
    return rows


if __name__ == "__main__":
    main()
