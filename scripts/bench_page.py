"""docs/benchmarks.md, rendered from the benchmark records alone.

Each benchmark script writes one record per section it measures, `docs/records/bench/<name>.json`
(the measurement, its settings and its provenance), replacing that section's previous record;
this module renders every section from its record: which command and commit produced it, on
what machine and library versions, marked stale when that commit's code is not the current
code, and the tables and summaries computed from the record's rows. The prose here explains
the method and holds no measured number. A section without a record says which command makes
one. To add a section (e.g. another deployment path), append a `Section` to `SECTIONS`.
"""

from __future__ import annotations

import collections
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance
from records import RECORDS, judged_line, read_record, short, stale_reason, write_json

__all__ = [
    "BENCH_RECORDS",
    "SECTIONS",
    "Section",
    "fit",
    "record_path",
    "render_benchmarks",
    "render_section",
    "save_section",
]

BENCH_RECORDS = RECORDS / "bench"
LATENCY_TARGET = 1.1  # latency ratio over MAC ratio a patched model should stay within
CLI_TARGET = 1.3  # `surgeon patch` over the build-only process
LOAD_TARGET = 1.2  # `surgeon.load` over build + read safetensors
POLYPHASE_TARGET = 1.3  # an APS site over its stride-1 layer + one copy of its output
HEAL_TARGET = 1.15  # heal step over teacher forward + student training step
DEPLOY_BATCH = 8  # the batch the deployment target holds at (and where misses are profiled)
DEPLOY_CHECK = 1e-5  # largest relative difference of an exported file against eager PyTorch

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Section:
    """One "## title" section of the page: the record it is rendered from and how."""

    name: str  # the record is BENCH_RECORDS / f"{name}.json"
    title: str
    command: str  # what writes the record
    render: Callable[[Mapping[str, Any]], list[str]]
    # records f"{name}-<part>.json" join f"{name}.json": each is one command's run (one model,
    # one path...), and `combine` makes one record of them for `render`
    combine: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]] | None = None


def record_path(name: str, directory: Path = BENCH_RECORDS) -> Path:
    return directory / f"{name}.json"


def part_paths(name: str, directory: Path = BENCH_RECORDS) -> list[Path]:
    """The records of a section made of parts: `name.json`, then `name-*.json` by name."""
    whole = record_path(name, directory)
    return [*([whole] if whole.exists() else []), *sorted(directory.glob(f"{name}-*.json"))]


def save_section(
    name: str,
    body: Mapping[str, Any],
    *,
    command: Sequence[str],
    directory: Path | None,
    quick: bool = False,
) -> str:
    """Write the section's record into `directory` (None: print only) and return the section
    rendered from it; a `quick` record says it is a smoke run whose numbers mean nothing."""
    record = {**body, "quick": quick, "provenance": provenance(command)}
    if directory is not None:
        write_json(record_path(name, directory), record)
        print(f"wrote {record_path(name, directory)}", file=sys.stderr)
    section = next(
        s
        for s in SECTIONS
        if s.name == name or (s.combine is not None and name.startswith(f"{s.name}-"))
    )
    return "\n".join(render_section(section, record, current=None))


# --------------------------------------------------------------------------- shared parts


def _load(record: Mapping[str, Any]) -> str:
    load = record.get("load") or {}
    before, after = load.get("before"), load.get("after")
    if not before or not after:
        return ""
    fmt = "/".join
    return (
        f"Load average (1/5/15 min) before: {fmt(f'{v:.1f}' for v in before)}, after: "
        f"{fmt(f'{v:.1f}' for v in after)}."
    )


def _provenance_lines(
    section: Section, record: Mapping[str, Any], current: str | None
) -> list[str]:
    prov = record.get("provenance") or {}
    lines = []
    if record.get("quick"):
        lines += ["**Smoke run** (`--quick`): tiny sizes and rounds; its numbers mean nothing.", ""]
    if current is not None:
        reason = stale_reason(prov, current)
        if reason is not None:
            lines += [
                f"**Stale** ({reason}): these numbers describe older code. Re-run "
                f"`{_rerun(section, prov)}`, then `make docs`.",
                "",
            ]
    path = f"records/bench/{section.name}.json"
    lines += [f"Record {_record_line(path, prov)}", ""]
    return lines


def _rerun(section: Section, prov: Mapping[str, Any]) -> str:
    """The command that brings a record up to date: its own, else the section's."""
    return f"python {prov['command']}" if prov.get("command") else section.command


def _record_line(path: str, prov: Mapping[str, Any]) -> str:
    """`[path](path)`: the command, commit, time, machine and library versions of a record."""
    versions = prov.get("versions") or {}
    machine = prov.get("machine") or {}
    libraries = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if k != "surgeon")
    return (
        f"[`{path}`]({path}): `{prov.get('command', '—')}` on commit "
        f"`{short(prov.get('commit'))}`"
        + (" with uncommitted code changes" if prov.get("dirty") else "")
        + f", {str(prov.get('recorded') or '—')[:16].replace('T', ' ')} UTC; "
        f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cores', '?')} cores; {libraries}."
    )


def render_parts(
    section: Section, parts: Sequence[tuple[str, Mapping[str, Any]]], current: str | None
) -> list[str]:
    """A section made of several records (`(file name, record)`): a line per record (marked
    stale where it is, with its own command to re-run), then the body of their combination."""
    assert section.combine is not None
    count = f"{len(parts)} records" if len(parts) > 1 else "1 record"
    lines = [section.title, "", f"Made of {count}, each one command's run:", ""]
    for name, record in parts:
        prov = record.get("provenance") or {}
        line = f"- {_record_line(f'records/bench/{name}', prov)}"
        if record.get("quick"):
            line += " **Smoke run** (`--quick`): its numbers mean nothing."
        reason = stale_reason(prov, current) if current is not None else None
        if reason is not None:
            line += (
                f" **Stale** ({reason}): its numbers describe older code; re-run "
                f"`{_rerun(section, prov)}`, then `make docs`."
            )
        load = _load(record)
        if load:
            line += f" {load}"
        lines.append(line)
    lines.append("")
    return [*lines, *section.render(section.combine([r for _, r in parts]))]


def render_section(
    section: Section, record: Mapping[str, Any] | None, current: str | None
) -> list[str]:
    """The section's lines: a note on how to make its record when there is none, else the
    record's provenance (marked stale when it is, against `current`) and its body."""
    lines = [section.title, ""]
    if record is None:
        path = f"docs/records/bench/{section.name}.json"
        return [
            *lines,
            f"No record yet: `{section.command}` writes `{path}`; then `make docs`.",
            "",
        ]
    lines += _provenance_lines(section, record, current)
    lines += section.render(record)
    load = _load(record)
    if load:
        lines += [load, ""]
    return lines


def _ratio(value: float, target: float) -> str:
    """A ratio, bold where it misses its target."""
    return f"{value:.2f}" if value <= target else f"**{value:.2f}**"


def _clock(settings: Mapping[str, Any]) -> str:
    threads = settings.get("threads", 1)
    return "CPU time of the one torch thread" if threads == 1 else f"wall time, {threads} threads"


def _allocator(settings: Mapping[str, Any]) -> str:
    if settings.get("allocator_pinned"):
        return (
            "glibc's allocator pinned (mmap threshold 32 MiB, no trimming) so that no candidate "
            "page-faults a fresh output on some calls and not others"
        )
    return "glibc's allocator with its defaults"


# --------------------------------------------------------------------------- layers


def _layer_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| op | input (N, C, H, W) | layout | candidate | median ms | vs surgeon |",
        "|---|---|---|---|---:|---:|",
    ]
    for row in rows:
        ours = next(
            r["ms"]
            for r in rows
            if r["role"] == "surgeon"
            and (r["op"], r["shape"], r["layout"]) == (row["op"], row["shape"], row["layout"])
        )
        ratio = "—" if row["role"] == "surgeon" else f"{row['ms'] / ours:.2f}x"
        name = f"**{row['name']}**" if row["role"] == "surgeon" else row["name"]
        if row.get("note"):
            name += f" ({row['note']})"
        shape = "x".join(str(s) for s in row["shape"])
        lines.append(
            f"| {row['op']} | {shape} | {row['layout']} | {name} | {row['ms']:.3f} | {ratio} |"
        )
    return lines


def _layer_summary(rows: Sequence[Row]) -> list[str]:
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        for layout in dict.fromkeys(r["layout"] for r in rows):
            group = [r for r in rows if r["op"] == op and r["layout"] == layout]
            shapes = list(dict.fromkeys(tuple(r["shape"]) for r in group))
            for ref in sorted({r["name"] for r in group if r["role"] == "reference"}):
                wins = sum(
                    next(
                        r["ms"] for r in group if tuple(r["shape"]) == s and r["role"] == "surgeon"
                    )
                    < next(r["ms"] for r in group if tuple(r["shape"]) == s and r["name"] == ref)
                    for s in shapes
                )
                lines.append(
                    f"- {op}, {layout}: faster than {ref} on {wins} of {len(shapes)} shapes"
                )
    return lines


def render_layers(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    rows = record["rows"]
    return [
        f"float32, {settings.get('warmup', 3)} warm-up rounds then {settings.get('repeats')} "
        "timed rounds, each calling every candidate once in an order shuffled afresh each "
        f"round; the median per candidate; {_clock(settings)}; {_allocator(settings)}; "
        f"{settings.get('scheduling', 'normal scheduling')}.",
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
        "depthwise convolutions; all but timm's give the same output. Which formulation "
        "surgeon's layers pick, per mode and memory layout, is described in "
        "[deploy.md](deploy.md#what-runs-where).",
        "",
        *_layer_table(rows),
        "",
        "Summary:",
        "",
        *_layer_summary(rows),
        "",
    ]


# --------------------------------------------------------------------------- latency


def render_latency(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    rows = record["rows"]
    batches = sorted({r["batch"] for r in rows})
    size = rows[0]["size"] if rows else settings.get("size")
    lines = [
        f"Batch {' and '.join(map(str, batches))}, 3×{size}×{size}, float32, "
        f"`torch.no_grad()`, eager, {_clock(settings)}; best of {settings.get('rounds')} "
        "interleaved rounds (the record keeps the medians too); "
        f"{_allocator(settings)}. *MAC ratio* is patched ÷ original MACs (FlopCounterMode), "
        "what a compute-bound model would cost; *÷ MACs* is the latency ratio divided by it "
        f"(target ≤ {LATENCY_TARGET}). *Folded* is the same model after `surgeon.fold` (each "
        "SPD layer in the form that timed faster on its input; n/m = layers folded). SPD "
        "kernels were densified as after fine-tuning.",
        "",
        "| model | batch | policy | sites | MACs (G) | MAC ratio | ms | latency ratio | ÷ MACs | "
        "folded ms | folded ratio | folded ÷ MACs |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["policy"] == "original":
            lines.append(
                f"| {r['model']} | {r['batch']} | original | — | {r['macs'] / 1e9:.2f} | 1.00 | "
                f"{r['best']:.1f} | 1.00 | — | — | — | — |"
            )
            continue
        folded = "— | — | —"
        if "folded_best" in r:
            folded = (
                f"{r['folded_best']:.1f} ({r['fold']}) | {r['folded_ratio']:.2f} | "
                f"{_ratio(r['folded_ratio'] / r['folded_mac_ratio'], LATENCY_TARGET)}"
            )
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['policy']} | {r['patched']} | "
            f"{r['macs'] / 1e9:.2f} | {r['mac_ratio']:.2f} | {r['best']:.1f} | "
            f"{r['ratio']:.2f} | {_ratio(r['ratio'] / r['mac_ratio'], LATENCY_TARGET)} | "
            f"{folded} |"
        )
    missed = [
        f"{r['model']} {r['policy']} (batch {r['batch']})"
        for r in rows
        if "mac_ratio" in r and r["ratio"] / r["mac_ratio"] > LATENCY_TARGET
    ]
    return [
        *lines,
        "",
        "A row with 0 sites runs the unchanged model: its distance from 1.00 is the "
        "measurement noise of the run.",
        "",
        f"Eager rows above the {LATENCY_TARGET} target: {', '.join(missed) or 'none'}.",
        "",
        "Why rows differ from their MAC ratio. The MAC count (FlopCounterMode) sees "
        "convolutions and matmuls only and prices every MAC the same. SPD's inner convolutions "
        "carry s² times the input channels on an s² times smaller input: the same outputs from "
        "more weights, which costs weight-heavy layers more than their MACs. Grouped, "
        "depthwise and narrow-input (stem) SPD layers run as one strided convolution; the "
        "others pay a space-to-depth copy outside the MAC count, which folding removes. "
        "antialias moves the stride after the normalisation, activation and (stem) max pool, "
        "which then run at the higher resolution, uncounted, and turns strided depthwise "
        "convolutions into stride-1 ones. dilate's dilated convolutions run at a different MAC "
        "rate than the originals.",
        "",
    ]


# --------------------------------------------------------------------------- CLI


CLI_LABELS = {
    "import torch": '`python -c "import torch"`',
    "build only": '`python -c "import torchvision; torchvision.models.resnet50()"`',
    "build only, interpreter teardown": "the same build-only process, exiting normally",
    "surgeon patch": "`surgeon patch resnet50 --policy spd --out DIR`",
}


def render_cli(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    walls, cpus = record["walls"], record["cpus"]
    build, build_cpu = walls["build only"][0], cpus["build only"][0]
    lines = [
        "Whole-process wall time and CPU time (user + system of the process), best (median) "
        f"of {settings.get('repeats')} interleaved runs, each process with OMP_NUM_THREADS="
        f"{settings.get('threads')} and glibc's default allocator, as a user's process gets. "
        "The `surgeon` script ends without the interpreter's teardown (`os._exit` after "
        "flushing its output) and collects cyclic garbage less often; the baseline processes "
        "do the same, so the ratios compare like with like. The row exiting normally shows "
        "what the teardown costs. Ratios are over the build-only process; target: "
        f"`surgeon patch` within {CLI_TARGET}×.",
        "",
        "| process | wall s | ratio | CPU s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in CLI_LABELS.items():
        if key not in walls:
            continue
        wall, cpu = walls[key], cpus[key]
        lines.append(
            f"| {label} | {wall[0]:.2f} ({wall[1]:.2f}) | {_ratio(wall[0] / build, CLI_TARGET)} "
            f"| {cpu[0]:.2f} ({cpu[1]:.2f}) | {_ratio(cpu[0] / build_cpu, CLI_TARGET)} |"
        )
    lines += [
        "",
        "Where the CLI's time goes (same steps in one process, CPU seconds, best of the runs; "
        "process start and exit left out):",
        "",
        "| phase | CPU s |",
        "|---|---:|",
        *[f"| {phase} | {seconds:.2f} |" for phase, seconds in record["phases"].items()],
        "",
        "`import surgeon.cli` loads torch (every command needs it), typer, rich, PyYAML and "
        "safetensors, not torchvision, timm or onnx: each command imports what it needs. "
        "timm imported while patching a torchvision model: "
        f"{'yes' if record.get('timm_imported') else 'no'}.",
        "",
    ]
    return lines


# --------------------------------------------------------------------------- scaling


def fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, R²)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, 1 - residual / total if total else 1.0


def render_scaling(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    rows = record["rows"]
    size = settings.get("size")
    lines = [
        f'`patch(model, "spd", x)` in one process ({_clock(settings)}), input 1×3×{size}×{size} '
        "(small, so the forward passes patch makes for verification do not swamp the graph "
        f"work), best (median) of {settings.get('repeats')}. Graph size = nodes of "
        "`torch.fx.symbolic_trace`. Target: linear growth.",
        "",
        "| model | graph nodes | patch s | fit s | s per 1000 nodes |",
        "|---|---:|---:|---:|---:|",
    ]
    nodes = [r["nodes"] for r in rows]
    best = [r["best"] for r in rows]
    if len(rows) < 2:
        return [
            *lines,
            *(f"| {r['model']} | {r['nodes']} | {r['best']:.2f} | — | — |" for r in rows),
            "",
        ]
    a, b, r2 = fit(nodes, best)
    slope = fit([math.log(n) for n in nodes], [math.log(t) for t in best])[1]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['best']:.2f} ({r['median']:.2f}) | "
            f"{a + b * r['nodes']:.2f} | {r['best'] / r['nodes'] * 1e3:.2f} |"
        )
    return [
        *lines,
        "",
        f"Least squares: t = {a:.3f} s + {b * 1e3:.3f} ms × nodes, R² = {r2:.4f}; log-log "
        f"slope {slope:.2f} (1 = linear, 2 = quadratic).",
        "",
    ]


# --------------------------------------------------------------------------- load


def render_load(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    model = record["model"]
    runs = record["runs"]
    base = runs["build + read safetensors"][0]
    lines = [
        f"`surgeon.load` of a {model} SPD checkpoint (build the source model, apply the "
        "recorded edits, read and check the safetensors file, `load_state_dict(strict=True)`; "
        f"no tracing, no policy, no forward pass) against building {model} and reading the "
        f"same safetensors file: CPU seconds, best (median) of {settings.get('repeats')} "
        f"interleaved runs in one warm process. Target: at most {LOAD_TARGET}× the "
        "build-and-read time.",
        "",
        "| step | CPU s | ratio |",
        "|---|---:|---:|",
    ]
    for name, (best, median) in runs.items():
        lines.append(f"| {name} | {best:.3f} ({median:.3f}) | {_ratio(best / base, LOAD_TARGET)} |")
    return [*lines, ""]


# --------------------------------------------------------------------------- CUDA


def render_cuda(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    rounds = settings.get("rounds")
    lines = [
        f"On {record.get('card', 'an unnamed card')}: CUDA {record.get('cuda')}, cuDNN "
        f"{record.get('cudnn')}. Recorded apart from the CPU sections above: another machine "
        "and software stack.",
        "",
        "**Correctness** (TF32 off: float32 on both devices). Largest absolute difference "
        "between CUDA and CPU outputs of the same module on the same input:",
        "",
        "| case | max abs diff |",
        "|---|---:|",
        *[f"| {name} | {value:.2e} |" for name, value in record.get("errors", [])],
        "",
        f"**Layers**: median of {rounds} interleaved rounds, CUDA events, float32; *vs surgeon* "
        "is the candidate's time over surgeon's (above 1: surgeon faster).",
        "",
        "| op | input (N, C, H, W) | layout | candidate | median ms | vs surgeon |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in record.get("layers", []):
        shape = "x".join(map(str, r["shape"]))
        name = f"**{r['name']}**" if r["name"] == "surgeon" else r["name"]
        lines.append(
            f"| {r['op']} | {shape} | {r['layout']} | {name} | {r['ms']:.3f} | {r['vs']:.2f}x |"
        )
    lines += [
        "",
        f"**Models**: 3×224×224, float32, eval, `torch.no_grad()`, best of {rounds} "
        "interleaved rounds (CUDA events, PyTorch's default TF32 for cuDNN convolutions). "
        "*rel. error* is max |CUDA − CPU| over max |CPU output| of the same patched model with "
        "TF32 off; *÷ MACs* is the latency ratio over the MAC ratio.",
        "",
        "| model | batch | policy | ms | latency ratio | MAC ratio | ÷ MACs | rel. error |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in record.get("models", []):
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['policy']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
            f"{r['mac_ratio']:.2f} | {r['per_mac']:.2f} | {r['error']:.1e} |"
        )
    if record.get("failures"):
        lines += ["", "Parts that failed on this machine:", ""]
        lines += [f"- {failure}" for failure in record["failures"]]
    return [*lines, ""]


# --------------------------------------------------------------------------- polyphase

POLYPHASE_UNIT = "stride-1 layer + copy of its output"


def render_polyphase(record: Mapping[str, Any]) -> list[str]:
    rows = record["rows"]
    names = list(dict.fromkeys(row["name"] for row in rows))
    cases: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        shape = "×".join(map(str, row["shape"]))
        cases.setdefault((row["site"], shape, row["layout"]), {})[row["name"]] = row["ms"]
    lines = [
        "Each of ResNet-18's strided layers at 224 px (batch 8): the original, the layer at "
        "stride 1, that plus one copy of its output (the budget's unit), and the site with APS, "
        "APS with a 3-tap blur and LPS. Float32, evaluation mode, `torch.no_grad()`, median ms "
        f"of {record['settings']['repeats']} interleaved rounds, one torch thread's CPU time. "
        f"Target: an APS site at most {POLYPHASE_TARGET}× the unit.",
        "",
        "| site | input | layout | " + " | ".join(names) + " | APS ÷ unit | LPS ÷ unit |",
        "|---|---|---|" + "---:|" * (len(names) + 2),
    ]
    for (site, shape, layout), ms in cases.items():
        unit = ms[POLYPHASE_UNIT]
        aps = _ratio(ms["APS site (stride-1 layer + APS)"] / unit, POLYPHASE_TARGET)
        cells = " | ".join(f"{ms[name]:.2f}" for name in names)
        lines.append(
            f"| {site} | {shape} | {layout} | {cells} | {aps} | {ms['LPS site'] / unit:.2f} |"
        )
    return [*lines, ""]


# --------------------------------------------------------------------------- heal


def render_heal(record: Mapping[str, Any]) -> list[str]:
    settings = record["settings"]
    cost = record["cost"]
    ms = cost["ms"]
    lines = [
        f"`{settings['model']}` patched with `{settings['policy']}` as the student, the "
        f"original as the teacher, batch {settings['batch']} at {settings['size']}×"
        f"{settings['size']}, {cost['precision']}, channels_last"
        f"{', torch.compile' if settings.get('compile') else ''}, on {cost['device']}; medians "
        f"of {settings['rounds']} interleaved rounds on one batch already on the device. "
        f"Target: heal step at most {HEAL_TARGET}× (teacher forward + student step).",
        "",
        "| measured | ms |",
        "|---|---:|",
        f"| teacher forward (inference_mode) | {ms['teacher forward']:.1f} |",
        f"| student training step (forward, CE, backward, AdamW) | {ms['student step']:.1f} |",
        f"| heal step | {ms['heal step']:.1f} |",
        "",
        f"Heal step ÷ (teacher forward + student step) = {_ratio(cost['ratio'], HEAL_TARGET)}.",
        "",
        f"Throughput of `surgeon.heal` end to end ({settings['steps']} steps, "
        f"{settings['workers']} DataLoader workers per process, JPEG decoding and augmentation "
        "included), images/s over all processes after the first logged window:",
        "",
        "| processes | device | images/s |",
        "|---:|---|---:|",
    ]
    for rate in record.get("rates", []):
        threads = f" ({rate['threads']} threads each)" if rate.get("threads") else ""
        lines.append(
            f"| {rate['processes']} | {rate['device']}{threads} | {rate['images_per_s']:.1f} |"
        )
    return [*lines, ""]


# --------------------------------------------------------------------------- deployment paths


def _deployed(rows: Sequence[Row], row: Row) -> float:
    """÷ MACs of what is deployed on the row's path: folded where a fold rewrote something."""
    folded = [
        r["per_mac"]
        for r in rows
        if r["folded"]
        and (r["model"], r["batch"], r["path"], r["policy"])
        == (row["model"], row["batch"], row["path"], row["policy"])
    ]
    return float(folded[0] if folded else row["per_mac"])


def _why(profile: Mapping[str, Any]) -> str:
    """Which kinds of operation a miss's extra time went to, from its profile."""
    categories = profile["categories"]
    extra = {name: after - before for name, (before, after) in categories.items()}
    total = sum(extra.values()) or 1.0
    parts = []
    for name, added in sorted(extra.items(), key=lambda item: -item[1])[:3]:
        before, after = categories[name]
        grew = f"×{after / before:.2f}" if before > 0 else "new"
        parts.append(f"{name} {before:.1f} → {after:.1f} ms ({grew}, {added / total:.0%})")
    dense = ("convolution", "matrix multiply")
    conv_before = sum(categories.get(k, [0, 0])[0] for k in dense)
    conv_after = sum(categories.get(k, [0, 0])[1] for k in dense)
    sentence = "The extra time went to " + "; ".join(parts) + "."
    if conv_before > 0:
        sentence += (
            f" Dense convolutions and matrix multiplies ran ×{conv_after / conv_before:.2f} "
            f"against a MAC ratio of {profile['mac_ratio']:.2f}."
        )
    return sentence


def _deploy_path_table(rows: Sequence[Row], path: str) -> list[str]:
    onnx = path == "onnxruntime"
    lines = [
        f"### {path}",
        "",
        "| model | batch | policy | sites | MAC ratio | ms | ratio | ÷ MACs | folded ms (n/m) "
        "| folded ÷ MACs |" + (" check |" if onnx else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if onnx else ""),
    ]
    plain = [r for r in rows if r["path"] == path and not r["folded"]]
    for r in plain:
        folded = next(
            (
                f
                for f in rows
                if f["path"] == path
                and f["folded"]
                and (f["model"], f["batch"], f["policy"]) == (r["model"], r["batch"], r["policy"])
            ),
            None,
        )
        original = r["policy"] == "original"
        unchanged = f"as patched ({r['fold']})" if "fold" in r else "—"
        cells = [
            r["model"],
            str(r["batch"]),
            r["policy"],
            "—" if original else str(r["sites"]),
            f"{r['mac_ratio']:.2f}",
            f"{r['best']:.1f}",
            f"{r['ratio']:.2f}",
            "—" if original else _ratio(r["per_mac"], LATENCY_TARGET),
            f"{folded['best']:.1f} ({folded['fold']})" if folded else unchanged,
            _ratio(folded["per_mac"], LATENCY_TARGET) if folded else "—",
        ]
        if onnx:
            worst = max(x["check_rel_diff"] for x in (r, folded) if x)
            cells.append(f"{worst:.1e}" if worst <= DEPLOY_CHECK else f"**{worst:.1e}**")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if onnx:
        inexact = [
            f"{r['model']} {r['policy']}{' folded' if r['folded'] else ''} (batch {r['batch']})"
            for r in rows
            if r["path"] == path and r["check_rel_diff"] > DEPLOY_CHECK
        ]
        lines += [
            f"ONNX files whose check exceeded {DEPLOY_CHECK:.0e}: {', '.join(inexact) or 'none'}.",
            "",
        ]
    misses = [
        f"{r['model']} {r['policy']}"
        for r in plain
        if r["batch"] == DEPLOY_BATCH
        and r["policy"] != "original"
        and _deployed(rows, r) > LATENCY_TARGET
    ]
    return [
        *lines,
        f"Rows above {LATENCY_TARGET} at batch {DEPLOY_BATCH} (folded where a fold applies): "
        f"{', '.join(misses) or 'none'}.",
        "",
    ]


def _deploy_profiles(profiles: Sequence[Row]) -> list[str]:
    if not profiles:
        return []
    lines = [
        "### Why rows miss the target",
        "",
        f"Each row above {LATENCY_TARGET} at batch {DEPLOY_BATCH}, profiled on its path: the "
        "time of each kind of operation in the original and the patched model (ms per call), "
        "and the operations whose time grew most. Eager and Inductor: torch.profiler, self CPU "
        "time per operation and input shape (Inductor's fused kernels are one entry). ONNX "
        "Runtime: its node profile, per node of the optimised graph (node names carry the "
        "module path).",
        "",
    ]
    for p in profiles:
        lines += [
            f"**{p['model']} {p['policy']}, {p['path']}** (÷ MACs {p['per_mac']:.2f}, "
            f"{p['variant']}). {_why(p)}",
            "",
            "| kind of operation | original ms | patched ms |",
            "|---|---:|---:|",
            *(
                f"| {name} | {before:.2f} | {after:.2f} |"
                for name, (before, after) in p["categories"].items()
            ),
            "",
            "| operation | original ms | patched ms |",
            "|---|---:|---:|",
            *(f"| `{op[:90]}` | {before:.2f} | {after:.2f} |" for op, before, after in p["grown"]),
            "",
        ]
    return lines


def _deploy_rearrangements(rows: Sequence[Row]) -> list[str]:
    if not rows:
        return []
    faster = sum(r["ms"]["SpaceToDepth"] < r["ms"]["Reshape/Transpose"] for r in rows)
    return [
        "### SPD in ONNX Runtime: SpaceToDepth against Reshape/Transpose",
        "",
        "Every phase-major 2-d SPD layer is exported with ONNX's SpaceToDepth operator. Here "
        "each such layer (dense weights, its input shape) runs in ONNX Runtime as exported, "
        "and as a twin in channel-major order whose space-to-depth exports as "
        "Reshape/Transpose/Reshape (its kernel permuted to match, so the outputs are the same): "
        "best ms of interleaved rounds.",
        "",
        "| layer | input | SpaceToDepth ms | Reshape/Transpose ms |",
        "|---|---|---:|---:|",
        *(
            f"| {r['layer']} | {'×'.join(map(str, r['shape']))} | "
            f"{r['ms']['SpaceToDepth']:.3f} | {r['ms']['Reshape/Transpose']:.3f} |"
            for r in rows
        ),
        "",
        f"SpaceToDepth faster on {faster} of {len(rows)} layers.",
        "",
    ]


def _deploy_folds(folds: Sequence[Row]) -> list[str]:
    if not folds:
        return []
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for f in folds:
        for layer in f["layers"]:
            counts[(f["path"], layer["kind"], layer["form"])] += 1
    return [
        "### What fold chose per path",
        "",
        "Forms chosen by `surgeon.fold(backend=path)` (timed per layer on that path), counted "
        "over the models and batch sizes above; every timing is in the record.",
        "",
        "| path | kind | form | layers |",
        "|---|---|---|---:|",
        *(f"| {p} | {k} | {form} | {n} |" for (p, k, form), n in sorted(counts.items())),
        "",
    ]


def combine_deploy(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One deploy record of several runs (`bench_deploy.py --part`). A row's ratios compare it
    with the original timed in the same rounds, so a model, batch and path must come from one
    run: two records timing the same are refused."""
    seen: dict[tuple[Any, ...], int] = {}
    for i, record in enumerate(records):
        for key in dict.fromkeys((r["model"], r["batch"], r["path"]) for r in record["rows"]):
            if key in seen:
                model, batch, path = key
                raise ValueError(
                    f"two deploy records time {model} at batch {batch} on {path} (records "
                    f"{seen[key] + 1} and {i + 1}): delete the older one, or re-run without it"
                )
            seen[key] = i
    settings = [r.get("settings") or {} for r in records]
    threads = {s.get("threads", 1) for s in settings}
    if len(threads) > 1:
        raise ValueError(
            f"deploy records ran on {sorted(threads)} threads: the page states one clock; "
            "re-run the parts with the same --threads"
        )
    return {
        "rows": [row for r in records for row in r["rows"]],
        **{
            key: [item for r in records for item in r.get(key, [])]
            for key in ("failures", "profiles", "folds", "spd_rearrangements")
        },
        # a path no part could run is said once
        "skipped": list(
            {(s["path"], s["reason"]): s for r in records for s in r.get("skipped", [])}.values()
        ),
        "settings": {
            "size": "/".join(dict.fromkeys(str(s.get("size")) for s in settings)),
            "batches": sorted({b for s in settings for b in s.get("batches", [])}),
            "rounds": "/".join(dict.fromkeys(str(s.get("rounds")) for s in settings)),
            "threads": threads.pop(),
        },
    }


def render_deploy(record: Mapping[str, Any]) -> list[str]:
    settings = record.get("settings") or {}
    rows = record["rows"]
    size = settings.get("size")
    lines = [
        f"3×{size}×{size} float32 inputs, batch "
        f"{' and '.join(map(str, settings.get('batches', [])))}, `torch.no_grad()`, "
        f"{_clock(settings)}; every variant of a model, batch and path timed in "
        f"{settings.get('rounds')} interleaved rounds, the best round setting the ratios. "
        "*÷ MACs* is the latency ratio to the original on the same path divided by the MAC "
        "ratio (FlopCounterMode, eager); target ≤ "
        f"{LATENCY_TARGET} at batch {DEPLOY_BATCH}. *Folded* is the model after "
        "`surgeon.fold(backend=path)`, each layer in the exact form that timed fastest on that "
        "path (n/m: units rewritten of those considered). Replacement weights are dense: SPD "
        "kernels transferred exactly plus small random values in the taps the transfer leaves "
        "zero, as after fine-tuning. ONNX Runtime runs the file `surgeon export` writes; "
        "*check* is the largest relative difference of its check against eager PyTorch (two "
        f"input sizes; each must be ≤ {DEPLOY_CHECK:.0e}).",
        "",
    ]
    for path in dict.fromkeys(r["path"] for r in rows):
        lines += _deploy_path_table(rows, path)
    for skipped in record.get("skipped", []):
        lines += [f"{skipped['path']}: not run ({skipped['reason']}).", ""]
    failures = record.get("failures", [])
    if failures:
        lines += [
            "Variants surgeon refused to build for their path (a bug to fix: the rest of the "
            "model, batch and path ran without them):",
            "",
            *(
                f"- {f['model']} at batch {f['batch']}, {f['path']}, {f['variant']}: "
                f"{f['error'].splitlines()[0]}"
                for f in failures
            ),
            "",
        ]
    lines += _deploy_profiles(record.get("profiles", []))
    lines += _deploy_rearrangements(record.get("spd_rearrangements", []))
    lines += _deploy_folds(record.get("folds", []))
    return lines


SECTIONS: list[Section] = [
    Section("layers", "## Replacement layers", "python scripts/bench_layers.py", render_layers),
    Section(
        "latency",
        "## Model latency: patched vs original",
        "python scripts/bench.py --only latency",
        render_latency,
    ),
    Section("cli", "## CLI wall time", "python scripts/bench.py --only cli", render_cli),
    Section(
        "scaling",
        "## Patch time vs graph size",
        "python scripts/bench.py --only scaling",
        render_scaling,
    ),
    Section("load", "## Checkpoint load time", "python scripts/bench.py --only load", render_load),
    Section(
        "polyphase",
        "## Polyphase sampling",
        "python scripts/bench_polyphase.py",
        render_polyphase,
    ),
    Section("heal", "## Heal", "python scripts/bench_heal.py", render_heal),
    Section(
        "deploy",
        "## Deployment paths",
        "python scripts/bench_deploy.py",
        render_deploy,
        combine_deploy,
    ),
    Section("cuda", "## CUDA", "python scripts/bench_cuda.py", render_cuda),
]


def render_benchmarks(current: str, directory: Path = BENCH_RECORDS) -> str:
    """docs/benchmarks.md from the records in `directory`; staleness judged against `current`."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python scripts/pages.py` (`make docs`) from the records in "
        "`records/bench/` ([their format](records/README.md)): do not edit by hand. Every "
        "number on this page "
        "comes from a record; each section names the command, commit and machine that made "
        "it. Timings are interleaved across the variants compared, and ratios use the best "
        "(or median, where said) of the rounds: on a shared machine other processes only ever "
        "add time.",
        "",
        judged_line(current),
        "",
    ]
    for section in SECTIONS:
        paths = part_paths(section.name, directory) if section.combine else []
        if len(paths) > 1 or (paths and paths[0] != record_path(section.name, directory)):
            parts = [(p.name, read_record(p) or {}) for p in paths]
            lines += render_parts(section, parts, current)
            continue
        path = paths[0] if paths else record_path(section.name, directory)
        lines += render_section(section, read_record(path), current)
    return "\n".join(lines).rstrip("\n") + "\n"
