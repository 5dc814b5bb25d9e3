"""Image folders for training: indexing, hashing, decoding that survives bad files, transforms.

    index = index_images("photos/")                # any folder tree of images, no labels
    index = index_images("train/", labels=True)    # ImageFolder layout: one folder per class
    train, held_out = split_holdout(len(index), fraction=0.02, seed=0)
    dataset = ImageDataset(index, train, training_transform(preprocessing))

**Files.** Every file under the root whose suffix is an image format PIL reads (`.jpg`,
`.jpeg`, `.png`, `.webp`, `.bmp`, `.gif`, `.tif`, `.tiff`, `.ppm`, `.pgm`, `.pbm`, any case),
hidden files and folders skipped, in sorted order of relative path. With `labels=True` the
root must hold one folder per class (sorted: folder k is class k, as torchvision's
`ImageFolder`), and only images inside them count.

**Content hash.** `ImageIndex.sha256` is the SHA-256 over, for every file in sorted order, its
relative path (UTF-8, `/` separators), a NUL byte and the SHA-256 of its bytes: it changes when
any file is added, removed, renamed or edited. The files are read once for it, on a few
threads, and each is checked by PIL (`Image.open` + `verify`) from the bytes just read.

**Bad files.** A file PIL cannot open or verify is left out of the index and counted
(`ImageIndex.unreadable`); one that passes the check but fails to decode later (a truncated
JPEG body) makes `ImageDataset` return a `DecodeFailure` marker instead of raising, which
`collate_images` drops and counts, so a DataLoader worker never dies on a bad image. An empty
folder, or more than 1% of the files failing (`MAX_FAILED_FRACTION`), is a `DataError`.

**Augmentation seeds.** `ImageDataset[SampleKey(item, epoch, seed)]` transforms the image
under RNGs seeded from that key alone (torch's and Python's, restored afterwards), so the
augmented batch is the same whichever worker decodes it, and a run resumed mid-epoch sees
exactly the images the uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from surgeon.errors import DataError
from surgeon.evaluate import Preprocessing, resolve_preprocessing

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_FAILED_FRACTION",
    "DecodeFailure",
    "FailureCount",
    "ImageBatch",
    "ImageDataset",
    "ImageIndex",
    "Sample",
    "SampleKey",
    "check_failures",
    "collate_images",
    "index_images",
    "model_preprocessing",
    "split_holdout",
    "steps_per_epoch",
    "training_transform",
]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
MAX_FAILED_FRACTION = 0.01
_HASH_THREADS = 8


@dataclass(frozen=True)
class ImageIndex:
    """The readable images under `root` (relative paths, sorted), their classes with
    `labels=True`, what failed the check, and the content hash of everything found."""

    root: Path
    files: tuple[str, ...]
    sha256: str
    unreadable: tuple[str, ...] = ()
    labels: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def found(self) -> int:
        """Image files found, readable or not."""
        return len(self.files) + len(self.unreadable)


def _image_files(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under `root`, hidden entries skipped, sorted."""
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder).relative_to(root)
        found += [
            (base / name).as_posix()
            for name in names
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def _check_file(path: Path) -> tuple[bytes, bool]:
    """(SHA-256 of the file's bytes, whether PIL can open and verify it)."""
    from PIL import Image

    data = path.read_bytes()
    digest = hashlib.sha256(data).digest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:  # PIL reports a bad file with many types (OSError, SyntaxError, ...)
        return digest, False
    return digest, True


def index_images(root: str | Path, *, labels: bool = False) -> ImageIndex:
    """Find, hash and check the images under `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder; pass --data DIR")
    classes: tuple[str, ...] | None = None
    if labels:
        classes = tuple(
            sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        )
        if not classes:
            raise DataError(
                f"{root} has no class folders; --labels expects one sub-folder of images per "
                "class (ImageFolder layout)"
            )
        files = [f"{c}/{name}" for c in classes for name in _image_files(root / c)]
    else:
        files = _image_files(root)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no images in {root} (looked for {suffixes}); check --data")
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, os.cpu_count() or 1)) as pool:
        checks = list(pool.map(_check_file, [root / f for f in files]))
    digest = hashlib.sha256()
    for name, (file_digest, _) in zip(files, checks, strict=True):
        digest.update(name.encode("utf-8") + b"\0" + file_digest)
    readable = [f for f, (_, ok) in zip(files, checks, strict=True) if ok]
    unreadable = tuple(f for f, (_, ok) in zip(files, checks, strict=True) if not ok)
    check_failures(len(unreadable), len(files), root, example=unreadable[0] if unreadable else "")
    class_of = {c: i for i, c in enumerate(classes or ())}
    return ImageIndex(
        root=root,
        files=tuple(readable),
        sha256=digest.hexdigest(),
        unreadable=unreadable,
        labels=tuple(class_of[f.split("/", 1)[0]] for f in readable) if labels else None,
        classes=classes,
    )


def check_failures(failed: int, total: int, root: Path, *, example: str = "") -> None:
    """A DataError when more than MAX_FAILED_FRACTION of `total` images failed."""
    if failed > MAX_FAILED_FRACTION * total:
        where = f", e.g. {example}" if example else ""
        raise DataError(
            f"{failed} of {total} images in {root} cannot be read{where}: more than "
            f"{MAX_FAILED_FRACTION:.0%}; fix or remove them"
        )


class FailureCount:
    """Images that failed to decode during training, counted once each; raises a DataError
    when, with the files that failed the index check, they exceed MAX_FAILED_FRACTION."""

    def __init__(self, index: ImageIndex) -> None:
        self.index = index
        self.failed: set[int] = set()

    def add(self, positions: Sequence[int]) -> None:
        self.failed.update(positions)
        example = self.index.files[min(self.failed)] if self.failed else ""
        check_failures(
            len(self.failed) + len(self.index.unreadable),
            self.index.found,
            self.index.root,
            example=example,
        )

    def __len__(self) -> int:
        return len(self.failed)


def split_holdout(
    count: int, fraction: float, seed: int, *, limit: int = 2000
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(training, held-out) positions: a seeded random `fraction` of `count` images is held
    out for evaluation (but at least 32 or a quarter of a small folder, so that the numbers
    measured on it mean something, at least 1, at most `limit`); both lists sorted."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"the held-out fraction must be in [0, 1), got {fraction}")
    floor = max(1, min(32, count // 4))
    held = 0 if fraction == 0 else min(limit, max(floor, round(fraction * count)))
    if count - held < 1:
        raise DataError(
            f"{count} image{'s' if count != 1 else ''} leave nothing to train on after holding "
            f"out {held} for evaluation; add images"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return tuple(sorted(order[held:])), tuple(sorted(order[:held]))


class SampleKey(NamedTuple):
    """Which image to load, and the (epoch, seed) its augmentation is drawn from."""

    item: int
    epoch: int
    seed: int

    def rng_seed(self) -> int:
        """A 63-bit seed that is a function of the key alone (a splitmix-style mix)."""
        x = (self.seed * 0x9E3779B97F4A7C15 + self.epoch * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        x = (x ^ (self.item * 0x94D049BB133111EB)) & (2**64 - 1)
        x ^= x >> 31
        return x & (2**63 - 1)


class Sample(NamedTuple):
    """One decoded image: the transformed tensor, its class (-1 without labels), its position
    in the index."""

    image: Tensor
    label: int
    position: int


class DecodeFailure(NamedTuple):
    """The marker for an image that failed to decode: which one, and why."""

    position: int
    reason: str


class ImageBatch(NamedTuple):
    """A collated batch: images (N, C, H, W), labels (N,), index positions (N,), and the
    positions of the images dropped because they failed to decode."""

    images: Tensor
    labels: Tensor
    positions: Tensor
    failed: tuple[int, ...]


class ImageDataset(torch.utils.data.Dataset[Any]):
    """The images at `positions` of an index, decoded with PIL and transformed.

    Item k is image `positions[k]`; indexing with a SampleKey seeds the transform's RNGs from
    the key (see the module docstring), indexing with an int uses the RNGs as they are."""

    def __init__(
        self,
        index: ImageIndex,
        positions: Sequence[int],
        transform: Callable[[Any], Tensor],
        *,
        channels: int = 3,
    ) -> None:
        self.index = index
        self.positions = tuple(positions)
        self.transform = transform
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: SampleKey | int) -> Sample | DecodeFailure:
        item = key.item if isinstance(key, SampleKey) else int(key)
        position = self.positions[item]
        from PIL import Image

        try:
            with Image.open(self.index.root / self.index.files[position]) as image:
                picture = image.convert(self.mode)
        except Exception as exc:  # any decoder failure: skip the image, never kill the worker
            return DecodeFailure(position, f"{type(exc).__name__}: {exc}")
        if isinstance(key, SampleKey):
            with torch.random.fork_rng(devices=[]):
                state = random.getstate()
                seed = key.rng_seed()
                # the CPU generator only: torch.manual_seed would also queue a CUDA seeding
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                try:
                    tensor = self.transform(picture)
                finally:
                    random.setstate(state)
        else:
            tensor = self.transform(picture)
        label = self.index.labels[position] if self.index.labels is not None else -1
        return Sample(tensor, label, position)


def collate_images(items: Sequence[Sample | DecodeFailure]) -> ImageBatch:
    """Stack the decoded samples of a batch; failures are dropped and listed in `failed`."""
    good = [item for item in items if isinstance(item, Sample)]
    failed = tuple(item.position for item in items if isinstance(item, DecodeFailure))
    if not good:
        none = torch.empty(0, dtype=torch.long)
        return ImageBatch(torch.empty(0), none, none, failed)
    return ImageBatch(
        torch.stack([s.image for s in good]),
        torch.tensor([s.label for s in good], dtype=torch.long),
        torch.tensor([s.position for s in good], dtype=torch.long),
        failed,
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def model_preprocessing(model: nn.Module, spec: str, input_size: Sequence[int]) -> Preprocessing:
    """The model's own evaluation preprocessing (`surgeon.evaluate.resolve_preprocessing`):
    timm's data config for timm models (recognised by spec or by their `pretrained_cfg`), the
    torchvision weights' transforms for torchvision models, otherwise resize to size/0.875,
    centre crop and ImageNet mean/std."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not spec and isinstance(cfg, dict) and cfg.get("architecture"):
        spec = f"timm:{cfg['architecture']}"
    return resolve_preprocessing(model, spec, tuple(int(s) for s in input_size))


def training_transform(
    preprocessing: Preprocessing,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    max_shift: int | None = None,
) -> Callable[[Any], Tensor]:
    """The training augmentation: a random resized crop (area `scale`, aspect 3/4–4/3) to the
    input size with the model's interpolation, then a random shift of up to `max_shift` pixels
    each way (reflect padding + crop; default 1/32 of the shorter side, at least 1), then the
    model's normalisation. The teacher sees the same augmented image as the student."""
    from torchvision import transforms

    c, h, w = preprocessing.input_size
    shift = max_shift if max_shift is not None else max(1, round(min(h, w) / 32))
    steps: list[Any] = [] if c == 3 else [transforms.Grayscale(c)]
    steps += [
        transforms.RandomResizedCrop(
            (h, w),
            scale=scale,
            interpolation=transforms.InterpolationMode(preprocessing.interpolation),
        ),
        transforms.RandomCrop((h, w), padding=shift, padding_mode="reflect"),
        transforms.ToTensor(),
        transforms.Normalize(preprocessing.mean, preprocessing.std),
    ]
    return transforms.Compose(steps)


def steps_per_epoch(images: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps in one pass over `images` (full batches on every process)."""
    return math.floor(math.ceil(images / world_size) / batch_size)
