"""Search where a model should downsample, on the user's images: a Balanced Mixture of
SuperNets (Javan et al., arXiv 2306.11982).

    result = surgeon.search(model, "photos/", budget=2000, supernets=4, out="search/")
    print(result.candidates[0].placement.layers)     # the best placement found

The candidates are the legal placements of the model's ×2 downsampling steps
(`PlacementSpace`), all of them or a seeded sample of `max_placements` that always keeps the
model's own placement. K supernets (copies of the model's weights whose strides move,
`surgeon.supernet`) train together: each step takes the next placement of a seeded shuffle of
the candidates (so a budget of at least one step per candidate visits every one), runs the K
supernets at that placement, and trains the one the placement is routed to (the learned
assignment, read through a capacity constraint) with the distillation loss of `surgeon heal`
(cross-entropy too with `labels=True`); the assignment then takes a gradient step on all K
losses plus a balance penalty (`update_assignment`, docs/search.md says why). The run is the
engine of `surgeon.training`: one process or many under torchrun, resumable state
checkpoints, a progress bar and a JSONL log.

At the end every candidate is scored on a held-out split with the weights of the supernet it
is routed to, after its BatchNorm statistics are re-estimated at that placement: top-1 agreement
with the original model (accuracy with labels). `write_search` writes the ranking (JSON,
Markdown, a PNG of score against MACs with the Pareto front, an HTML page) and the top
placements as `relocate` policies that `surgeon patch --policy FILE` applies as they are.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader

from surgeon.data import (
    FailureCount,
    ImageBatch,
    ImageDataset,
    ImageIndex,
    collate_images,
    model_preprocessing,
    split_holdout,
    training_transform,
)
from surgeon.distill import DistillLoss, find_logits, kd_loss, top1_agreement
from surgeon.errors import AnalysisError, UsageError
from surgeon.evaluate import count_macs
from surgeon.placements import Placement, PlacementSpace, placement_policy
from surgeon.ranking import (
    CandidateScore,
    SearchResult,
    pareto_front,
    ranking_html,
    ranking_markdown,
    ranking_png,
)
from surgeon.supernet import SupernetMixture, balance_penalty, update_assignment
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
    "ENUMERATION_LIMIT",
    "RANKING_FILE",
    "SEARCH_LOG_FILE",
    "SearchObjective",
    "SearchOptions",
    "candidate_placements",
    "default_state_dir",
    "placement_at",
    "recalibrate_batchnorm",
    "run_search",
    "search",
    "write_search",
]

RANKING_FILE = "ranking.json"
SEARCH_LOG_FILE = "search-log.jsonl"
ENUMERATION_LIMIT = 200_000
"""Spaces up to this many placements are listed and sampled uniformly; larger ones refused."""
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_HOLDOUT_LIMIT = 512  # every candidate is scored on the same held-out images


@dataclass(frozen=True)
class SearchOptions:
    """Everything `search` takes besides the model and the data (see `search`'s arguments)."""

    budget: int
    supernets: int = 4
    top: int = 3
    max_placements: int = 32
    steps: int | None = None  # ×2 downsampling steps of the placements (default: as built)
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    grad_clip: float | None = 5.0
    temperature: float = 2.0
    labels: bool = False
    assignment_lr: float = 1.0
    balance: float = 1.0
    calibration_batches: int = 4
    device: str | None = None
    precision: str = "auto"
    channels_last: bool = True
    holdout: float = 0.1
    state_dir: Path | None = None
    state_every: int = 200
    resume: bool = False
    log_every: int = 10
    workers: int = 4
    seed: int = 0
    input_size: tuple[int, int, int] | None = None
    spec: str = ""

    def __post_init__(self) -> None:
        for name in ("budget", "supernets", "top", "max_placements", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1")
        if self.calibration_batches < 0:
            raise UsageError("calibration-batches must be 0 or more")
        if self.assignment_lr <= 0 or self.balance < 0:
            raise UsageError("assignment-lr must be positive and balance 0 or more")
        if not 0.0 < self.holdout < 1.0:
            raise UsageError(f"holdout is a fraction in (0, 1), got {self.holdout}")
        if self.resume and self.state_dir is None:
            raise UsageError("resume needs the state directory of the run to continue")


# ---------------------------------------------------------------------------------------------
# Candidates and the order they are visited in


def candidate_placements(
    space: PlacementSpace, max_placements: int, seed: int, steps: int | None = None
) -> tuple[list[Placement], int]:
    """(candidates, size of the space): every legal placement with `steps` ×2 steps, or a seeded
    uniform sample of `max_placements` of them that keeps the model's own placement first."""
    steps = space.current.steps if steps is None else steps
    total = space.count(steps)
    if total > ENUMERATION_LIMIT:
        raise UsageError(
            f"the model has {total:,} legal placements of {steps} downsampling steps, more than "
            f"search can sample from ({ENUMERATION_LIMIT:,}); search a smaller model or a "
            "backbone stage from Python"
        )
    every = list(space.placements(steps))
    current = [p for p in every if p.layers == space.current.layers]
    others = [p for p in every if p.layers != space.current.layers]
    if len(every) <= max_placements:
        return current + others, total
    keep = max_placements - len(current)
    return current + random.Random(seed).sample(others, keep), total


def placement_at(step: int, count: int, seed: int) -> int:
    """The candidate trained at `step`: the candidates in a seeded shuffle, reshuffled after
    each pass, so that `count` steps visit every candidate once (the same on every process and
    after a resume)."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + step // count).shuffle(order)
    return order[step % count]


# ---------------------------------------------------------------------------------------------
# The training objective


class SearchObjective:
    """Search's loss for the engine: the step's placement on every supernet and the original
    (under inference_mode); the distillation loss of the supernet the placement is routed to
    (`SupernetMixture.assigned`) is the one trained; then the assignment takes its own step on
    every supernet's loss."""

    def __init__(
        self,
        mixture: SupernetMixture,
        teacher: nn.Module,
        loss: DistillLoss,
        dist: Distributed,
        *,
        labels: bool,
        assignment_lr: float,
        balance: float,
        seed: int,
    ) -> None:
        self.mixture = mixture
        self.teacher = teacher
        self.loss = loss
        self.dist = dist
        self.labels = labels
        self.assignment_lr = assignment_lr
        self.balance = balance
        self.seed = seed
        self.step = 0  # the engine calls the objective once per step; set on resume

    def __call__(self, model: nn.Module, batch: ImageBatch) -> StepOutput:
        index = placement_at(self.step, len(self.mixture.placements), self.seed)
        self.step += 1
        self.mixture.select(index)
        with torch.inference_mode():
            teacher_out = self.teacher(batch.images)
        outputs = model(batch.images)
        labels = batch.labels if self.labels else None
        terms = [self.loss(out, teacher_out, labels=labels) for out in outputs]
        losses = torch.stack([t.total for t in terms])
        route = self.mixture.assigned()[index]
        weights = torch.zeros_like(losses)
        weights[route] = 1.0  # the others stay in the graph at weight 0 (DDP needs every grad)
        total = (weights * losses).sum()
        shared = self.dist.all_reduce(losses.detach().float().clone()) / self.dist.world_size
        if bool(torch.isfinite(shared).all()):  # a NaN stops the engine before any update
            penalty = update_assignment(
                self.mixture.assignment,
                index,
                shared,
                lr=self.assignment_lr,
                balance=self.balance,
            )
        else:
            penalty = balance_penalty(self.mixture.probabilities())
        parts: dict[str, Tensor] = {}
        for name in terms[0].parts():
            parts[name] = sum(
                (w * t.parts()[name] for w, t in zip(weights.detach(), terms, strict=True)),
                torch.zeros((), device=losses.device),
            )
        parts["balance"] = penalty.to(losses.device)
        return StepOutput(total, parts, top1_agreement(outputs[route], teacher_out))


# ---------------------------------------------------------------------------------------------
# Scoring


def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Tensor]) -> None:
    """Re-estimate the running statistics of every BatchNorm layer from `batches` (a cumulative
    mean over them), as the placement being scored sees its maps: training mixed the statistics
    of every placement the supernet ran. Modes and momenta are left as they were."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms or not batches:
        return
    momenta = [m.momentum for m in norms]
    with evaluating(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for images in batches:
            model(images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


@dataclass
class _Scoring:
    """The held-out images (with the original's logits) and the calibration batches."""

    holdout: list[tuple[Tensor, Tensor, Tensor]]  # images, labels, teacher logits
    calibration: list[Tensor]
    labels: bool

    def measure(self, model: nn.Module) -> tuple[float, float | None, float]:
        """(agreement, accuracy, mean KL) of `model` (eval mode) on the held-out images."""
        agree = correct = seen = 0
        kl = 0.0
        with evaluating(model), torch.inference_mode():
            for images, labels, teacher in self.holdout:
                logits = find_logits(model(images))
                if logits is None:
                    raise AnalysisError("search needs a model that returns class scores")
                agree += int((logits.argmax(-1) == teacher.argmax(-1)).sum())
                correct += int((logits.argmax(-1).cpu() == labels).sum())
                kl += float(kd_loss(logits.float(), teacher.float(), 1.0)) * len(images)
                seen += len(images)
        return agree / seen, correct / seen if self.labels else None, kl / seen


def _scoring(
    index: ImageIndex,
    holdout: Sequence[int],
    train: Sequence[int],
    transform: Any,
    channels: int,
    teacher: nn.Module,
    options: SearchOptions,
    device: torch.device,
) -> _Scoring:
    def batches(positions: Sequence[int]) -> list[ImageBatch]:
        data = ImageDataset(index, positions, transform, channels=channels)
        loader = DataLoader(data, batch_size=64, collate_fn=collate_images)
        return [b for b in loader if b.images.numel() > 0]

    held = []
    with evaluating(teacher), torch.inference_mode():
        for b in batches(holdout):
            images = b.images.to(device)
            logits = find_logits(teacher(images))
            if logits is None:
                raise AnalysisError("search needs a model that returns class scores")
            held.append((images, b.labels, logits))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(options.seed))
    wanted = options.calibration_batches * options.batch_size
    calib = [train[int(i)] for i in order[:wanted]]
    calibration = [b.images.to(device) for b in batches(sorted(calib))]
    if not held:
        raise UsageError("no held-out image could be decoded; check --data")
    return _Scoring(held, calibration, options.labels)


# ---------------------------------------------------------------------------------------------
# The run


def search(
    model: nn.Module,
    data: str | Path | ImageIndex,
    *,
    budget: int,
    supernets: int = 4,
    top: int = 3,
    max_placements: int = 32,
    out: str | Path | None = None,
    force: bool = False,
    batch_size: int = 64,
    lr: float = 1e-4,
    labels: bool = False,
    device: str | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    input_size: Sequence[int] | None = None,
    spec: str = "",
    workers: int = 4,
    progress: bool = True,
    console: Console | None = None,
    **more: Any,
) -> SearchResult:
    """Rank the placements of `model`'s downsampling layers on the images in `data`.

    - `budget`: training steps in all (at least one per candidate); `batch_size` per process.
    - `supernets`: K, the mixture's size (1: one weight-sharing supernet, the paper's baseline).
    - `max_placements`: candidates at most (a seeded sample that keeps the model's own).
    - `out`: where `write_search` puts the ranking and the top `top` policies (rank 0 only);
      state checkpoints and the log go to `state_dir` (default `OUT.search-state` with `out`,
      none without either); `resume=True` continues the run whose state is there.
    - `input_size` (C, H, W) and `spec` choose the preprocessing as for `heal`.
    - Further `SearchOptions` fields (`steps`, `weight_decay`, `temperature`, `assignment_lr`,
      `balance`, `calibration_batches`, `holdout`, `state_every`, `log_every`, `precision`,
      `channels_last`) as keywords.

    `model` is the original the supernets (its copies) learn from: its weights, modes and
    requires_grad flags are left as they were, on the training device.
    Under torchrun every process calls this; only rank 0 scores and writes."""
    target = Path(out) if out is not None else None
    if state_dir is None and target is not None:
        state_dir = default_state_dir(target)
    options = SearchOptions(
        budget=budget,
        supernets=supernets,
        top=top,
        max_placements=max_placements,
        batch_size=batch_size,
        lr=lr,
        labels=labels,
        device=device,
        state_dir=Path(state_dir) if state_dir is not None else None,
        resume=resume,
        seed=seed,
        input_size=channels_height_width(input_size) if input_size is not None else None,
        spec=spec,
        workers=workers,
        **more,
    )
    if target is not None and launch_rank() == 0:
        from surgeon.checkpoint.atomic import check_writable

        check_writable(target, force=force, marker=RANKING_FILE)
    result = run_search(model, data, options, progress=progress, console=console)
    if target is not None and result.is_main:
        write_search(result, target, force=force)
    return result


def default_state_dir(out: str | Path) -> Path:
    """Where `surgeon search --out OUT` keeps its state checkpoints: `OUT.search-state`."""
    out = Path(out)
    return out.with_name(f"{out.name}.search-state")


def run_search(
    model: nn.Module,
    data: str | Path | ImageIndex,
    options: SearchOptions,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> SearchResult:
    """`search` with its options as one record; writes nothing but the state directory."""
    dist = init_distributed(options.device)
    try:
        return _search(model, data, options, dist, progress, console)
    finally:
        dist.close()


def _space(model: nn.Module, size: tuple[int, int, int], options: SearchOptions) -> Any:
    """The candidates and the space's size, or a one-line refusal (nothing to move, a budget
    too small to visit each candidate)."""
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    space = PlacementSpace.of(model, example)
    steps = options.steps if options.steps is not None else space.current.steps
    total = space.count(steps) if space.candidates else 0
    if total <= 1:
        raise UsageError(
            f"{type(model).__name__} has no downsampling that can move: {total} legal "
            f"placement{'s' if total != 1 else ''} of {steps} ×2 step(s) at input "
            f"{'x'.join(map(str, size))} (`surgeon placements MODEL` lists them); search needs "
            "a model with strided convolutions or pools and room to move them"
        )
    candidates, total = candidate_placements(space, options.max_placements, options.seed, steps)
    if options.budget < len(candidates):
        raise UsageError(
            f"a budget of {options.budget} steps cannot visit each of the {len(candidates)} "
            f"candidate placements once; give --budget {len(candidates)} or more, or fewer "
            "candidates with --max-placements"
        )
    return space, candidates, total


def _search(
    model: nn.Module,
    data: str | Path | ImageIndex,
    options: SearchOptions,
    dist: Distributed,
    progress: bool,
    console: Console | None,
) -> SearchResult:
    size = model_input_size(model, options.input_size)
    if size[0] not in (1, 3):
        raise UsageError(f"image folders give 1 or 3 channels; the model takes {size[0]}")
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()  # the original: tracing and teaching must not move its BatchNorm statistics
    try:
        return _search_from(model, size, data, options, dist, progress, console)
    finally:
        for module, mode in modes:
            module.training = mode
        for param, grad in grads:
            param.requires_grad_(grad)


def _search_from(
    teacher: nn.Module,
    size: tuple[int, int, int],
    data: str | Path | ImageIndex,
    options: SearchOptions,
    dist: Distributed,
    progress: bool,
    console: Console | None,
) -> SearchResult:
    space, candidates, total = _space(teacher, size, options)
    index = shared_index(data, options.labels, dist)
    prep = model_preprocessing(teacher, options.spec, size)
    limit = min(_HOLDOUT_LIMIT, max(1, len(index) // 2))
    train_positions, holdout_positions = split_holdout(
        len(index), options.holdout, options.seed, limit=limit
    )
    train_set = ImageDataset(index, train_positions, training_transform(prep), channels=size[0])

    seed_everything(options.seed + dist.rank)
    layers = [layer.name for layer in space.candidates]
    mixture = SupernetMixture(
        teacher, layers, candidates, supernets=options.supernets, seed=options.seed
    )
    mixture.to(dist.device)
    teacher = teacher.to(dist.device).requires_grad_(False)
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(dist.device)
    with torch.inference_mode():
        if find_logits(teacher(example)) is None:
            raise AnalysisError(
                f"{type(teacher).__name__} returns no class scores (a batch x classes tensor); "
                "search ranks classifiers: search the classifier around a backbone"
            )
    macs = []
    for i in range(len(candidates)):
        mixture.select(i)
        macs.append(count_macs(mixture.supernets[0], (example,)))
    loss = DistillLoss(temperature=options.temperature)
    objective = SearchObjective(
        mixture,
        teacher,
        loss,
        dist,
        labels=options.labels,
        assignment_lr=options.assignment_lr,
        balance=options.balance,
        seed=options.seed,
    )
    config = TrainConfig(
        steps=options.budget,
        batch_size=options.batch_size,
        lr=options.lr,
        weight_decay=options.weight_decay,
        warmup_steps=round(options.warmup * options.budget),
        grad_clip=options.grad_clip,
        precision=options.precision,
        channels_last=options.channels_last,
        state_every=options.state_every,
        log_every=options.log_every,
        workers=options.workers,
        seed=options.seed,
    )
    fingerprint = {
        "data_sha256": index.sha256,
        "temperature": options.temperature,
        "labels": options.labels,
        "holdout": options.holdout,
        "supernets": options.supernets,
        "placements": [" ".join(p.layers) for p in candidates],
        "assignment_lr": options.assignment_lr,
        "balance": options.balance,
    }
    state_dir = options.state_dir
    trainer = Trainer(
        mixture,
        objective,
        config,
        dist,
        state_dir=state_dir,
        log_file=state_dir / "log.jsonl" if state_dir is not None else None,
        fingerprint=fingerprint,
        console=console,
        progress=progress,
        name="search",
    )
    failures = FailureCount(index)
    try:
        if options.resume:
            extra = trainer.load_state()
            failures.failed.update(int(i) for i in extra.get("failed", []))
            objective.step = trainer.step
        else:
            trainer.check_fresh()
        summary = trainer.fit(train_set, failures=failures)
        ranked: list[CandidateScore] = []
        if dist.is_main:
            ranked = _rank_candidates(
                mixture, teacher, candidates, space, macs, index, train_positions,
                holdout_positions, prep.transform, size[0], options, dist.device,
            )  # fmt: skip
    finally:
        mixture.close()
    recorded = {
        "lr": options.lr,
        "temperature": options.temperature,
        "labels": options.labels,
        "assignment_lr": options.assignment_lr,
        "balance": options.balance,
        "calibration_batches": options.calibration_batches,
        "precision": trainer.precision,
        "seed": options.seed,
        "holdout": options.holdout,
        "max_placements": options.max_placements,
        "top": options.top,
    }
    return SearchResult(
        candidates=tuple(ranked),
        metric="accuracy" if options.labels else "agreement",
        space_size=total,
        sampled=len(candidates) < total,
        supernets=options.supernets,
        shares=tuple(mixture.shares()),
        balance=float(balance_penalty(mixture.probabilities())),
        steps=summary.steps,
        batch_size=options.batch_size,
        world_size=dist.world_size,
        images=len(index),
        data_sha256=index.sha256,
        train_images=len(train_positions),
        holdout_images=len(holdout_positions),
        seconds=summary.seconds,
        images_per_s=summary.images_per_s,
        options=recorded,
        losses=summary.final,
        resumed_from=summary.resumed_from,
        log_file=trainer.log_file,
        is_main=dist.is_main,
    )


def _rank_candidates(
    mixture: SupernetMixture,
    teacher: nn.Module,
    candidates: Sequence[Placement],
    space: PlacementSpace,
    macs: Sequence[int],
    index: ImageIndex,
    train: Sequence[int],
    holdout: Sequence[int],
    transform: Any,
    channels: int,
    options: SearchOptions,
    device: torch.device,
) -> list[CandidateScore]:
    """Every candidate scored with its most probable supernet, BatchNorm re-estimated at its
    placement (and put back afterwards), best first."""
    scoring = _scoring(index, holdout, train, transform, channels, teacher, options, device)
    assigned = mixture.assigned()
    probabilities = mixture.probabilities()
    rows = []
    for i, placement in enumerate(candidates):
        k = assigned[i]
        net = mixture.supernets[k]
        mixture.select(i)
        saved = {name: t.clone() for name, t in net.state_dict().items()}
        recalibrate_batchnorm(net, scoring.calibration)
        agreement, accuracy, kl = scoring.measure(net)
        net.load_state_dict(saved)
        score = accuracy if accuracy is not None else agreement
        rows.append((placement, k, float(probabilities[i, k]), score, agreement, accuracy, kl))
    front = pareto_front([(r[3], m) for r, m in zip(rows, macs, strict=True)])
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][3], rows[i][6], macs[i], i))
    return [
        CandidateScore(
            rank=rank,
            placement=rows[i][0],
            supernet=rows[i][1],
            probability=rows[i][2],
            score=rows[i][3],
            agreement=rows[i][4],
            accuracy=rows[i][5],
            kd=rows[i][6],
            macs=macs[i],
            default=rows[i][0].layers == space.current.layers,
            pareto=front[i],
        )
        for rank, i in enumerate(order, start=1)
    ]


# ---------------------------------------------------------------------------------------------
# Writing the ranking


def policy_yaml(candidate: CandidateScore) -> str:
    """The `relocate` policy of a ranked candidate, as YAML that `surgeon patch` reads."""
    policy = placement_policy(candidate.placement, name=f"search-rank-{candidate.rank}")
    data = policy.to_dict()
    header = (
        f"# surgeon search, rank {candidate.rank}: score {candidate.score:.4f}, "
        f"{candidate.macs:,} MACs\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def write_search(result: SearchResult, out: str | Path, *, force: bool = False) -> Path:
    """Write the ranking to the directory `out`, atomically: ranking.json, ranking.md,
    ranking.png, report.html, search-log.jsonl and policies/rank-N.yaml for the top N."""
    import json

    from surgeon.checkpoint.atomic import write_directory

    png = ranking_png(result)
    top = result.candidates[: int(result.options.get("top", 3))]

    def fill(tmp: Path) -> None:
        (tmp / RANKING_FILE).write_text(json.dumps(result.record(), indent=2) + "\n")
        (tmp / "ranking.md").write_text(ranking_markdown(result), encoding="utf-8")
        (tmp / "ranking.png").write_bytes(png)
        (tmp / "report.html").write_text(ranking_html(result, png), encoding="utf-8")
        (tmp / "policies").mkdir()
        for candidate in top:
            path = tmp / "policies" / f"rank-{candidate.rank}.yaml"
            path.write_text(policy_yaml(candidate), encoding="utf-8")
        if result.log_file is not None and result.log_file.is_file():
            (tmp / SEARCH_LOG_FILE).write_text(result.log_file.read_text(encoding="utf-8"))

    written = write_directory(Path(out), fill, force=force, marker=RANKING_FILE)
    if result.log_file is not None:
        state_dir = result.log_file.parent
        for name in ("state.pt", "log.jsonl"):
            (state_dir / name).unlink(missing_ok=True)
        if state_dir.is_dir() and not any(state_dir.iterdir()):
            state_dir.rmdir()
    return written
