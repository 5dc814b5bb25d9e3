"""The `surgeon` command: parse arguments, call the library, render, map errors to exit codes."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from surgeon.errors import Argument, ExitCode, SurgeonError
from surgeon.models import DEFAULT_TAG

app = typer.Typer(
    name="surgeon",
    help="Find every strided convolution and pooling layer in a model and replace it by policy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # typer's plain help formatter, as Click CLIs print it: a flag is listed without a type.
    # The Rich help panels of the typer this project runs (0.29) print `<bool>` after every
    # flag (`--debug <bool>`, `--help <bool>`), as if each one took a value.
    rich_markup_mode=None,
)
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)
_state: dict[str, Any] = {"debug": False}

ModelArg = Annotated[
    str,
    typer.Argument(
        help="torchvision/timm name, with a pretrained tag if wanted (resnet50, "
        "resnet50.a1_in1k, torchvision:resnet50.IMAGENET1K_V2), hf-hub:ORG/NAME, "
        "package.module:factory, or a checkpoint directory written by `surgeon patch`."
    ),
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option("--input-size", help="Example input size, e.g. 3x224x224 (video: 3x16x112x112)."),
]
KwargOpt = Annotated[
    list[str] | None,
    typer.Option("--model-kwarg", help="key=value passed to the model factory (repeatable)."),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", help="State dict to load: .safetensors, or .pt/.pth (weights_only)."),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        metavar="[TAG]",
        help="Load the library's pretrained weights: the default ones, or those TAG names "
        "(IMAGENET1K_V2, a1_in1k). Read from the torch hub / Hugging Face caches, "
        "downloaded if missing.",
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed",
        help="Seed for the random initialisation of a model spec without weights options, "
        "and of new layers (patch) or of the shifts and images (eval).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TrustImportOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--trust-import",
        help="Allow a checkpoint to import this pkg.mod:factory model spec (repeatable).",
    ),
]
PluginOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--plugin", help="Import this module first; it may register replacements (repeatable)."
    ),
]

FLAGS = {
    "plugins": "--plugin",
    "kwargs": "--model-kwarg",
    "weights_override": "--weights",
    "class_map": "--class-map",
}
"""The flag of each Python argument an error names (`surgeon.errors.Argument`) whose flag is
not its name with dashes (`trust_import` -> `--trust-import`)."""


def flag(argument: Argument) -> str:
    """An argument named in an error, as this command line writes it."""
    return argument.flag(FLAGS.get(argument.name, "--" + argument.name.replace("_", "-")))


def _print_version(value: bool) -> None:
    if not value:
        return
    from surgeon.checkpoint.record import versions

    found = versions()
    out.print(f"surgeon {found.pop('surgeon')}", highlight=False)
    out.print(", ".join(f"{name} {version}" for name, version in found.items()), highlight=False)
    raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the versions of surgeon, torch, torchvision and timm, and exit.",
        ),
    ] = False,
) -> None:
    _state["debug"] = debug


def _resolve(
    model: str,
    input_size: str | None,
    kwargs: list[str] | None,
    weights: Path | None,
    pretrained: str | None,
    seed: int = 0,
    trust_import: list[str] | None = None,
    plugins: list[str] | None = None,
) -> tuple[Any, tuple[Any, ...]]:
    """The model a spec or checkpoint directory names (`surgeon.checkpoint.resolve`), said in
    one line on stderr, and its example inputs."""
    from surgeon.checkpoint.resolve import resolve_model
    from surgeon.models import example_inputs, parse_input_size, parse_kwargs

    size = parse_input_size(input_size) if input_size else None
    # torch hub announces a download on stdout; stdout carries only the command's output
    # (`surgeon scan m --pretrained --json > sites.json` must stay valid JSON)
    with contextlib.redirect_stdout(sys.stderr):
        resolved = resolve_model(
            model,
            kwargs=parse_kwargs(kwargs or []),
            pretrained=pretrained if pretrained is not None else False,
            weights=weights,
            seed=seed,
            trust_import=trust_import or (),
            plugins=plugins or (),
        )
    if size is not None:
        resolved.loaded.input_size = size
    err.print(resolved.describe(), style="dim", markup=False, highlight=False)
    return resolved, example_inputs(resolved.loaded.task, resolved.loaded.input_size)


@app.command()
def scan(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    model_kwarg: KwargOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
    json: JsonOpt = False,
) -> None:
    """List every strided convolution and pooling site the graph walker finds."""
    from surgeon.report import render_scan, scan_json
    from surgeon.scan import scan as run_scan

    resolved, args = _resolve(
        model, input_size, model_kwarg, weights, pretrained, 0, trust_import, plugin
    )
    result = run_scan(resolved.model, args)
    if json:
        out.print_json(scan_json(result, model=resolved.label))
    else:
        render_scan(result, out, title=f"{resolved.label} sites")


PolicyOpt = Annotated[
    str,
    typer.Option(
        "--policy", "-p", help="Built-in policy name (see `surgeon policies`) or a YAML file."
    ),
]
FoldForOpt = Annotated[
    str | None,
    typer.Option(
        "--fold-for",
        help="With --fold: the backend the forms are timed on: eager, inductor (torch.compile) "
        "or onnxruntime (patch: eager; export: where the format runs).",
    ),
]
FoldInteriorOpt = Annotated[
    bool,
    typer.Option(
        "--fold-interior-only",
        help="With --fold: also fold reflect/replicate blur + 1x1 conv into one zero-padded "
        "conv, exact only away from the borders.",
    ),
]


def _default_out(model: str, policy: str) -> Path:
    """out/MODEL-POLICY for a spec; DIR-POLICY beside a checkpoint DIR patched again."""
    from surgeon.checkpoint.resolve import is_checkpoint

    stem = Path(policy).stem if policy.endswith((".yaml", ".yml")) else policy
    if is_checkpoint(model):
        source = Path(model).resolve()
        return source.with_name(f"{source.name}-{stem}")
    return Path("out") / f"{model.replace(':', '-').replace('/', '-')}-{stem}"


@app.command()
def patch(
    model: ModelArg,
    policy: PolicyOpt,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Checkpoint directory to write (default: out/MODEL-POLICY)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing checkpoint.")] = False,
    report_file: Annotated[
        Path | None,
        typer.Option("--report", help="Also write the report: FILE.md, FILE.json or FILE.html."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the diff and write --report; no checkpoint."),
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="A rule that matches no site is an error.")
    ] = False,
    plugin: PluginOpt = None,
    seed: SeedOpt = 0,
    output_stride: Annotated[
        int | None,
        typer.Option(
            "--output-stride", help="Target output stride for the `dilate` action (8, 16)."
        ),
    ] = None,
    input_size: InputSizeOpt = None,
    model_kwarg: KwargOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    fold: Annotated[
        bool,
        typer.Option(
            "--fold",
            help="Rewrite the replacement layers into the exact forms fastest on --fold-for "
            "(recorded).",
        ),
    ] = False,
    allow_unchanged: Annotated[
        bool,
        typer.Option(
            "--allow-unchanged",
            help="Write the checkpoint even when the policy changes nothing.",
        ),
    ] = False,
    trust_import: TrustImportOpt = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every site, runs of global pools included.")
    ] = False,
    fold_for: FoldForOpt = None,
    fold_interior_only: FoldInteriorOpt = False,
    json: JsonOpt = False,
) -> None:
    """Rewrite MODEL by POLICY, print the layer-by-layer diff and write the patched checkpoint.

    MODEL may be a checkpoint: the new surgery is appended to its history."""
    from surgeon.api import save
    from surgeon.patch import patch as run_patch
    from surgeon.patch import resolve_policy
    from surgeon.report import patch_json, render_patch, unchanged_reason, write_report
    from surgeon.rewrites import load_plugin

    for name in plugin or []:
        load_plugin(name)
    resolved = resolve_policy(policy)
    if output_stride is not None:
        from surgeon.rewrites import action_schemas

        schema = action_schemas()["dilate"]
        resolved = resolved.with_params("dilate", {"output_stride": output_stride}, schema)
    target = out_dir or _default_out(model, policy)
    # every output is probed before the model is built: a bad path fails in a second
    if report_file is not None:
        from surgeon.report import check_report_path

        check_report_path(report_file)
    if not dry_run:
        from surgeon.checkpoint import check_writable

        check_writable(target, force=force)
    source, args = _resolve(
        model, input_size, model_kwarg, weights, pretrained, seed, trust_import, plugin
    )
    history = source.history()
    patched, report = run_patch(
        source.model, resolved, args, strict=strict, seed=seed, model_name=source.label
    )
    if json:
        out.print_json(patch_json(report))
    elif render_patch(report, out, show_all=show_all):
        out.print("--all lists the global pools summarised above", style="dim")
    if report_file is not None:  # a report is not a checkpoint: written in a dry run too
        write_report(report, report_file)
    if dry_run:
        if not report.changed:
            err.print(unchanged_reason(report, resolved, history), highlight=False, markup=False)
        wrote = f"; wrote {report_file}" if report_file is not None else ""
        err.print(f"dry run: no checkpoint written{wrote}", highlight=False)
        return
    record = None
    if fold:
        from surgeon.fold import fold as fold_layers

        patched, record = fold_layers(
            patched, args, backend=fold_for or "eager", interior_only=fold_interior_only
        )
        err.print(record.summary(), highlight=False)
    if not report.changed and (record is None or not record.folded):
        reason = unchanged_reason(report, resolved, history)
        if not allow_unchanged:
            reason += "; no checkpoint written (--allow-unchanged writes one)"
        err.print(reason, highlight=False, markup=False)
        if not allow_unchanged:
            return
    written = save(
        target,
        patched,
        source.loaded,
        report,
        resolved.to_dict(),
        seed=seed,
        plugins=plugin or [],
        force=force,
        fold=record,
        history=history,
    )
    err.print(f"wrote {written}")


@app.command()
def info(
    directory: Annotated[
        Path, typer.Argument(help="A checkpoint directory written by `surgeon patch`.")
    ],
    json: JsonOpt = False,
) -> None:
    """Show what a patched checkpoint holds, surgery by surgery (reads only the manifest and
    checks the weights)."""
    import json as jsonlib

    from surgeon.checkpoint import read_checkpoint
    from surgeon.checkpoint.manifest import policy_name, summarize
    from surgeon.models import describe_weights
    from surgeon.patch import transfer_label

    manifest, state = read_checkpoint(directory)
    if json:
        out.print_json(jsonlib.dumps(manifest, sort_keys=True))
        return
    info = summarize(manifest)

    def say(text: str, **style: Any) -> None:
        out.print(text, highlight=False, markup=False, soft_wrap=True, **style)

    say(
        f"{directory}: {info.spec} patched with policy {info.policy} "
        f"(format version {info.format_version}; {' + '.join(info.surgeries)})"
    )
    say(
        f"  source: {info.spec} ({describe_weights(info.weights)}), "
        f"input {'x'.join(map(str, info.input_size))}, kwargs {dict(info.kwargs)}"
    )
    patches = [e for e in info.history if e["kind"] == "patch" and e.get("summary")]
    totals = ""
    if patches:
        first, last = patches[0]["summary"], patches[-1]["summary"]
        totals = (
            f"; params {first['params_before']:,} → {last['params_after']:,}, "
            f"MACs {first['macs_before']:,} → {last['macs_after']:,}"
        )
    say(f"  {len(state)} tensors, {sum(t.numel() for t in state.values()):,} values{totals}")
    say("  history:")
    for number, entry in enumerate(info.history, 1):
        if entry["kind"] == "patch":
            rows = entry.get("rows", [])
            say(
                f"    {number}. patch with policy {policy_name(entry)} (seed "
                f"{entry.get('seed', 0)}): {sum(r['status'] == 'patched' for r in rows)} sites "
                f"patched, {sum(r['status'] == 'skipped' for r in rows)} skipped"
            )
            for row in rows:
                if row["status"] == "patched":
                    label = transfer_label(row.get("transfer"), row.get("rel_diff"))
                    say(f"         {row['site']}: {row['replacement']} [{label}]")
        elif entry["kind"] == "fold":
            folded = [layer["name"] for layer in entry["layers"] if layer["form"] != "kept"]
            backend = f" for {entry['backend']}" if entry.get("backend") else ""
            say(
                f"    {number}. folded (patch --fold): {len(folded)} of {len(entry['layers'])} "
                f"layers rewritten{backend}: {', '.join(folded) or 'none'}"
            )
        elif entry["kind"] == "heal":
            say(f"    {number}. {_heal_line(entry)}")
        else:
            say(f"    {number}. {entry['kind']} ({entry.get('created', '')})")
    say(f"  written {info.created} with {dict(info.versions)}", style="dim")


def _heal_line(entry: Mapping[str, Any]) -> str:
    """One line for a heal entry of a checkpoint's history."""
    data, before, after = entry["data"], entry["before"], entry["after"]

    def pct(metrics: Mapping[str, Any], key: str) -> str:
        return f"{100 * metrics[key]:.1f}%" if key in metrics else "—"

    return (
        f"healed ({entry['created']}): {entry['steps']} steps of {entry['batch_size']} x "
        f"{entry['world_size']} on {data['images']} images (sha256 {data['sha256'][:12]}...); "
        f"agreement {pct(before, 'agreement')} → {pct(after, 'agreement')}, consistency (crop) "
        f"{pct(before, 'consistency_crop')} → {pct(after, 'consistency_crop')}"
    )


@app.command()
def load(
    directory: Annotated[
        Path, typer.Argument(help="A checkpoint directory written by `surgeon patch`.")
    ],
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
) -> None:
    """Rebuild the patched model from a checkpoint and check that it runs."""
    from surgeon.api import load as load_checkpoint
    from surgeon.checkpoint.files import read_manifest
    from surgeon.checkpoint.manifest import summarize
    from surgeon.models import example_inputs
    from surgeon.submodules import count_params

    model_obj = load_checkpoint(directory, trust_import=trust_import or [], plugins=plugin or [])
    info = summarize(read_manifest(directory))
    import torch

    with torch.no_grad():
        model_obj(*example_inputs(info.task, info.input_size))
    params = count_params(model_obj)
    out.print(
        f"loaded {info.spec} patched with {info.policy}: "
        f"{type(model_obj).__name__}, {params:,} parameters, weights verified, forward pass ok"
    )


@app.command()
def upgrade(
    directory: Annotated[Path, typer.Argument(help="A version-1 checkpoint directory.")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write the upgraded checkpoint here (default: in place)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing checkpoint at --out.")
    ] = False,
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
) -> None:
    """Rewrite a version-1 checkpoint as version 2 (its edits recorded; same weights)."""
    from surgeon.api import upgrade as run_upgrade

    written = run_upgrade(
        directory, out_dir, force=force, trust_import=trust_import or [], plugins=plugin or []
    )
    err.print(f"wrote {written} (checkpoint format version 2)")


@app.command()
def heal(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint directory from `surgeon patch`.")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="Folder of images (any tree; ImageFolder with --labels).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Passes over the images (instead of --steps).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per step and process.")
    ] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, cosine).")] = 1e-4,
    labels: Annotated[
        bool, typer.Option("--labels", help="One folder per class: add cross-entropy.")
    ] = False,
    features: Annotated[
        bool, typer.Option("--features", help="Also match features at the patched sites.")
    ] = False,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Softmax temperature of the KL term.")
    ] = 2.0,
    freeze_bn: Annotated[
        bool, typer.Option("--freeze-bn", help="Keep BatchNorm statistics (see docs/heal.md).")
    ] = False,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda if available).")
    ] = None,
    precision: Annotated[
        str, typer.Option("--precision", help="auto, bf16, fp16 or fp32.")
    ] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the student.")] = False,
    eval_every: Annotated[
        int | None,
        typer.Option("--eval-every", help="Measure on the held-out images every K steps."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="State checkpoints and log (default: OUT.heal-state)."),
    ] = None,
    state_every: Annotated[
        int, typer.Option("--state-every", help="Steps between state checkpoints.")
    ] = 200,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last state checkpoint.")
    ] = False,
    teacher_weights: Annotated[
        Path | None,
        typer.Option("--teacher-weights", help="The original's weights file, if it has moved."),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers per process.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split and the batches.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing checkpoint.")] = False,
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
    json: JsonOpt = False,
) -> None:
    """Distil a patched checkpoint from its original model (no labels needed) and write it."""
    import json as jsonlib

    from surgeon.heal import HealOptions, default_state_dir, heal_checkpoint

    options = HealOptions(
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        labels=labels,
        freeze_bn=freeze_bn,
        device=device,
        precision=precision,
        compile=compile,
        eval_every=eval_every,
        state_dir=state_dir,
        state_every=state_every,
        resume=resume,
        workers=workers,
        seed=seed,
    )
    try:
        result = heal_checkpoint(
            checkpoint,
            data,
            out_dir,
            options,
            features=features,
            teacher_weights=teacher_weights,
            force=force,
            trust_import=trust_import or (),
            plugins=plugin or (),
            console=err,
        )
    except KeyboardInterrupt:
        states = state_dir or default_state_dir(out_dir)
        err.print(
            f"interrupted; {out_dir} was not written, and the last state checkpoint in "
            f"{states} (if any) is kept: run the same command with --resume to continue"
        )
        raise typer.Abort() from None  # exit code 130 (`main`)
    if not result.is_main:
        return
    if json:
        out.print_json(jsonlib.dumps(result.record()))
    else:
        _render_heal(result)
    err.print(f"wrote {out_dir}")


def _render_heal(result: Any) -> None:
    from rich.table import Table

    def pct(value: float | None) -> str:
        return f"{100 * value:.1f}%" if value is not None else "—"

    table = Table(header_style="bold", title=f"held-out images: {result.holdout_images}")
    for column in ("model", "agreement", "output error", "consistency (crop)", "(circular)"):
        table.add_column(column)
    table.add_column("accuracy")
    for name, m in (("original", result.teacher), ("patched", result.before)):
        table.add_row(name, *_heal_cells(m, pct))
    table.add_row("healed", *_heal_cells(result.after, pct))
    out.print(table)
    losses = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.losses.items()))
    out.print(
        f"{result.steps} steps, {result.epochs} epochs, {result.images} images "
        f"({result.images_skipped} skipped), {result.images_per_s:.1f} images/s; {losses}",
        style="dim",
        highlight=False,
    )


def _heal_cells(m: Any, pct: Any) -> list[str]:
    error = f"{m.output_error:.4f}" if m.output_error is not None else "—"
    return [
        pct(m.agreement),
        error,
        pct(m.consistency_crop),
        pct(m.consistency_circular),
        pct(m.accuracy),
    ]


@app.command(name="eval")
def eval_(
    targets: Annotated[
        list[str], typer.Argument(help="Model specs and/or checkpoint directories to compare.")
    ],
    data: Annotated[
        Path | None, typer.Option("--data", help="ImageFolder directory: accuracy on real images.")
    ] = None,
    pairs: Annotated[int, typer.Option("--pairs", help="Image pairs for shift consistency.")] = 64,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Accuracy on at most this many images.")
    ] = None,
    class_map: Annotated[
        Path | None,
        typer.Option(
            "--class-map",
            help="JSON file of class folder -> the model's class index, for --data folders "
            "that are some of the model's classes.",
        ),
    ] = None,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline",
            help="Before each checkpoint, the original it was patched from, with the same "
            "weights (--weights: with that file instead).",
        ),
    ] = False,
    latency_runs: Annotated[
        int, typer.Option("--latency-runs", help="Timed runs for the latency (0: skip it).")
    ] = 20,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads.")] = None,
    seed: SeedOpt = 0,
    input_size: InputSizeOpt = None,
    model_kwarg: KwargOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
    json: JsonOpt = False,
) -> None:
    """Compare models side by side: shift consistency, accuracy, latency, params and MACs.

    Model specs are built as `surgeon patch` builds them (random weights from --seed unless
    --weights or --pretrained); each row says which weights it measured."""
    import json as jsonlib

    from rich.progress import Progress
    from rich.table import Table

    from surgeon.evaluate import EvalOptions, EvalProgress, evaluate, read_class_map
    from surgeon.models import parse_input_size, parse_kwargs
    from surgeon.report import format_count

    options = EvalOptions(
        pairs=pairs,
        data=data,
        limit=limit,
        latency_runs=latency_runs,
        threads=threads,
        seed=seed,
        input_size=parse_input_size(input_size) if input_size else None,
        kwargs=parse_kwargs(model_kwarg or []),
        pretrained=pretrained if pretrained is not None else False,
        weights=weights,
        baseline=baseline,
        class_map=read_class_map(class_map) if class_map is not None else None,
        trust_import=tuple(trust_import or ()),
        plugins=tuple(plugin or ()),
    )
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)

        def step(p: EvalProgress) -> None:
            bar.update(
                task, description=f"{p.model}: {p.stage}", completed=p.completed, total=p.total
            )

        with contextlib.redirect_stdout(sys.stderr):  # torch hub's download notes
            results = evaluate(targets, options, progress=step)
    if json:
        out.print_json(jsonlib.dumps([r.to_dict() for r in results]))
        return

    def percent(value: float | None, digits: int = 2) -> str:
        return f"{100 * value:.{digits}f}%" if value is not None else "—"

    top5 = any(r.accuracy_top5 is not None for r in results)
    table = Table(header_style="bold")
    columns = ["model", "policy", "weights", "consistency (crop)", "consistency (circular)"]
    columns += ["softmax Δ", "top-1", *(["top-5"] if top5 else []), "latency ms", "params", "MACs"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(
            r.model,
            r.policy or "—",
            r.weights_label,
            percent(r.consistency_crop, 1),
            percent(r.consistency_circular, 1),
            f"{r.softmax_change:.4f}",
            percent(r.accuracy_top1),
            *([percent(r.accuracy_top5)] if top5 else []),
            f"{r.latency_ms:.1f}" if r.latency_ms is not None else "—",
            format_count(r.params),
            format_count(r.macs),
        )
    out.print(table)
    first = results[0]
    out.print(
        f"{first.pairs} pairs, max shift {first.max_shift}px, images: {first.consistency_data}",
        style="dim",
    )


@app.command()
def export(
    directory: Annotated[Path, typer.Argument(help="A checkpoint directory from `surgeon patch`.")],
    format: Annotated[
        str, typer.Option("--format", help="torchscript, onnx or exported-program.")
    ] = "onnx",
    out_file: Annotated[Path | None, typer.Option("--out", help="Output file.")] = None,
    fold: Annotated[
        bool,
        typer.Option(
            "--fold",
            help="First rewrite the replacement layers into the exact forms fastest where the "
            "format runs (onnx: ONNX Runtime).",
        ),
    ] = False,
    fold_for: FoldForOpt = None,
    fold_interior_only: FoldInteriorOpt = False,
    method: Annotated[
        str, typer.Option("--method", help="TorchScript only: script, trace, or auto.")
    ] = "auto",
    input_size: InputSizeOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
    json: JsonOpt = False,
) -> None:
    """Export a patched checkpoint and check it numerically against eager PyTorch."""
    import json as jsonlib

    from surgeon.export import export as run_export
    from surgeon.models import parse_input_size

    result = run_export(
        directory,
        format,
        out_file,
        input_size=parse_input_size(input_size) if input_size else None,
        fold_layers=fold,
        fold_backend=fold_for,
        interior_only=fold_interior_only,
        method=method,
        force=force,
        trust_import=trust_import or (),
        plugins=plugin or (),
    )
    if result.fold is not None:
        err.print(result.fold.summary(), highlight=False)
    if json:
        out.print_json(jsonlib.dumps(result.to_dict()))
    else:
        out.print(result.summary(), highlight=False)
        for note in result.notes:
            out.print(f"note: {note}", style="yellow", highlight=False)


@app.command()
def placements(
    model: ModelArg,
    count: Annotated[
        int | None,
        typer.Option("--count", help="Number of ×2 downsampling steps (default: as now)."),
    ] = None,
    list_all: Annotated[bool, typer.Option("--list", help="List every legal placement.")] = False,
    input_size: InputSizeOpt = None,
    model_kwarg: KwargOpt = None,
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
) -> None:
    """Count (or list) the legal placements of the downsampling layers of MODEL."""
    from surgeon.placements import PlacementSpace

    resolved, args = _resolve(model, input_size, model_kwarg, None, None, 0, trust_import, plugin)
    space = PlacementSpace.of(resolved.model, args)
    steps = count if count is not None else space.current.steps
    out.print(f"current placement ({space.current.steps} steps): {', '.join(space.current.layers)}")
    out.print(f"{space.count(steps)} legal placements with {steps} downsampling steps")
    if list_all:
        for placement in space.placements(steps):
            out.print("  " + ", ".join(placement.layers), highlight=False)


@app.command()
def search(
    model: ModelArg,
    data: Annotated[
        Path, typer.Option("--data", help="Folder of images (any tree; ImageFolder with --labels).")
    ],
    budget: Annotated[
        int, typer.Option("--budget", help="Training steps in all (at least one per candidate).")
    ],
    supernets: Annotated[
        int, typer.Option("--supernets", help="Supernets in the mixture (1: a single supernet).")
    ] = 4,
    top: Annotated[int, typer.Option("--top", help="Best placements to write as policies.")] = 3,
    max_placements: Annotated[
        int,
        typer.Option("--max-placements", help="Candidates at most (a seeded sample beyond)."),
    ] = 32,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the ranking (default: out/MODEL-search)."),
    ] = None,
    labels: Annotated[
        bool,
        typer.Option("--labels", help="One folder per class: add cross-entropy, rank by accuracy."),
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per step and process.")
    ] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, cosine).")] = 1e-4,
    balance: Annotated[
        float, typer.Option("--balance", help="Weight of the assignment's balance penalty.")
    ] = 1.0,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda if available).")
    ] = None,
    precision: Annotated[
        str, typer.Option("--precision", help="auto, bf16, fp16 or fp32.")
    ] = "auto",
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="State checkpoints and log (default: OUT.search-state)."),
    ] = None,
    state_every: Annotated[
        int, typer.Option("--state-every", help="Steps between state checkpoints.")
    ] = 200,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last state checkpoint.")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers per process.")] = 4,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for the sample, the split, the batches, the model.")
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier ranking.")] = False,
    input_size: InputSizeOpt = None,
    model_kwarg: KwargOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    trust_import: TrustImportOpt = None,
    plugin: PluginOpt = None,
    json: JsonOpt = False,
) -> None:
    """Rank where MODEL should downsample on your images (Balanced Mixture of SuperNets) and
    write the best placements as relocate policies."""
    import json as jsonlib

    from surgeon.checkpoint.atomic import check_writable
    from surgeon.search import RANKING_FILE, default_state_dir
    from surgeon.search import search as run_search
    from surgeon.training import launch_rank

    target = out_dir or _default_out(model, "search")
    if launch_rank() == 0:  # before the model is built: a bad path fails in a second
        check_writable(target, force=force, marker=RANKING_FILE)
    resolved, _ = _resolve(
        model, input_size, model_kwarg, weights, pretrained, seed, trust_import, plugin
    )
    loaded = resolved.loaded
    size = tuple(int(s) for s in loaded.input_size)
    if len(size) != 3:
        from surgeon.errors import UsageError

        raise UsageError(f"search needs a C x H x W input size; the model has {list(size)}")
    try:
        result = run_search(
            loaded.model,
            data,
            budget=budget,
            supernets=supernets,
            top=top,
            max_placements=max_placements,
            out=target,
            force=force,
            batch_size=batch_size,
            lr=lr,
            labels=labels,
            balance=balance,
            device=device,
            precision=precision,
            state_dir=state_dir,
            state_every=state_every,
            resume=resume,
            seed=seed,
            input_size=size,
            spec=loaded.spec.text,
            workers=workers,
            console=err,
        )
    except KeyboardInterrupt:
        states = state_dir or default_state_dir(target)
        err.print(
            f"interrupted; {target} was not written, and the last state checkpoint in "
            f"{states} (if any) is kept: run the same command with --resume to continue"
        )
        raise typer.Abort() from None  # exit code 130 (`main`)
    if not result.is_main:
        return
    if json:
        out.print_json(jsonlib.dumps(result.record()))
    else:
        _render_search(result)
    err.print(f"wrote {target}")


def _render_search(result: Any) -> None:
    from rich.table import Table

    from surgeon.ranking import ranking_rows

    table = Table(
        header_style="bold", title=f"{result.metric} on {result.holdout_images} held-out images"
    )
    for column in ("rank", "placement", "score", "MACs", "supernet", ""):
        table.add_column(column)
    for row in ranking_rows(result):
        table.add_row(*row)
    out.print(table)
    shares = ", ".join(f"{100 * s:.0f}%" for s in result.shares)
    out.print(
        f"{result.steps} steps, {result.supernets} supernet(s) (candidates per supernet: "
        f"{shares}), {result.images_per_s:.1f} images/s",
        style="dim",
        highlight=False,
    )


@app.command()
def policies() -> None:
    """List the built-in policies."""
    from surgeon.policy_loader import list_builtin_policies

    for name, description in list_builtin_policies():
        out.print(f"[bold]{name:12s}[/bold] {description}")


def _pretrained_alone(args: list[str]) -> list[str]:
    """`--pretrained` with no tag after it becomes `--pretrained DEFAULT`.

    typer has no options with an optional value, so this gives `--pretrained` Click's rule for
    them: the next word is its tag unless it starts with `-` or there is none."""
    normalised: list[str] = []
    for i, arg in enumerate(args):
        normalised.append(arg)
        if arg == "--pretrained" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            normalised.append(DEFAULT_TAG)
    return normalised


def _tag_taken(args: list[str]) -> str | None:
    """The word `--pretrained` took as its tag, if one followed it."""
    for i, arg in enumerate(args[:-1]):
        if arg == "--pretrained" and not args[i + 1].startswith("-"):
            return args[i + 1]
    return None


def _note(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Library warnings as one `note:` line on stderr (a version-1 checkpoint, for one)."""
    err.print(f"[yellow]note:[/yellow] {message}", highlight=False)


def main() -> None:
    """Entry point: run the app; SurgeonErrors become one line on stderr and an exit code."""
    import warnings

    args = sys.argv[1:]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _note
            app(args=_pretrained_alone(args), standalone_mode=False, prog_name="surgeon")
    except SurgeonError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(exc.render(flag))}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(ExitCode.INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as exc:  # the CLI's last line of defence: never a raw traceback
        # typer vendors click: a usage error (unknown option, bad value) is a TyperException
        # with click's format_message/exit_code
        if isinstance(exc, typer.TyperException) and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            see = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            message = exc.format_message().rstrip(".")
            tag = _tag_taken(args)
            if tag is not None and message.startswith("Missing argument"):
                see = (
                    f"; --pretrained read {tag!r} as its weights tag: put the model name "
                    "before --pretrained"
                )
            err.print(f"[bold red]error:[/bold red] {message}{see}", highlight=False)
            sys.exit(getattr(exc, "exit_code", ExitCode.USAGE_ERROR))
        if _state["debug"]:
            raise
        err.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback and please report it)",
            highlight=False,
        )
        sys.exit(ExitCode.USER_ERROR)


GC_THRESHOLD = 100_000
"""Allocations between young-generation garbage collections in the `surgeon` script."""


def entry() -> None:
    """The `surgeon` console script: `main`, then exit without the interpreter's teardown.

    With torch imported, Python's shutdown (releasing every module, tensor and cached kernel)
    is a noticeable part of a short command's time (docs/benchmarks.md, "CLI wall time"). Every
    file a command writes is closed (and fsynced) before it returns, so only the standard
    streams are left to flush. `--debug` tracebacks still propagate the usual way.

    Cyclic garbage is collected every `GC_THRESHOLD` allocations rather than Python's 700:
    importing torchvision and tracing a model create hundreds of thousands of objects that live
    to the end, and young-generation collections would re-scan them again and again; the
    process is short-lived either way."""
    gc.set_threshold(GC_THRESHOLD)
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # a message, as sys.exit("...") gives
            print(exc.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe (`surgeon scan m | head`) has nothing more to take
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(code)
