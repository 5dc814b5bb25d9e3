"""The training engine that heal (and search) run on: one process or many, resumable.

    dist = init_distributed("cuda")           # WORLD_SIZE/RANK/LOCAL_RANK from torchrun, if set
    trainer = Trainer(model, objective, TrainConfig(steps=1000, batch_size=64), dist)
    summary = trainer.fit(dataset)            # trainer.load_state() first to resume

- **Processes.** The same code runs alone or under `torchrun --nproc-per-node N ...` (and
  across machines through torchrun's rendezvous): `init_distributed` reads `WORLD_SIZE`,
  `RANK` and `LOCAL_RANK`, starts a process group (gloo on CPU, nccl on CUDA) and the model is
  wrapped in DistributedDataParallel; a DistributedSampler gives each process its share of
  every epoch. `batch_size` is per process. Only rank 0 logs and writes files.
- **Optimisation.** AdamW (no weight decay on biases and norm parameters), learning rate
  warmed up linearly then cosine-annealed to zero, gradients clipped by global norm, bf16
  autocast where the device supports it (fp16 with a gradient scaler on older GPUs, float32 on
  CPU unless asked), channels_last memory, optionally `torch.compile`.
- **State checkpoints.** Every `state_every` steps rank 0 writes `state.pt` atomically (a
  temporary file fsynced and renamed over the old one): the model, optimizer, scheduler and
  scaler states, every process's RNG states (Python, NumPy, torch CPU and CUDA), the epoch and
  the batch within it. `Trainer.load_state()` before `fit` continues from it; on CPU the
  resumed run ends with weights bit-identical to an uninterrupted run, because each image's
  augmentation is seeded by (seed, epoch, index) (`surgeon.data.SampleKey`) and the sampler
  skips the batches done.
- **Faults.** A NaN or inf loss (or gradient norm, outside fp16) on any process stops every
  process before the optimizer step with a `TrainingError`; the last state checkpoint is
  never touched by the failing step.
- **Logs.** A rich progress bar (loss, teacher–student top-1 agreement, images/s, ETA) and a
  JSONL file with one line per logged step (the means over the steps since the last line)
  and per evaluation.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from surgeon.data import (
    FailureCount,
    ImageBatch,
    ImageDataset,
    ImageIndex,
    SampleKey,
    collate_images,
    index_images,
)
from surgeon.errors import SurgeonError, TrainingError, UsageError

__all__ = [
    "STATE_FILE",
    "Distributed",
    "Objective",
    "Precision",
    "StepOutput",
    "StepStats",
    "TrainConfig",
    "TrainSummary",
    "Trainer",
    "channels_height_width",
    "evaluating",
    "init_distributed",
    "launch_rank",
    "model_input_size",
    "resolve_precision",
    "seed_everything",
    "set_train_mode",
    "shared_index",
]

STATE_FILE = "state.pt"
STATE_FORMAT = "surgeon-train-state"
Precision = Literal["bf16", "fp16", "fp32"]
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# ---------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: world size, ranks, device, backend (None alone)."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str | None
    owns_group: bool = False  # this call started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over processes in place (a no-op alone)."""
        if self.backend is not None:
            torch_dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.backend is not None:
            torch_dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every process (pickled between our own processes)."""
        if self.backend is None:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order, on rank 0 (an empty list elsewhere)."""
        if self.backend is None:
            return [value]
        boxes: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(value, boxes, dst=0)
        return boxes or []

    def close(self) -> None:
        """End the process group if `init_distributed` started it."""
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(device: str | None = None) -> Distributed:
    """Join the torchrun process group described by the environment, or run alone.

    `device` is "cpu", "cuda" or "cuda:N" (None: CUDA when available). Under torchrun each
    process takes the GPU `LOCAL_RANK`. A process group the caller already started is used
    as it is (and left running)."""
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {wanted}: no CUDA device is available; use --device cpu")
    dev = torch.device(wanted)
    if dev.type == "cuda":
        if world > 1:
            dev = torch.device("cuda", local)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world == 1 and not torch_dist.is_initialized():
        return Distributed(1, 0, 0, dev, None)
    owns = False
    if not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend)
        owns = True
    backend = str(torch_dist.get_backend())
    return Distributed(
        torch_dist.get_world_size(), torch_dist.get_rank(), local, dev, backend, owns
    )


def launch_rank() -> int:
    """This process's rank under torchrun (0 alone), before any process group exists (to
    check an output path once, on the process that will write it)."""
    return _env_int("RANK", 0)


def shared_index(data: str | Path | ImageIndex, labels: bool, dist: Distributed) -> ImageIndex:
    """The index of an image folder: rank 0 reads and hashes it once, the others get its
    index (or its error). An `ImageIndex` is used as it is."""
    if isinstance(data, ImageIndex):
        if labels and data.labels is None:
            raise UsageError("labels=True needs an index made with index_images(..., labels=True)")
        return data
    outcome: ImageIndex | SurgeonError | None = None
    if dist.is_main:
        try:
            outcome = index_images(data, labels=labels)
        except SurgeonError as exc:
            outcome = exc
    outcome = dist.broadcast(outcome)
    if isinstance(outcome, SurgeonError):
        raise outcome
    assert outcome is not None
    return outcome


def channels_height_width(size: Sequence[int]) -> tuple[int, int, int]:
    """`size` as a (C, H, W) tuple, or a UsageError."""
    if len(size) != 3 or any(int(s) < 1 for s in size):
        raise UsageError(f"input size {tuple(size)} must be channels x height x width")
    return (int(size[0]), int(size[1]), int(size[2]))


def model_input_size(model: nn.Module, given: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The input size to train at: `given`, else the model's timm config, else 3×224×224."""
    if given is not None:
        return given
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return channels_height_width(cfg["input_size"])
    return (3, 224, 224)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """ "auto" → bf16 on a CUDA device that supports it, fp16 on an older GPU, fp32 on CPU
    (CPU bf16 is only faster on CPUs with native bf16, which torch gives no public test for:
    ask for it with "bf16")."""
    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise UsageError(f"precision {requested!r} must be auto, bf16, fp16 or fp32")
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise UsageError("fp16 training needs a CUDA device; use bf16 or fp32 on CPU")
        return requested  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block, then every submodule back in the mode it was in
    (`model.train(True)` would also wake the BatchNorm layers that `freeze_bn` keeps still)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode, except BatchNorm layers when `freeze_bn`: they normalise with their
    running statistics and leave them as they are (their affine parameters still train)."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, _NORMS):
                module.eval()


# ---------------------------------------------------------------------------------------------
# What a caller supplies, and what it gets back
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepOutput:
    """What an objective returns for one batch: the loss to backpropagate, its named parts
    (detached scalars, averaged over the batch) and, for classifiers, how many images the
    student and teacher give the same top-1 class (None otherwise)."""

    loss: Tensor
    parts: Mapping[str, Tensor]
    agree: Tensor | None = None


class Objective(Protocol):
    """The loss of one batch given the (wrapped) model: heal's distillation, search's, ..."""

    def __call__(self, model: nn.Module, batch: ImageBatch) -> StepOutput: ...


@dataclass(frozen=True)
class TrainConfig:
    """How to train; `batch_size` is per process."""

    steps: int
    batch_size: int
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: 5% of the steps
    grad_clip: float | None = 5.0
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    freeze_bn: bool = False
    state_every: int = 200
    log_every: int = 10
    eval_every: int | None = None
    workers: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "state_every", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise UsageError("eval-every must be at least 1")
        if self.lr <= 0:
            raise UsageError(f"lr must be positive, got {self.lr}")
        if self.workers < 0:
            raise UsageError("workers must be 0 or more")

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.steps)
        return round(0.05 * self.steps)


@dataclass(frozen=True)
class StepStats:
    """One step's numbers summed over processes: images used, the summed loss parts (divide
    by `images` for means), agreeing images (None without logits), failed decodes."""

    images: int
    sums: dict[str, float]
    agree: int | None
    failed: tuple[int, ...] = ()


@dataclass
class TrainSummary:
    """What a finished run did."""

    steps: int
    epochs: float
    images_seen: int
    seconds: float
    images_per_s: float
    final: dict[str, float]  # means over the last logged window: loss parts, agreement
    resumed_from: int | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    failed_images: int = 0


# ---------------------------------------------------------------------------------------------
# The sampler: DistributedSampler order, keyed for seeded augmentation, skippable for resume
# ---------------------------------------------------------------------------------------------


class KeyedSampler(Sampler[SampleKey]):
    """DistributedSampler's order for one epoch as SampleKeys, starting `skip` samples in."""

    def __init__(self, inner: DistributedSampler[Any], epoch: int, seed: int, skip: int) -> None:
        self.inner, self.epoch, self.seed, self.skip = inner, epoch, seed, skip
        inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        for i in itertools.islice(iter(self.inner), self.skip, None):
            yield SampleKey(int(i), self.epoch, self.seed)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Trains `model` in place on an objective; see the module docstring.

    `fingerprint` is what must be equal for a state checkpoint to be resumed (the caller adds
    e.g. the data hash; the learning rate may change); `evaluate(model) -> dict` runs on
    rank 0 every `eval_every` steps."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainConfig,
        dist: Distributed,
        *,
        state_dir: Path | None = None,
        log_file: Path | None = None,
        fingerprint: Mapping[str, Any] | None = None,
        evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
        console: Console | None = None,
        progress: bool = True,
        name: str = "heal",
    ) -> None:
        self.config = config
        self.name = name  # the progress bar's label
        self.dist = dist
        self.objective = objective
        self.state_dir = state_dir
        self.log_file = log_file
        self.evaluate = evaluate
        self.console = console
        self.show_progress = progress
        self.fingerprint = {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "world_size": dist.world_size,
            "weight_decay": config.weight_decay,
            "seed": config.seed,
            **dict(fingerprint or {}),
        }
        self.precision = resolve_precision(config.precision, dist.device)
        self.module = model.to(dist.device)
        if config.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        set_train_mode(self.module, config.freeze_bn)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise UsageError("the model has no trainable parameters (requires_grad is off)")
        wrapped: nn.Module = self.module
        if dist.backend is not None:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.module, device_ids=ids)
        if config.compile:
            wrapped = torch.compile(wrapped)  # type: ignore[assignment]
        self.wrapped = wrapped
        decay = [p for p in self.params if p.dim() > 1]
        plain = [p for p in self.params if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": plain, "weight_decay": 0.0},
            ],
            lr=config.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._last_batch: ImageBatch | None = None
        self._saved_step: int | None = None
        # what the caller wants back from a resumed run (e.g. metrics measured before step 1)
        self.state_extra: dict[str, Any] = {}

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over `warmup` steps, then a cosine from 1 to 0 at the last step."""
        warmup, total = self.config.warmup, self.config.steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # --- one step -------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of this run's precision (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def to_device(self, batch: ImageBatch) -> ImageBatch:
        images = batch.images.to(self.dist.device, non_blocking=True)
        if self.config.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch.labels.to(self.dist.device, non_blocking=True)
        return ImageBatch(images, labels, batch.positions, batch.failed)

    def train_step(self, batch: ImageBatch) -> StepStats:
        """Forward, backward and (unless the loss is not finite) an optimizer step on one batch.

        A batch whose every image failed to decode still takes part (the other processes wait
        for its gradients): the previous batch is run again with weight 0."""
        weight = 1.0
        if batch.images.numel() == 0:
            if self._last_batch is None:
                raise TrainingError(
                    "every image of the first batch failed to decode; remove the unreadable "
                    "images or use a larger --batch-size"
                )
            batch, weight = self._last_batch._replace(failed=batch.failed), 0.0
        else:
            self._last_batch = batch
        batch = self.to_device(batch)
        with self.autocast():
            out = self.objective(self.wrapped, batch)
        loss = out.loss * weight
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        bad = ~torch.isfinite(out.loss.detach())
        if self.scaler is None:
            bad = bad | ~torch.isfinite(norm)
        images = int(batch.images.shape[0] * weight)
        names = sorted(out.parts)
        values = [bad.float(), torch.tensor(float(images), device=self.dist.device)]
        values += [out.parts[n].float() * images for n in names]
        if out.agree is not None:
            values.append(out.agree.float() * weight)
        stats = self.dist.all_reduce(torch.stack([v.to(self.dist.device) for v in values]))
        numbers = stats.tolist()
        if numbers[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            parts = ", ".join(f"{n} {float(out.parts[n]):.4g}" for n in names if n != "loss")
            where = (
                f"the last state checkpoint is {self.state_dir / STATE_FILE} (step "
                f"{self._saved_step}); resume it with a lower --lr"
                if self.state_dir is not None and self._saved_step is not None
                else "no state checkpoint was written yet; try a lower --lr"
            )
            raise TrainingError(
                f"the loss is {float(out.loss.detach()):.4g} at step {self.step + 1}"
                f"{f' ({parts})' if parts else ''}; training stopped before the update, {where}"
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = int(numbers[1])
        sums = dict(zip(names, numbers[2 : 2 + len(names)], strict=True))
        agree = int(numbers[2 + len(names)]) if out.agree is not None else None
        return StepStats(total, sums, agree, batch.failed)

    # --- state checkpoints ----------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = tuple(np.random.get_state(legacy=True))
        keys = np.asarray(keys)
        cuda = (
            torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None
        )
        return {
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": cuda,
        }

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        random.setstate(_as_tuples(state["python"]))
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.dist.device)

    def _position(self, per_epoch: int) -> tuple[int, int]:
        """(epoch, batch in epoch) of the next batch."""
        if self.batch_in_epoch >= per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch_in_epoch

    def save_state(self, per_epoch: int, extra: Mapping[str, Any] | None = None) -> None:
        """Write the state checkpoint (rank 0; every process contributes its RNG states)."""
        rngs = self.dist.gather(self._rng_state())
        if not self.dist.is_main or self.state_dir is None:
            return
        epoch, batch = self._position(per_epoch)
        state = {
            "format": STATE_FORMAT,
            "version": 1,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "extra": dict(extra or {}),
        }
        _atomic_save(state, self.state_dir / STATE_FILE)
        self._saved_step = self.step

    def load_state(self) -> dict[str, Any]:
        """Restore the state checkpoint on every process; its `extra` record is returned."""
        state: dict[str, Any] | None = None
        if self.dist.is_main:
            state = read_state(self.state_dir)
            self._check_fingerprint(state)
        state = self.dist.broadcast(state)
        assert state is not None
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._set_rng_state(state["rng"][self.dist.rank])
        self.step = int(state["step"])
        # the learning rate may change on resume (the way out of a diverged run): the
        # schedule keeps its shape and position, scaled to the new peak
        self.scheduler.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * self._lr_factor(self.step)
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._saved_step = self.step
        return dict(state["extra"])

    def _check_fingerprint(self, state: Mapping[str, Any]) -> None:
        recorded = state.get("fingerprint", {})
        for key, value in self.fingerprint.items():
            if recorded.get(key) != value:
                raise TrainingError(
                    f"the state checkpoint in {self.state_dir} was written with {key} "
                    f"{recorded.get(key)!r}, this run has {value!r}; resume with the same "
                    "options and data, or start over without --resume"
                )

    # --- the loop -------------------------------------------------------------------------

    def loader(self, dataset: ImageDataset, epoch: int, skip_batches: int) -> DataLoader[Any]:
        """The data loader of one epoch, starting `skip_batches` batches in."""
        inner: DistributedSampler[Any] = DistributedSampler(
            dataset,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            shuffle=True,
            seed=self.config.seed,
        )
        skip = skip_batches * self.config.batch_size
        sampler = KeyedSampler(inner, epoch, self.config.seed, skip)
        workers = self.config.workers
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_images,
            drop_last=True,
            pin_memory=self.dist.device.type == "cuda",
            # worker seeds come from here, not from the global RNG, which resuming must not
            # disturb; the augmentation itself is seeded per image (SampleKey)
            generator=torch.Generator().manual_seed(self.config.seed + 7919 * epoch),
            prefetch_factor=4 if workers > 0 else None,
        )

    def check_fresh(self) -> None:
        """Refuse to start over on top of an earlier run's state checkpoint."""
        if self.step == 0 and self.dist.is_main and self.state_dir is not None:
            existing = self.state_dir / STATE_FILE
            if existing.exists():
                raise TrainingError(
                    f"{existing} holds the state of an earlier run; pass --resume to continue "
                    "it, or remove it to start over"
                )

    def fit(self, dataset: ImageDataset, *, failures: FailureCount | None = None) -> TrainSummary:
        """Train from the current step (0, or where `load_state` left off) to `config.steps`
        over `dataset`, epoch after epoch."""
        from surgeon.data import steps_per_epoch

        config = self.config
        per_epoch = steps_per_epoch(len(dataset), config.batch_size, self.dist.world_size)
        if per_epoch < 1:
            raise UsageError(
                f"{len(dataset)} training images are less than one batch of "
                f"{config.batch_size} on each of {self.dist.world_size} process(es); "
                "lower --batch-size or add images"
            )
        self.check_fresh()
        set_train_mode(self.module, config.freeze_bn)
        resumed_from = self.step if self.step > 0 else None
        log = _JsonLog(self.log_file if self.dist.is_main else None, truncate_after=self.step)
        window = _Window()
        summary = TrainSummary(0, 0.0, 0, 0.0, 0.0, {}, resumed_from)
        started = time.perf_counter()
        images_seen = 0
        show = self.show_progress and self.dist.is_main
        with _ProgressBar(
            self.console, config.steps, self.step, enabled=show, name=self.name
        ) as bar:
            while self.step < config.steps:
                for batch in self.loader(dataset, self.epoch, self.batch_in_epoch):
                    stats = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    images_seen += stats.images
                    window.add(stats)
                    if failures is not None and stats.failed:
                        failures.add(stats.failed)
                    bar.update(self.step, window)
                    if self.step % config.log_every == 0 or self.step == config.steps:
                        summary.final = window.means()
                        record = {"step": self.step, "epoch": self._epochs(per_epoch)}
                        record["lr"] = float(self.scheduler.get_last_lr()[0])
                        log.write({**record, **window.record()})
                        window = _Window(window.last_time)
                    if (
                        self.evaluate is not None
                        and config.eval_every is not None
                        and self.step % config.eval_every == 0
                        and self.step < config.steps
                    ):
                        self._evaluate(log, summary)
                    if self.step % config.state_every == 0 and self.step < config.steps:
                        failed = sorted(failures.failed) if failures is not None else []
                        self.save_state(per_epoch, {**self.state_extra, "failed": failed})
                    if self.step >= config.steps:
                        break
                if self.batch_in_epoch >= per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        summary.steps = self.step
        summary.epochs = self._epochs(per_epoch)
        summary.images_seen = images_seen
        summary.seconds = time.perf_counter() - started
        summary.images_per_s = images_seen / summary.seconds if summary.seconds > 0 else 0.0
        summary.failed_images = len(failures) if failures is not None else 0
        self.module.eval()
        return summary

    def _epochs(self, per_epoch: int) -> float:
        return round(self.epoch + self.batch_in_epoch / per_epoch, 4)

    def _evaluate(self, log: _JsonLog, summary: TrainSummary) -> None:
        assert self.evaluate is not None
        if self.dist.is_main:
            with self.autocast(), evaluating(self.module):
                result = {"step": self.step, **self.evaluate(self.module)}
            summary.evaluations.append(result)
            log.write({"eval": result})
        self.dist.barrier()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary sibling, fsync, rename over `path`: a kill at any moment
    leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_state(state_dir: Path | None) -> dict[str, Any]:
    """The state checkpoint in `state_dir` (loaded with weights_only=True), or a TrainingError."""
    if state_dir is None:
        raise UsageError("resuming needs a state directory")
    path = state_dir / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"no state checkpoint at {path}; run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports a damaged file with several exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TrainingError(
            f"cannot read the state checkpoint {path} ({type(exc).__name__}: {first}); "
            "remove it and start over without --resume"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a surgeon training state checkpoint")
    return state


def _as_tuples(value: Any) -> Any:
    """Python's random state with its lists made tuples again (it must be tuples)."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


class _Window:
    """Sums over the steps since the last log line."""

    def __init__(self, start: float | None = None) -> None:
        self.start = start if start is not None else time.perf_counter()
        self.last_time = self.start
        self.steps = 0
        self.images = 0
        self.sums: dict[str, float] = {}
        self.agree: int | None = None
        self.failed = 0
        self.last: dict[str, float] = {}

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.images += stats.images
        for k, v in stats.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if stats.agree is not None:
            self.agree = (self.agree or 0) + stats.agree
        self.failed += len(stats.failed)
        self.last_time = time.perf_counter()
        self.last = {k: v / max(1, stats.images) for k, v in stats.sums.items()}
        if stats.agree is not None:
            self.last["agreement"] = stats.agree / max(1, stats.images)

    def means(self) -> dict[str, float]:
        out = {k: v / max(1, self.images) for k, v in self.sums.items()}
        if self.agree is not None:
            out["agreement"] = self.agree / max(1, self.images)
        return out

    def images_per_s(self) -> float:
        elapsed = self.last_time - self.start
        return self.images / elapsed if elapsed > 0 else 0.0

    def record(self) -> dict[str, Any]:
        return {
            **{k: round(v, 6) for k, v in self.means().items()},
            "images": self.images,
            "images_per_s": round(self.images_per_s(), 2),
            "failed": self.failed,
            "time": round(time.time(), 3),
        }


class _JsonLog:
    """The JSONL log (rank 0 only): one flushed line per record. Opened for a resumed run, it
    first drops lines past the resumed step, which the killed run logged but never saved."""

    def __init__(self, path: Path | None, *, truncate_after: int) -> None:
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after == 0:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    step = record.get("step", record.get("eval", {}).get("step", 0))
                    if step <= truncate_after:
                        kept.append(line)
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


class _ProgressBar:
    """The rich progress bar of rank 0: step of steps, loss, agreement, images/s, ETA."""

    def __init__(
        self, console: Console | None, total: int, start: int, *, enabled: bool, name: str
    ) -> None:
        self.progress: Progress | None = None
        if not enabled:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{name}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
        )
        self.task = self.progress.add_task(name, total=total, completed=start, metrics="")

    def __enter__(self) -> _ProgressBar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, step: int, window: _Window) -> None:
        if self.progress is None:
            return
        last = window.last
        metrics = f"loss {last.get('loss', float('nan')):.4f}"
        if "agreement" in last:
            metrics += f"  agree {100 * last['agreement']:.1f}%"
        metrics += f"  {window.images_per_s():.1f} img/s"
        self.progress.update(self.task, completed=step, metrics=metrics)
