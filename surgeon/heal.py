"""Heal a patched model by distillation from its original: no labels needed.

    result = surgeon.heal(student, teacher, "photos/", steps=2000, batch_size=64, lr=1e-4)
    print(result.before.agreement, "→", result.after.agreement)

The student (the patched model) is trained in place to reproduce the teacher (the original
model) on the images of a folder, with `surgeon.distill.DistillLoss`: the KL divergence
between their temperature-softened outputs, plus cross-entropy with `labels=True` (an
ImageFolder layout) and feature matching at named modules with `features=[...]`. The teacher
is frozen, in eval mode, and runs under inference_mode; the student's BatchNorm layers train
unless `freeze_bn=True`. The run is the engine of `surgeon.training` (one process or many
under torchrun, resumable state checkpoints, NaN stops, progress bar, JSONL log), and a
held-out split of the images measures teacher–student top-1 agreement and shift consistency
before, during (`eval_every`) and after.

`heal_checkpoint` is what `surgeon heal CHECKPOINT --data DIR --out DIR2` runs: the student is
the patched checkpoint, the teacher the original rebuilt from its manifest (spec and recorded
weights), and the healed model is written as a checkpoint whose history gains a `heal` entry.

`docs/heal.md` explains the loss, the BatchNorm choice, the data, faults and resuming.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader

from surgeon.data import (
    FailureCount,
    ImageBatch,
    ImageDataset,
    ImageIndex,
    Sample,
    collate_images,
    model_preprocessing,
    split_holdout,
    steps_per_epoch,
    training_transform,
)
from surgeon.distill import (
    DistillLoss,
    FeatureTap,
    find_logits,
    floating_tensors,
    matching_outputs,
    normalised_mse,
    top1_agreement,
)
from surgeon.errors import CheckpointError, UsageError
from surgeon.evaluate import Preprocessing, default_max_shift, shift_consistency
from surgeon.training import (
    Distributed,
    StepOutput,
    TrainConfig,
    Trainer,
    channels_height_width,
    evaluating,
    init_distributed,
    launch_rank,
    model_input_size,
    seed_everything,
    shared_index,
)

__all__ = [
    "HEAL_LOG_FILE",
    "HealMetrics",
    "HealObjective",
    "HealOptions",
    "HealResult",
    "default_state_dir",
    "heal",
    "heal_checkpoint",
    "heal_markdown",
    "patched_sites",
    "run_heal",
]

HEAL_LOG_FILE = "heal-log.jsonl"
"""The JSONL training log, as the healed checkpoint keeps it (`log.jsonl` while training)."""
_HEALABLE = ("classification", "segmentation", "quantization")

_CONSISTENCY_IMAGES = 512


@dataclass(frozen=True)
class HealOptions:
    """Everything `heal` takes besides the models and the data (see `heal`'s arguments)."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    grad_clip: float | None = 5.0
    temperature: float = 2.0
    labels: bool = False
    label_weight: float = 1.0
    features: tuple[str, ...] = ()
    feature_weight: float = 1.0
    freeze_bn: bool = False
    device: str | None = None
    precision: str = "auto"
    compile: bool = False
    channels_last: bool = True
    eval_every: int | None = None
    holdout: float = 0.02
    state_dir: Path | None = None
    state_every: int = 200
    resume: bool = False
    log_every: int = 10
    workers: int = 4
    seed: int = 0
    input_size: tuple[int, int, int] | None = None
    spec: str = ""
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise UsageError("give either steps or epochs (exactly one), e.g. --steps 2000")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.warmup < 1.0:
            raise UsageError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.resume and self.state_dir is None:
            raise UsageError("resume needs the state directory of the run to continue")


@dataclass(frozen=True)
class HealMetrics:
    """A model measured on the held-out images: top-1 agreement with the teacher (or the
    normalised output error for models without class scores), shift consistency (crop and
    circular protocols of `surgeon.evaluate`) and, with labels, accuracy."""

    images: int
    agreement: float | None = None
    output_error: float | None = None
    consistency_crop: float | None = None
    consistency_circular: float | None = None
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class HealResult:
    """What a heal run did and measured; `record()` is the checkpoint history's heal entry."""

    steps: int
    epochs: float
    batch_size: int
    world_size: int
    images: int  # readable images in the data folder
    images_skipped: int  # failed the index check or a later decode
    data_sha256: str
    train_images: int
    holdout_images: int
    losses: dict[str, float]  # means over the last logged steps
    teacher: HealMetrics
    before: HealMetrics
    after: HealMetrics
    seconds: float
    images_per_s: float
    features: tuple[str, ...]
    options: dict[str, Any]
    resumed_from: int | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    log_file: Path | None = None
    is_main: bool = True  # False on the other processes of a torchrun run (they write nothing)

    def record(self) -> dict[str, Any]:
        """The JSON-ready heal record: data, steps, losses, metrics before and after."""
        return {
            "kind": "heal",
            "data": {
                "images": self.images,
                "skipped": self.images_skipped,
                "sha256": self.data_sha256,
                "train": self.train_images,
                "holdout": self.holdout_images,
            },
            "steps": self.steps,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "options": self.options,
            "features": list(self.features),
            "losses": {k: round(v, 6) for k, v in self.losses.items()},
            "teacher": self.teacher.to_dict(),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "seconds": round(self.seconds, 1),
            "images_per_s": round(self.images_per_s, 1),
            "resumed_from": self.resumed_from,
        }


class HealObjective:
    """Heal's loss for the engine: the teacher under inference_mode, then the student, then
    `DistillLoss` on their outputs, labels and tapped features."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: DistillLoss,
        *,
        labels: bool = False,
        features: Sequence[str] = (),
    ) -> None:
        self.teacher = teacher
        self.loss = loss
        self.labels = labels
        self.student_tap = FeatureTap(student, features) if features else None
        self.teacher_tap = FeatureTap(teacher, features) if features else None

    def __call__(self, model: nn.Module, batch: ImageBatch) -> StepOutput:
        with torch.inference_mode():
            teacher_out = self.teacher(batch.images)
        student_out = model(batch.images)
        try:
            terms = self.loss(
                student_out,
                teacher_out,
                labels=batch.labels if self.labels else None,
                student_features=self.student_tap.outputs if self.student_tap else None,
                teacher_features=self.teacher_tap.outputs if self.teacher_tap else None,
            )
        finally:
            for tap in (self.student_tap, self.teacher_tap):
                if tap is not None:
                    tap.clear()
        return StepOutput(terms.total, terms.parts(), top1_agreement(student_out, teacher_out))

    def close(self) -> None:
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.close()


def heal(
    student: nn.Module,
    teacher: nn.Module,
    data: str | Path | ImageIndex,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-4,
    labels: bool = False,
    features: Sequence[str] = (),
    device: str | None = None,
    compile: bool = False,
    freeze_bn: bool = False,
    eval_every: int | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    temperature: float = 2.0,
    precision: str = "auto",
    workers: int = 4,
    seed: int = 0,
    input_size: Sequence[int] | None = None,
    spec: str = "",
    progress: bool = True,
    console: Console | None = None,
    **more: Any,
) -> HealResult:
    """Train `student` in place to reproduce `teacher` on the images in `data`.

    - `data`: a folder of images (any tree; with `labels=True` one sub-folder per class), or
      an `ImageIndex` from `surgeon.data.index_images`.
    - `steps` or `epochs` (exactly one): the length of the run; `batch_size` is per process.
    - `features`: module names (e.g. the patched sites, `report.rows[i].site`) to match
      features at; each is moved up to the nearest enclosing module whose output has the
      same shape in both models.
    - `state_dir`: where state checkpoints (`state.pt`) and the JSONL log (`log.jsonl`) go;
      `resume=True` continues the run whose state is there.
    - `input_size` (C, H, W) and `spec` (`timm:...`, `torchvision:...`) choose the
      preprocessing; by default the teacher's timm config, else 3×224×224 with ImageNet
      statistics. `preprocessing` (a `surgeon.evaluate.Preprocessing`) replaces it: its
      `transform` for the held-out images, its size, statistics and interpolation for the
      training augmentation.
    - Further `HealOptions` fields (`weight_decay`, `warmup`, `grad_clip`, `label_weight`,
      `feature_weight`, `holdout`, `state_every`, `log_every`, `channels_last`) as keywords.

    Returns a `HealResult`; the student is left in eval mode on the training device, the
    teacher on it too, with its modes and requires_grad flags as they were. Under torchrun
    every process calls this; only rank 0 writes and logs."""
    options = HealOptions(
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        labels=labels,
        features=tuple(features),
        device=device,
        compile=compile,
        freeze_bn=freeze_bn,
        eval_every=eval_every,
        state_dir=Path(state_dir) if state_dir is not None else None,
        resume=resume,
        temperature=temperature,
        precision=precision,
        workers=workers,
        seed=seed,
        input_size=channels_height_width(input_size) if input_size is not None else None,
        spec=spec,
        **more,
    )
    return run_heal(student, teacher, data, options, progress=progress, console=console)


def run_heal(
    student: nn.Module,
    teacher: nn.Module,
    data: str | Path | ImageIndex,
    options: HealOptions,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> HealResult:
    """`heal` with its options as one record (what the checkpoint-level call passes on)."""
    dist = init_distributed(options.device)
    try:
        return _heal(student, teacher, data, options, dist, progress, console)
    finally:
        dist.close()


def _heal(
    student: nn.Module,
    teacher: nn.Module,
    data: str | Path | ImageIndex,
    options: HealOptions,
    dist: Distributed,
    progress: bool,
    console: Console | None,
) -> HealResult:
    index = shared_index(data, options.labels, dist)
    prep = options.preprocessing
    size = prep.input_size if prep is not None else model_input_size(teacher, options.input_size)
    if size[0] not in (1, 3):
        raise UsageError(f"image folders give 1 or 3 channels; the model takes {size[0]}")
    prep = prep or model_preprocessing(teacher, options.spec, size)
    train_positions, holdout_positions = split_holdout(len(index), options.holdout, options.seed)
    train_set = ImageDataset(index, train_positions, training_transform(prep), channels=size[0])
    per_epoch = steps_per_epoch(len(train_set), options.batch_size, dist.world_size)
    steps = options.steps or math.ceil((options.epochs or 0.0) * max(1, per_epoch))

    seed_everything(options.seed + dist.rank)
    teacher_modes = [(m, m.training) for m in teacher.modules()]
    teacher_grads = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher = teacher.to(dist.device).eval().requires_grad_(False)
    if options.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    student = student.to(dist.device)
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(dist.device)
    features: tuple[str, ...] = ()
    if options.features:
        features = tuple(matching_outputs(student, teacher, options.features, example))
        if not features:
            raise UsageError(
                f"no module at or above {', '.join(options.features)} has the same output "
                "shape in the student and the teacher; heal without features"
            )
    loss = DistillLoss(
        temperature=options.temperature,
        label_weight=options.label_weight,
        feature_weight=options.feature_weight,
    )
    objective = HealObjective(student, teacher, loss, labels=options.labels, features=features)
    state_dir = options.state_dir
    holdout = _HeldOut(
        index,
        holdout_positions,
        prep,
        size[0],
        options.workers,
        device=dist.device,
        channels_last=options.channels_last,
    )
    config = TrainConfig(
        steps=steps,
        batch_size=options.batch_size,
        lr=options.lr,
        weight_decay=options.weight_decay,
        warmup_steps=round(options.warmup * steps),
        grad_clip=options.grad_clip,
        precision=options.precision,
        channels_last=options.channels_last,
        compile=options.compile,
        freeze_bn=options.freeze_bn,
        state_every=options.state_every,
        log_every=options.log_every,
        eval_every=options.eval_every,
        workers=options.workers,
        seed=options.seed,
    )
    fingerprint = {
        "data_sha256": index.sha256,
        "temperature": options.temperature,
        "labels": options.labels,
        "features": list(features),
        "freeze_bn": options.freeze_bn,
        "holdout": options.holdout,
    }
    trainer = Trainer(
        student,
        objective,
        config,
        dist,
        state_dir=state_dir,
        log_file=state_dir / "log.jsonl" if state_dir is not None else None,
        fingerprint=fingerprint,
        evaluate=lambda model: holdout.measure(model, teacher, trainer.autocast).to_dict(),
        console=console,
        progress=progress,
    )
    failures = FailureCount(index)
    empty = HealMetrics(images=0)
    before = teacher_metrics = empty
    try:
        if options.resume:
            extra = trainer.load_state()
            failures.failed.update(int(i) for i in extra.get("failed", []))
            teacher_metrics = HealMetrics(**extra.get("teacher", {"images": 0}))
            before = HealMetrics(**extra.get("before", {"images": 0}))
        else:
            trainer.check_fresh()
            if dist.is_main:
                teacher_metrics = holdout.measure(teacher, teacher, trainer.autocast)
                before = holdout.measure(student, teacher, trainer.autocast)
            dist.barrier()
        trainer.state_extra = {"teacher": teacher_metrics.to_dict(), "before": before.to_dict()}
        summary = trainer.fit(train_set, failures=failures)
        after = empty
        if dist.is_main:
            after = holdout.measure(trainer.module, teacher, trainer.autocast)
    finally:
        objective.close()
        for module, mode in teacher_modes:
            module.training = mode
        for param, grad in teacher_grads:
            param.requires_grad_(grad)
        if options.channels_last:
            teacher.to(memory_format=torch.contiguous_format)
    student.eval()
    if options.channels_last:
        student.to(memory_format=torch.contiguous_format)
    recorded = {
        "lr": options.lr,
        "temperature": options.temperature,
        "labels": options.labels,
        "freeze_bn": options.freeze_bn,
        "precision": trainer.precision,
        "seed": options.seed,
        "holdout": options.holdout,
    }
    return HealResult(
        steps=summary.steps,
        epochs=summary.epochs,
        batch_size=options.batch_size,
        world_size=dist.world_size,
        images=len(index),
        images_skipped=len(index.unreadable) + len(failures),
        data_sha256=index.sha256,
        train_images=len(train_positions),
        holdout_images=len(holdout_positions),
        losses=summary.final,
        teacher=teacher_metrics,
        before=before,
        after=after,
        seconds=summary.seconds,
        images_per_s=summary.images_per_s,
        features=features,
        options=recorded,
        resumed_from=summary.resumed_from,
        evaluations=summary.evaluations,
        log_file=trainer.log_file,
        is_main=dist.is_main,
    )


def patched_sites(manifest: Mapping[str, Any]) -> list[str]:
    """The module paths of the sites every patch in a checkpoint's history replaced."""
    names: list[str] = []
    for entry in manifest.get("history", []):
        if entry.get("kind") == "patch":
            names += [r["site"] for r in entry.get("rows", []) if r.get("status") == "patched"]
    return list(dict.fromkeys(names))


def heal_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    options: HealOptions,
    *,
    features: bool = False,
    teacher_weights: str | Path | None = None,
    force: bool = False,
    trust_import: Collection[str] = (),
    plugins: Collection[str] = (),
    progress: bool = True,
    console: Console | None = None,
) -> HealResult:
    """Heal the patched model of `checkpoint` from its original and write the result to `out`.

    The teacher is rebuilt from the manifest (`surgeon.load_original`: the recorded spec and
    weights, `teacher_weights` for a file that moved, checked against the recorded SHA-256);
    `features=True` matches features at the sites the patches replaced. The input size and
    preprocessing come from the checkpoint's model. State checkpoints and the log go to
    `options.state_dir` (default: `OUT.heal-state` beside `out`), which is removed once the
    healed checkpoint is written: its manifest is the input's with a `heal` entry appended to
    `history` (`HealResult.record()` plus `created` and `versions`), `report.md` gains a heal
    section, and `heal-log.jsonl` holds the training log. Under torchrun only rank 0 writes."""
    from surgeon.checkpoint.files import check_writable, read_manifest, write_checkpoint
    from surgeon.checkpoint.record import versions
    from surgeon.checkpoint.resolve import load_original
    from surgeon.checkpoint.restore import load_checkpoint

    source, target = Path(checkpoint), Path(out)
    manifest = read_manifest(source)
    if manifest["format_version"] == 1:
        raise CheckpointError(
            f"{source} is a version-1 checkpoint, which does not record the original's "
            f"weights; run `surgeon upgrade {source}` first (then heal it with --teacher-weights "
            "FILE)"
        )
    info = manifest["model"]
    if info.get("task", "classification") not in _HEALABLE:
        raise UsageError(
            f"heal runs models that take one batch of images; {info['spec']} is a "
            f"{info['task']} model: heal its backbone from Python with surgeon.heal(...)"
        )
    size = tuple(int(s) for s in info["input_size"])
    if len(size) != 3:
        raise UsageError(f"heal needs a C x H x W input size; the checkpoint has {list(size)}")
    if launch_rank() == 0:
        check_writable(target, force=force)
    state_dir = options.state_dir or default_state_dir(target)
    options = replace(
        options,
        state_dir=state_dir,
        input_size=(size[0], size[1], size[2]),
        spec=options.spec or str(info["spec"]),
        features=tuple(patched_sites(manifest)) if features else options.features,
    )
    if features and not options.features:
        raise UsageError(f"{source} has no patched sites to match features at")
    student = load_checkpoint(source, trust_import=trust_import, plugins=plugins)
    teacher = load_original(
        source,
        weights_override=teacher_weights,
        trust_import=trust_import,
        override_name="teacher_weights",
    )
    result = run_heal(student, teacher.model, data, options, progress=progress, console=console)
    if not result.is_main:
        return result
    entry = {
        "kind": "heal",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **{k: v for k, v in result.record().items() if k != "kind"},
    }
    healed = {
        key: value
        for key, value in manifest.items()
        if key not in ("format", "format_version", "weights", "created")
    }
    healed["history"] = [*manifest["history"], entry]
    report = source / "report.md"
    before = report.read_text(encoding="utf-8").rstrip() + "\n\n" if report.is_file() else ""
    log = state_dir / "log.jsonl"
    files = {"report.md": before + heal_markdown(result)}
    if log.is_file():
        files[HEAL_LOG_FILE] = log.read_text(encoding="utf-8")
    write_checkpoint(target, student.state_dict(), healed, files, force=force)
    for name in ("state.pt", "log.jsonl"):
        (state_dir / name).unlink(missing_ok=True)
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
    return result


def default_state_dir(out: str | Path) -> Path:
    """Where `surgeon heal --out OUT` keeps its state checkpoints: `OUT.heal-state` beside it."""
    out = Path(out)
    return out.with_name(f"{out.name}.heal-state")


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "—"


def heal_markdown(result: HealResult) -> str:
    """The heal section of a healed checkpoint's report.md."""
    rows = [("teacher (original)", result.teacher), ("before", result.before)]
    rows.append(("after", result.after))
    lines = [
        "## Heal",
        "",
        f"Distilled from the original for {result.steps} steps ({result.epochs} epochs) of "
        f"{result.batch_size} images × {result.world_size} process(es) on {result.images} "
        f"images (data SHA-256 {result.data_sha256[:16]}..., {result.images_skipped} "
        f"skipped), {result.seconds:.0f} s, {result.images_per_s:.1f} images/s.",
        "",
        f"Measured on {result.holdout_images} held-out images:",
        "",
        "| model | top-1 agreement | output error | consistency (crop) | "
        "consistency (circular) | accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        error = f"{m.output_error:.4f}" if m.output_error is not None else "—"
        lines.append(
            f"| {name} | {_pct(m.agreement)} | {error} | {_pct(m.consistency_crop)} | "
            f"{_pct(m.consistency_circular)} | {_pct(m.accuracy)} |"
        )
    losses = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.losses.items()))
    lines += ["", f"Final training means: {losses or '—'}."]
    if result.features:
        lines.append(f"Features matched at: {', '.join(result.features)}.")
    return "\n".join(lines) + "\n"


class _OnDevice(nn.Module):
    """A model that takes CPU images and returns CPU float32 logits (for `shift_consistency`,
    which builds its shifted views on the CPU)."""

    def __init__(self, model: nn.Module, device: torch.device, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.channels_last = channels_last

    def forward(self, images: Tensor) -> Tensor:
        images = images.to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = find_logits(self.model(images))
        assert logits is not None
        return logits.float().cpu()


class _HeldOut:
    """The held-out images and how to measure a model on them against the teacher."""

    def __init__(
        self,
        index: ImageIndex,
        positions: Sequence[int],
        prep: Preprocessing,
        channels: int,
        workers: int,
        *,
        device: torch.device,
        channels_last: bool,
    ) -> None:
        _, h, w = prep.input_size
        self.device = device
        self.channels_last = channels_last
        self.size = (h, w)
        self.max_shift = default_max_shift(h, w)
        self.plain = ImageDataset(index, positions, prep.transform, channels=channels)
        self.shifted = ImageDataset(
            index, positions, prep.shifted_transform(self.max_shift), channels=channels
        )
        self.workers = workers
        self.labels = index.labels is not None
        self.item_of = {position: item for item, position in enumerate(positions)}

    def measure(self, model: nn.Module, teacher: nn.Module, autocast: Any) -> HealMetrics:
        """Agreement (or output error), consistency and accuracy of `model` (eval mode)."""
        if len(self.plain) == 0:
            return HealMetrics(images=0)
        device, channels_last = self.device, self.channels_last
        agree = correct = scored = 0
        error = 0.0
        good: list[int] = []
        has_logits = True
        loader = DataLoader(
            self.plain,
            batch_size=64,
            num_workers=min(self.workers, 2),
            collate_fn=collate_images,
        )
        with evaluating(model):
            with torch.inference_mode(), autocast():
                for batch in loader:
                    if batch.images.numel() == 0:
                        continue
                    images = batch.images.to(device)
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    s_out, t_out = model(images), teacher(images)
                    good += [self.item_of[int(p)] for p in batch.positions]
                    scored += len(batch.positions)
                    s, t = find_logits(s_out), find_logits(t_out)
                    if s is None or t is None:
                        has_logits = False
                        pairs = zip(floating_tensors(s_out), floating_tensors(t_out), strict=False)
                        error += float(
                            torch.stack([normalised_mse(a, b) for a, b in pairs]).mean()
                        ) * len(batch.positions)
                        continue
                    agree += int((s.argmax(-1) == t.argmax(-1)).sum())
                    if self.labels:
                        correct += int((s.argmax(-1).cpu() == batch.labels).sum())
            if scored == 0:
                return HealMetrics(images=0)
            if not has_logits:
                return HealMetrics(images=scored, output_error=error / scored)
            wrapped = _OnDevice(model, device, channels_last).eval()
            images = _Decoded(self.shifted, good[:_CONSISTENCY_IMAGES])
            with autocast():
                shifts = shift_consistency(
                    wrapped, images, self.size, max_shift=self.max_shift, seed=0, batch_size=64
                )
        return HealMetrics(
            images=scored,
            agreement=agree / scored,
            consistency_crop=shifts.crop,
            consistency_circular=shifts.circular,
            accuracy=correct / scored if self.labels else None,
        )


class _Decoded:
    """The images of an ImageDataset at some of its items, as the tensors shift_consistency
    indexes (items that failed to decode were left out beforehand)."""

    def __init__(self, dataset: ImageDataset, items: Sequence[int]) -> None:
        self.dataset = dataset
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Tensor:
        sample = self.dataset[self.items[k]]
        if not isinstance(sample, Sample):  # decoded before, so only a file changed under us
            raise UsageError(f"held-out image failed to decode: {sample.reason}")
        return sample.image
