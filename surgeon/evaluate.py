"""Evaluation: shift consistency, accuracy, latency, parameters and MACs of (patched) models.

`evaluate(["resnet18", "out/"])` gives one EvalResult per model; a target is a model spec or a
checkpoint directory written by `surgeon patch`. The measurements:

- **Shift consistency, crop protocol** (Zhang 2019, "Making Convolutional Networks
  Shift-Invariant Again"): each image is `max_shift` pixels larger than the model input; two
  crops at distinct random diagonal offsets (o, o) in [0, max_shift] are classified, and the
  metric is the fraction of images whose top-1 classes agree. The paper uses 32 px at 224 (a 256
  px image, the usual resize before the 224 crop); by default `max_shift` scales with the input,
  round(32·min(H, W)/224), at least 1.
- **Shift consistency, circular protocol**: the centre crop rolled (`torch.roll`) by two distinct
  random (dy, dx) in [0, max_shift]²: no content enters or leaves the image, so a network whose
  every layer commutes with circular shifts (circular padding, no stride or a shift-invariant
  downsampler, global pooling) scores exactly 1.
- **Softmax change**: the mean, over images, of the total-variation distance ½·Σ|p − p'| between
  the softmax of a crop at (o, o) and one shifted by one pixel diagonally: 0 = no change,
  1 = disjoint predictions.
- **Accuracy** on a torchvision `ImageFolder` directory (folder k in sorted order is class k of
  the model; ImageNet's validation set in the usual wnid layout matches torchvision and timm),
  with the model's own preprocessing.
- **Latency** at batch 1 (median of `latency_runs` after `warmup` calls), parameters, and MACs
  counted by `torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2).

Without data, consistency is measured on synthetic images: seeded Gaussian noise low-pass
filtered at three octaves (an approximately 1/f spectrum, like natural images), normalised per
image. They have no classes, so they say how stable the prediction is, not whether it is right.
Every random draw comes from a generator seeded by `seed`: the same call gives the same numbers.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from surgeon.errors import UsageError
from surgeon.submodules import count_params

__all__ = [
    "EvalOptions",
    "EvalProgress",
    "EvalResult",
    "Preprocessing",
    "ShiftConsistency",
    "accuracy",
    "count_macs",
    "default_max_shift",
    "evaluate",
    "evaluate_model",
    "measure_latency",
    "resolve_preprocessing",
    "shift_consistency",
    "synthetic_images",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Stage = Literal["load", "consistency", "accuracy", "latency"]


@dataclass(frozen=True)
class EvalProgress:
    """One progress step: `completed` of `total` units of `stage` done for `model`.

    Stages come in order load → consistency → accuracy (only with data) → latency; a stage
    starts with completed=0 and ends with completed=total.
    """

    model: str
    stage: Stage
    completed: int
    total: int


ProgressHook = Callable[[EvalProgress], None]


@dataclass(frozen=True)
class EvalOptions:
    """What to measure and how; the defaults finish in seconds for a ResNet-18 on 2 cores."""

    pairs: int = 64  # images (pairs of shifted views) for the consistency metrics
    max_shift: int | None = None  # None: round(32·min(H, W)/224), at least 1
    data: Path | None = None  # ImageFolder directory: accuracy, and consistency on its images
    limit: int | None = None  # accuracy on at most this many images (a seeded random subset)
    batch_size: int = 32
    latency_runs: int = 20
    warmup: int = 3
    threads: int | None = None  # torch.set_num_threads for the whole evaluation
    seed: int = 0
    input_size: tuple[int, ...] | None = None  # (C, H, W); None: the model's or checkpoint's
    pretrained: bool = False  # model specs only: the library's pretrained weights
    trust_import: tuple[str, ...] = ()  # checkpoints of `pkg.mod:factory` models to allow
    plugins: tuple[str, ...] = ()  # rewrite plugins a checkpoint may import
    baseline: bool = False  # also measure each checkpoint's original (unpatched) model
    baseline_weights: Path | None = None  # the original's weights file, where it has moved

    def __post_init__(self) -> None:
        for name in ("pairs", "batch_size", "latency_runs"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UsageError(f"warmup must be 0 or more, got {self.warmup}")
        if self.max_shift is not None and self.max_shift < 1:
            raise UsageError(f"max_shift must be at least 1 pixel, got {self.max_shift}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit must be at least 1 image, got {self.limit}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, got {self.threads}")
        if self.input_size is not None and (
            len(self.input_size) != 3 or any(s < 1 for s in self.input_size)
        ):
            raise UsageError(
                f"input size {self.input_size} must be channels x height x width, e.g. 3x224x224"
            )


@dataclass(frozen=True)
class ShiftConsistency:
    """Shift-consistency metrics over `pairs` images (see the module docstring)."""

    crop: float  # fraction of images whose top-1 agrees under two diagonal crop shifts
    circular: float  # the same under two circular shifts
    softmax_change: float  # mean total-variation distance of the softmax, one-pixel shift
    pairs: int
    max_shift: int


@dataclass(frozen=True)
class EvalResult:
    """Everything measured for one model; `to_dict()` is JSON-ready with stable names."""

    model: str  # as given: a spec or a checkpoint directory
    spec: str  # canonical spec of the (source) model, e.g. torchvision:resnet18
    policy: str | None  # a checkpoint's policy name; None for an unpatched model
    input_size: tuple[int, ...]
    params: int
    macs: int
    latency_ms: float
    threads: int
    consistency_crop: float
    consistency_circular: float
    softmax_change: float
    pairs: int
    max_shift: int
    consistency_data: str  # "synthetic" or the data directory
    accuracy_top1: float | None = None
    accuracy_top5: float | None = None
    accuracy_images: int = 0
    preprocessing: str = ""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data


@dataclass(frozen=True)
class Preprocessing:
    """How the model expects its images: the accuracy transform and its normalisation."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision InterpolationMode value: "bilinear", "bicubic", ...
    source: str  # where it came from, for the record
    transform: Callable[[Any], Tensor] = field(compare=False, repr=False)

    def shifted_transform(self, max_shift: int) -> Callable[[Any], Tensor]:
        """PIL image -> a tensor `max_shift` px larger than the input, for the crop protocol:
        resize the shorter side to min(H, W) + max_shift, centre crop, normalise."""
        from torchvision import transforms

        _, h, w = self.input_size
        return transforms.Compose(
            [
                transforms.Resize(
                    min(h, w) + max_shift,
                    interpolation=transforms.InterpolationMode(self.interpolation),
                ),
                transforms.CenterCrop((h + max_shift, w + max_shift)),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )


class ImageSequence(Protocol):
    """Anything indexable giving (C, H, W) tensors: a 4-D tensor, a map-style dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Tensor: ...


# ---------------------------------------------------------------------------------------------
# Measurements on an nn.Module
# ---------------------------------------------------------------------------------------------


def default_max_shift(height: int, width: int) -> int:
    """The crop protocol's shift range: Zhang's 32 px at 224, scaled to the input, at least 1."""
    return max(1, round(32 * min(height, width) / 224))


def synthetic_images(count: int, size: Sequence[int], *, seed: int = 0) -> Tensor:
    """`count` random smooth images of `size` (C, H, W), each normalised to mean 0, std 1.

    Gaussian noise drawn on grids 1/16, 1/8 and 1/4 of the image size, upsampled bicubically and
    summed with amplitudes 1, 1/2, 1/4: low-pass noise with an approximately 1/f spectrum.
    """
    c, h, w = (int(s) for s in size)
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, c, h, w)
    for factor, amplitude in ((16, 1.0), (8, 0.5), (4, 0.25)):
        grid = (math.ceil(h / factor) + 1, math.ceil(w / factor) + 1)
        noise = torch.randn(count, c, *grid, generator=gen)
        images += amplitude * F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
    flat = images.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return (images - mean) / std


def _logits(output: Any) -> Tensor:
    if not isinstance(output, Tensor):
        leaves, _ = tree_flatten(output)
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        if not tensors:
            raise UsageError("the model returned no tensor; eval needs class scores")
        output = tensors[0]
    if output.dim() != 2:
        raise UsageError(
            f"the model returned shape {tuple(output.shape)}; eval needs class scores "
            "(batch x classes), i.e. a classification model"
        )
    return output.float()


def _offsets(gen: torch.Generator, count: int, span: int) -> tuple[Tensor, Tensor]:
    """Two values per image in [0, span), uniform and distinct (span ≥ 2)."""
    first = torch.randint(0, span, (count,), generator=gen)
    second = (first + torch.randint(1, span, (count,), generator=gen)) % span
    return first, second


def shift_consistency(
    model: nn.Module,
    images: ImageSequence,
    input_size: Sequence[int],
    *,
    max_shift: int,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> ShiftConsistency:
    """Crop and circular shift consistency and the one-pixel softmax change of `model`.

    `images` must be at least `max_shift` px larger than `input_size` (H, W) in each dimension;
    larger images are centre-cropped to that first. `progress(done, total)` is called per batch.
    """
    h, w = (int(s) for s in input_size[-2:])
    m = int(max_shift)
    count = len(images)
    if m < 1:
        raise UsageError(f"max_shift must be at least 1 pixel, got {m}")
    if count < 1:
        raise UsageError("shift consistency needs at least one image")
    gen = torch.Generator().manual_seed(seed)
    a, b = _offsets(gen, count, m + 1)
    c = torch.where(a < m, a + 1, a - 1)  # one pixel diagonally from a, inside the range
    r1, r2 = _offsets(gen, count, (m + 1) ** 2)  # roll vectors, as indices into [0, m]²
    rolls = [(int(r) // (m + 1), int(r) % (m + 1)) for r in torch.stack([r1, r2], 1).flatten()]

    agree_crop = agree_circular = 0
    tv_total = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            batch = torch.stack([images[i] for i in range(start, stop)])
            big_h, big_w = batch.shape[-2:]
            if big_h < h + m or big_w < w + m:
                raise UsageError(
                    f"shift consistency with max_shift {m} needs images of at least "
                    f"{h + m}x{w + m}, got {big_h}x{big_w}"
                )
            top, left = (big_h - h - m) // 2, (big_w - w - m) // 2
            centre = batch[..., top + m // 2 : top + m // 2 + h, left + m // 2 : left + m // 2 + w]
            views = []
            for offsets in (a, b, c):
                views += [
                    batch[j - start, :, top + o : top + o + h, left + o : left + o + w]
                    for j, o in zip(range(start, stop), offsets[start:stop].tolist(), strict=True)
                ]
            for k in (0, 1):
                views += [
                    torch.roll(centre[j - start], rolls[2 * j + k], dims=(-2, -1))
                    for j in range(start, stop)
                ]
            with torch.inference_mode():
                logits = _logits(model(torch.stack(views)))
            n = stop - start
            la, lb, lc, lr1, lr2 = logits.split(n)
            agree_crop += int((la.argmax(1) == lb.argmax(1)).sum())
            agree_circular += int((lr1.argmax(1) == lr2.argmax(1)).sum())
            pa, pc = la.softmax(1).double(), lc.softmax(1).double()
            tv_total += float(0.5 * (pa - pc).abs().sum(1).sum())
            if progress is not None:
                progress(stop, count)
    finally:
        model.train(was_training)
    return ShiftConsistency(
        crop=agree_crop / count,
        circular=agree_circular / count,
        softmax_change=tv_total / count,
        pairs=count,
        max_shift=m,
    )


def accuracy(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float, int]:
    """(top-1, top-5, images) of `model` on a dataset of (image tensor, class index) pairs.

    With fewer than 5 classes top-5 is over all of them (so 1.0).
    """
    from torch.utils.data import DataLoader

    total = len(dataset)
    if total == 0:
        raise UsageError("no images to measure accuracy on")
    correct1 = correct5 = done = 0
    was_training = model.training
    model.eval()
    try:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            with torch.inference_mode():
                logits = _logits(model(images))
            if int(labels.max()) >= logits.shape[1]:
                raise UsageError(
                    f"the data has class index {int(labels.max())} but the model has only "
                    f"{logits.shape[1]} outputs; folder k (sorted) must be class k of the model"
                )
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(1).sum())
            done += len(labels)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)
    return correct1 / total, correct5 / total, total


def count_macs(model: nn.Module, example: tuple[Any, ...]) -> int:
    """Multiply-accumulates of one forward pass on `example`, by FlopCounterMode (FLOPs / 2)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(*example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def measure_latency(
    model: nn.Module,
    example: tuple[Any, ...],
    *,
    runs: int = 20,
    warmup: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Median wall time of one forward pass on `example`, in milliseconds, after `warmup` calls.

    Runs in the current thread setting (`torch.get_num_threads()`)."""
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(*example)
            for i in range(runs):
                start = time.perf_counter()
                model(*example)
                times.append(time.perf_counter() - start)
                if progress is not None:
                    progress(i + 1, runs)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1000.0


@contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Preprocessing and data
# ---------------------------------------------------------------------------------------------


def _default_preprocessing(input_size: tuple[int, int, int]) -> Preprocessing:
    from torchvision import transforms

    c, h, w = input_size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if c == 3:
        mean, std, label = IMAGENET_MEAN, IMAGENET_STD, "ImageNet mean/std"
    else:
        mean, std, label = (0.5,) * c, (0.5,) * c, "mean 0.5, std 0.5"
    steps: list[Any] = [] if c == 3 else [transforms.Grayscale(c)]
    steps += [
        transforms.Resize(int(min(h, w) / 0.875)),
        transforms.CenterCrop((h, w)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ]
    source = f"default: resize to size/0.875, centre crop, {label}"
    return Preprocessing(input_size, mean, std, "bilinear", source, transforms.Compose(steps))


def resolve_preprocessing(model: nn.Module, spec: str, input_size: Sequence[int]) -> Preprocessing:
    """The model's own evaluation preprocessing at `input_size` (C, H, W).

    timm: `resolve_data_config` + `create_transform` (crop_pct kept for other sizes);
    torchvision: the `transforms()` of the weights the spec names, else of the default weights
    (resize/crop ratio kept for other sizes);
    anything else: resize to size/0.875, centre crop, ImageNet mean and std.
    """
    c, h, w = (int(s) for s in input_size)
    size = (c, h, w)
    source, _, name = spec.partition(":")
    if c == 3 and source in ("timm", "hf-hub"):  # hub names are timm models
        import timm.data
        import timm.models

        config: dict[str, Any] = {}
        if getattr(model, "pretrained_cfg", None):
            config = timm.data.resolve_data_config({"input_size": size}, model=model)
        else:
            pretrained = timm.models.get_pretrained_cfg(name)
            config = timm.data.resolve_data_config(
                {"input_size": size},
                pretrained_cfg=pretrained.to_dict() if pretrained is not None else None,
            )
        interpolation = str(config.get("interpolation", "bilinear"))
        if interpolation not in ("nearest", "bilinear", "bicubic"):
            interpolation = "bilinear"
        return Preprocessing(
            size,
            tuple(float(v) for v in config["mean"]),
            tuple(float(v) for v in config["std"]),
            interpolation,
            f"timm data config (crop_pct {config.get('crop_pct')}, {interpolation})",
            timm.data.create_transform(**config),
        )
    if c == 3 and source == "torchvision":
        from torchvision import transforms
        from torchvision.models import get_model_weights

        architecture, _, tag = name.partition(".")  # resnet50.IMAGENET1K_V2: those weights
        try:
            weights = get_model_weights(architecture)[tag or "DEFAULT"]
            preset = weights.transforms()
            crop, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
            mean, std = tuple(preset.mean), tuple(preset.std)
            interpolation = str(preset.interpolation.value)
        except (ValueError, AttributeError, TypeError, IndexError, KeyError):
            return _default_preprocessing(size)
        label = f"torchvision {weights} transforms"
        if (h, w) == (crop, crop):
            return Preprocessing(size, mean, std, interpolation, label, preset)
        resized = round(min(h, w) * resize / crop)
        transform = transforms.Compose(
            [
                transforms.Resize(resized, interpolation=preset.interpolation),
                transforms.CenterCrop((h, w)),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )
        return Preprocessing(
            size, mean, std, interpolation, f"{label}, resize {resized} crop {h}x{w}", transform
        )
    return _default_preprocessing(size)


class _Files:
    """(path, class) pairs of an ImageFolder loaded with a transform; a seeded subset if asked."""

    def __init__(
        self,
        root: Path,
        transform: Callable[[Any], Tensor],
        *,
        limit: int | None,
        seed: int,
        channels: int,
    ) -> None:
        from torchvision.datasets import ImageFolder

        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, OSError) as exc:
            raise UsageError(
                f"cannot read {root} as an image folder ({exc}); "
                "expected one sub-directory of images per class"
            ) from exc
        samples = list(folder.samples)
        if limit is not None and limit < len(samples):
            gen = torch.Generator().manual_seed(seed)
            keep = sorted(torch.randperm(len(samples), generator=gen)[:limit].tolist())
            samples = [samples[i] for i in keep]
        self.samples = samples
        self.loader = folder.loader
        self.transform = transform
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.loader(path).convert(self.mode)), label


class _Images:
    """The image tensors of a _Files, without labels (what shift_consistency reads)."""

    def __init__(self, files: _Files) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        return self.files[index][0]


# ---------------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------------


def evaluate_model(
    model: nn.Module,
    input_size: Sequence[int],
    options: EvalOptions | None = None,
    *,
    name: str = "",
    spec: str = "",
    preprocessing: Preprocessing | None = None,
    progress: ProgressHook | None = None,
) -> EvalResult:
    """Measure an in-memory classification model at `input_size` (C, H, W).

    `preprocessing` is only needed with `options.data`; by default it is resolved from `spec`
    (`timm:...`, `torchvision:...`) or is the plain ImageNet one.
    """
    options = options or EvalOptions()
    c, h, w = (int(s) for s in input_size)
    label = name or spec or type(model).__name__
    m = options.max_shift or default_max_shift(h, w)

    def hook(stage: Stage) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(EvalProgress(label, stage, done, total))

    with _num_threads(options.threads) as threads:
        report = hook("consistency")
        if report is not None:
            report(0, options.pairs)
        top1 = top5 = None
        images_scored = 0
        if options.data is not None:
            if c not in (1, 3):
                raise UsageError(f"image folders need 1 or 3 input channels, the model has {c}")
            prep = preprocessing or resolve_preprocessing(model, spec, (c, h, w))
            shifted = _Files(
                options.data,
                prep.shifted_transform(m),
                limit=options.pairs,
                seed=options.seed,
                channels=c,
            )
            consistency = shift_consistency(
                model,
                _Images(shifted),
                (h, w),
                max_shift=m,
                seed=options.seed,
                batch_size=options.batch_size,
                progress=report,
            )
            report = hook("accuracy")
            files = _Files(
                options.data, prep.transform, limit=options.limit, seed=options.seed, channels=c
            )
            if report is not None:
                report(0, len(files))
            top1, top5, images_scored = accuracy(
                model, files, batch_size=options.batch_size, progress=report
            )
            data_label, prep_label = str(options.data), prep.source
        else:
            images = synthetic_images(options.pairs, (c, h + m, w + m), seed=options.seed)
            consistency = shift_consistency(
                model,
                images,
                (h, w),
                max_shift=m,
                seed=options.seed,
                batch_size=options.batch_size,
                progress=report,
            )
            data_label, prep_label = "synthetic", ""
        example = (torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(options.seed)),)
        report = hook("latency")
        if report is not None:
            report(0, options.latency_runs)
        macs = count_macs(model, example)
        latency = measure_latency(
            model, example, runs=options.latency_runs, warmup=options.warmup, progress=report
        )
    return EvalResult(
        model=label,
        spec=spec,
        policy=None,
        input_size=(c, h, w),
        params=count_params(model),
        macs=macs,
        latency_ms=latency,
        threads=threads,
        consistency_crop=consistency.crop,
        consistency_circular=consistency.circular,
        softmax_change=consistency.softmax_change,
        pairs=consistency.pairs,
        max_shift=m,
        consistency_data=data_label,
        accuracy_top1=top1,
        accuracy_top5=top5,
        accuracy_images=images_scored,
        preprocessing=prep_label,
        seed=options.seed,
    )


def _load_target(
    target: str | Path, options: EvalOptions
) -> tuple[nn.Module, str, str | None, tuple[int, ...]]:
    """(model, canonical spec, policy name or None, input size) of a spec or checkpoint dir.
    A healed checkpoint's policy reads `POLICY + heal`."""
    if Path(target).is_dir():
        from surgeon.checkpoint.files import read_manifest
        from surgeon.checkpoint.manifest import summarize
        from surgeon.checkpoint.restore import load_checkpoint

        model = load_checkpoint(target, trust_import=options.trust_import, plugins=options.plugins)
        info = summarize(read_manifest(Path(target)))
        task, size, policy, spec = info.task, info.input_size, info.policy, info.spec
        if "heal" in info.surgeries:
            policy = f"{policy} + heal"
    else:
        from surgeon.models import load_model

        loaded = load_model(str(target), pretrained=options.pretrained)
        model, task, size, policy, spec = (
            loaded.model,
            loaded.task,
            loaded.input_size,
            None,
            loaded.spec.text,
        )
    if task != "classification":
        raise UsageError(f"eval measures classifiers; {target} is a {task} model")
    return model, spec, policy, options.input_size or size


def evaluate(
    targets: Sequence[str | Path],
    options: EvalOptions | None = None,
    *,
    progress: ProgressHook | None = None,
) -> list[EvalResult]:
    """One EvalResult per target, in order: a model spec (`resnet18`, `timm:resnet18`) or a
    checkpoint directory written by `surgeon patch` or `surgeon heal` (rebuilt with
    `surgeon.load`). With `options.baseline` each checkpoint's original model (rebuilt with
    the weights it was patched from, `surgeon.checkpoint.restore.build_original`) comes first,
    once per distinct original, labelled `DIR (original)`."""
    options = options or EvalOptions()
    results = []
    originals: set[str] = set()
    for target in targets:
        if options.baseline and Path(target).is_dir():
            results += _baseline(Path(target), options, originals, progress)
        label = str(target)
        if progress is not None:
            progress(EvalProgress(label, "load", 0, 1))
        model, spec, policy, size = _load_target(target, options)
        if progress is not None:
            progress(EvalProgress(label, "load", 1, 1))
        result = evaluate_model(model, size, options, name=label, spec=spec, progress=progress)
        results.append(replace(result, policy=policy))
    return results


def _baseline(
    directory: Path, options: EvalOptions, seen: set[str], progress: ProgressHook | None
) -> list[EvalResult]:
    """The original model of a checkpoint, measured, unless an earlier target had the same."""
    from surgeon.checkpoint.files import read_manifest
    from surgeon.checkpoint.restore import build_original

    manifest = read_manifest(directory)
    key = json.dumps(manifest["model"], sort_keys=True)
    if key in seen:
        return []
    seen.add(key)
    label = f"{directory} (original)"
    if progress is not None:
        progress(EvalProgress(label, "load", 0, 1))
    loaded = build_original(
        manifest, weights_file=options.baseline_weights, trust_import=options.trust_import
    )
    if loaded.task != "classification":
        raise UsageError(f"eval measures classifiers; {directory} is a {loaded.task} model")
    size = options.input_size or tuple(int(s) for s in manifest["model"]["input_size"])
    if progress is not None:
        progress(EvalProgress(label, "load", 1, 1))
    spec = str(manifest["model"]["spec"])
    return [evaluate_model(loaded.model, size, options, name=label, spec=spec, progress=progress)]
