"""Tiny models and generated image folders for the heal, data and training tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

SIZE = 16  # the tiny models' input: 3x16x16


class TinyNet(nn.Sequential):
    """A 4-class convnet with a strided conv, BatchNorm, a max pool and a pointwise conv:
    every built-in policy finds something to rewrite, and a CPU step takes milliseconds."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )


def tiny_net(num_classes: int = 4, width: int = 8) -> nn.Module:
    """The factory the CLI tests name as `tests.heal_fixtures:tiny_net`."""
    return TinyNet(num_classes, width)


def write_images(
    root: Path,
    count: int,
    *,
    classes: int = 0,
    size: int = 20,
    seed: int = 0,
    suffix: str = ".png",
) -> list[Path]:
    """`count` seeded images of bright rectangles on dark noise; with `classes`, spread over
    class folders c0, c1, ... and the rectangle's colour channel is the class."""
    gen = torch.Generator().manual_seed(seed)
    written = []
    for i in range(count):
        image = torch.rand(3, size, size, generator=gen) * 0.3
        cls = i % classes if classes else int(torch.randint(0, 3, (1,), generator=gen))
        top, left = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
        image[cls % 3, top : top + size // 2, left : left + size // 2] = 1.0
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        folder = root / f"c{cls}" if classes else root / f"part{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:04d}{suffix}"
        Image.fromarray(pixels).save(path)
        written.append(path)
    return written


def trained_tiny_net(data: Path, *, num_classes: int = 3, passes: int = 4) -> nn.Module:
    """TinyNet trained for a few passes over a labelled folder from `write_images` (the
    colour of the rectangle is the class), so that its predictions mean something and
    patching disturbs them. Seeded: the same folder gives the same weights."""
    from surgeon.data import ImageDataset, collate_images, index_images
    from surgeon.evaluate import resolve_preprocessing

    torch.manual_seed(0)
    model = TinyNet(num_classes=num_classes)
    index = index_images(data, labels=True)
    prep = resolve_preprocessing(model, "", (3, SIZE, SIZE))
    dataset = ImageDataset(index, range(len(index)), prep.transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=32, shuffle=True, collate_fn=collate_images
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(passes):
        for batch in loader:
            loss = nn.functional.cross_entropy(model(batch.images), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
