"""Does a balanced mixture of supernets rank downsampling placements better than one supernet?

    python scripts/search_digits.py            # 8 placements x 3 seeds, ResNet-20-like, CPU
    python scripts/search_digits.py --quick    # smoke run: 3 placements x 1 seed, 6 steps

The claim under test (Balanced Mixture of SuperNets, arXiv 2306.11982): where the ×2
downsampling layers sit changes accuracy; one weight-sharing supernet ranks placements badly;
a balanced mixture of supernets ranks them better and its pick beats the default placement.

1. **Task.** Digit-like images: the digits 0-9 drawn with Pillow's default font at random
   sizes, positions and angles, with noise (sklearn's `load_digits` is not a dependency),
   3×16×16, one class folder per digit; a training folder and a separate test folder.
2. **Model.** A ResNet-20-like network (a 3×3 stem, three stages of `--blocks` residual blocks
   of widths w, 2w, 4w, a pooled linear head); every stage's first block has a 1×1 projection
   shortcut, so the two ×2 steps can sit at the stem or at the entry of any stage, in the
   block's first or second conv: `PlacementSpace` lists 18 legal placements.
3. **Ground truth.** `--placements` of them (a seeded sample that keeps the default) are each
   patched with their `relocate` policy and trained from scratch with cross-entropy for
   `--steps` steps, for each of `--seeds` seeds, with `surgeon.training.Trainer`: mean test
   accuracy per placement.
4. **Searches.** `surgeon.search` with `--supernets K` (the mixture) and with 1 (one
   supernet), on the same candidates, `--labels`, from the default placement trained with
   seed 0 (the original the supernets copy and distil from), `--search-steps` steps, for each
   of `--search-seeds` seeds, each over the whole space (so that every seed ranks the same
   placements). Kendall's tau (tau-b) of each ranking, restricted to the placements with a
   ground truth, against the ground truth's order, and the ground-truth accuracy of each
   method's pick (its best-scored placement among those) against the default placement's.
   "Better" counts only beyond the spread of the runs.
5. **Cost.** The search's training time over one stand-alone training's time per step (the
   same engine, batch and images), against the (K + 1)× bound of docs/search.md.

Writes docs/records/search/digits.json (with its provenance), which `make docs` renders as
docs/search-results.md; `--quick` writes only where `--record` says.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from provenance import provenance  # noqa: E402
from records import RECORDS, script_command, write_json  # noqa: E402

from surgeon.data import (  # noqa: E402
    ImageBatch,
    ImageDataset,
    collate_images,
    index_images,
    model_preprocessing,
    training_transform,
)
from surgeon.patch import patch  # noqa: E402
from surgeon.placements import Placement, PlacementSpace, placement_policy  # noqa: E402
from surgeon.search import candidate_placements, search  # noqa: E402
from surgeon.training import StepOutput, TrainConfig, Trainer, init_distributed  # noqa: E402

SIZE = 16


# ---------------------------------------------------------------------------------------------
# The task and the model


def write_digits(root: Path, count: int, seed: int) -> None:
    """`count` digit images (class folders 0-9) drawn at random sizes, offsets and angles."""
    from PIL import Image, ImageDraw, ImageFont

    gen = torch.Generator().manual_seed(seed)
    fonts = {size: ImageFont.load_default(size=size) for size in range(11, 16)}
    for i in range(count):
        digit = i % 10

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=gen))

        canvas = Image.new("L", (24, 24), 0)
        draw = ImageDraw.Draw(canvas)
        font = fonts[int(uniform(11, 16))]
        draw.text((12 + uniform(-3, 3), 12 + uniform(-3, 3)), str(digit), fill=255, font=font,
                  anchor="mm")  # fmt: skip
        canvas = canvas.rotate(uniform(-20, 20), resample=Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(canvas.resize((SIZE, SIZE)), dtype=np.float32))
        pixels = pixels / 255 * uniform(0.6, 1.0)
        pixels = (pixels + 0.15 * torch.rand(SIZE, SIZE, generator=gen)).clamp(0, 1)
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * 255).round().to(torch.uint8).numpy(), mode="L")
        image.convert("RGB").save(folder / f"{i:05d}.png")


class Block(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus a shortcut (1×1 conv + BN when `project`)."""

    def __init__(self, cin: int, cout: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if project:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet layout (stages of width w, 2w, 4w; ×2 steps at stages 2 and 3)."""

    def __init__(self, blocks: int = 3, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages: list[nn.Module] = []
        cin = width
        for s, cout in enumerate((width, 2 * width, 4 * width)):
            layers = [Block(cin, cout, 1 if s == 0 else 2, True)]
            layers += [Block(cout, cout, 1, False) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# Stand-alone training (the ground truth)


class CrossEntropy:
    """The plain training objective: cross-entropy with the labels."""

    def __call__(self, model: nn.Module, batch: ImageBatch) -> StepOutput:
        logits = model(batch.images)
        loss = F.cross_entropy(logits, batch.labels)
        return StepOutput(loss, {"loss": loss.detach()})


def accuracy(model: nn.Module, data: Path, prep: Any) -> float:
    index = index_images(data, labels=True)
    dataset = ImageDataset(index, range(len(index)), prep.transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate_images)
    correct = seen = 0
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            correct += int((model(batch.images).argmax(-1) == batch.labels).sum())
            seen += len(batch.labels)
    return correct / seen


def train_alone(
    placement: Placement, seed: int, train: Path, test: Path, args: argparse.Namespace
) -> tuple[nn.Module, float, float]:
    """(model, test accuracy, seconds of training) of `placement` trained from scratch."""
    torch.manual_seed(seed)
    model = ResNet20(args.blocks, args.width)
    example = torch.randn(1, 3, SIZE, SIZE)
    model, _ = patch(model, placement_policy(placement), example, seed=seed)
    prep = model_preprocessing(model, "", (3, SIZE, SIZE))
    index = index_images(train, labels=True)
    dataset = ImageDataset(index, range(len(index)), training_transform(prep, scale=(0.8, 1.0)))
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, workers=0, seed=seed,
        log_every=max(1, args.steps), channels_last=False,
    )  # fmt: skip
    trainer = Trainer(model, CrossEntropy(), config, init_distributed("cpu"), progress=False)
    summary = trainer.fit(dataset)
    return model, accuracy(model, test, prep), summary.seconds


# ---------------------------------------------------------------------------------------------
# Rank correlation


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two score lists (ties allowed)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da * db > 0:
                concordant += 1
            else:
                discordant += 1
    n0 = concordant + discordant
    denominator = math.sqrt((n0 + ties_a) * (n0 + ties_b))
    return (concordant - discordant) / denominator if denominator else 0.0


# ---------------------------------------------------------------------------------------------
# The experiment


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    train, test = work / "train", work / "test"
    write_digits(train, args.images, seed=1)
    write_digits(test, args.images // 4, seed=2)
    space = PlacementSpace.of(ResNet20(args.blocks, args.width), torch.randn(1, 3, SIZE, SIZE))
    candidates, total = candidate_placements(space, args.placements, seed=0)
    print(f"{total} legal placements; ground truth on {len(candidates)}", flush=True)

    truth: dict[str, list[float]] = {}
    alone_seconds = []
    teacher: nn.Module | None = None
    for placement in candidates:
        key = " ".join(placement.layers)
        for seed in range(args.seeds):
            model, acc, seconds = train_alone(placement, seed, train, test, args)
            truth.setdefault(key, []).append(acc)
            alone_seconds.append(seconds)
            if placement == space.current and seed == 0:
                teacher = model
            print(f"  {key}: seed {seed} accuracy {acc:.4f} ({seconds:.1f} s)", flush=True)
    assert teacher is not None
    mean = {k: statistics.mean(v) for k, v in truth.items()}
    default_key = " ".join(space.current.layers)
    per_step_alone = statistics.mean(alone_seconds) / args.steps

    methods: dict[str, Any] = {}
    keys = sorted(mean)
    # Each search covers the whole space when the budget visits it, so that searches with
    # different seeds rank the same candidates; otherwise the ground truth's own sample (seed 0).
    searched = total if args.search_steps >= total else args.placements
    if searched < total and args.search_seeds > 1:
        raise SystemExit("--search-seeds > 1 needs --search-steps of at least the space's size")
    for name, k in (("mixture", args.supernets), ("single", 1)):
        runs = []
        for search_seed in range(args.search_seeds):
            started = time.perf_counter()
            result = search(
                copy.deepcopy(teacher), train, budget=args.search_steps, supernets=k,
                max_placements=searched, batch_size=args.batch_size, lr=args.search_lr,
                labels=True, input_size=(3, SIZE, SIZE), workers=0, device="cpu",
                seed=search_seed, progress=False, channels_last=False,
            )  # fmt: skip
            wall = time.perf_counter() - started
            ranked = {" ".join(c.placement.layers): c.score for c in result.candidates}
            tau = kendall_tau([mean[x] for x in keys], [ranked[x] for x in keys])
            # its pick: the best-scored placement that has a ground truth
            pick = max(keys, key=lambda x: ranked[x])
            overall = " ".join(result.candidates[0].placement.layers)
            runs.append(
                {
                    "seed": search_seed,
                    "kendall_tau": round(tau, 4),
                    "top_pick": pick,
                    "top_pick_accuracy": round(mean[pick], 4),
                    "top_overall": overall,
                    "searched": len(result.candidates),
                    "scores": {x: round(ranked[x], 4) for x in keys},
                    "shares": [round(share, 4) for share in result.shares],
                    "train_seconds": round(result.seconds, 2),
                    "wall_seconds": round(wall, 2),
                    "cost_ratio": round(result.seconds / args.search_steps / per_step_alone, 3),
                }
            )
            print(
                f"{name} (K={k}) seed {search_seed}: tau {tau:+.3f}, pick {pick} {mean[pick]:.4f}"
            )
        taus = [run["kendall_tau"] for run in runs]
        picks = [run["top_pick_accuracy"] for run in runs]
        methods[name] = {
            "supernets": k,
            "runs": runs,
            "kendall_tau": round(statistics.mean(taus), 4),
            "kendall_tau_range": [min(taus), max(taus)],
            "top_pick_accuracy": round(statistics.mean(picks), 4),
            "top_pick_accuracy_range": [min(picks), max(picks)],
            "cost_ratio": round(statistics.mean(run["cost_ratio"] for run in runs), 3),
        }
    mixture, single = methods["mixture"], methods["single"]
    return {
        "task": {"images": args.images, "test_images": args.images // 4, "size": SIZE},
        "model": {"blocks": args.blocks, "width": args.width},
        "space_size": total,
        "steps": args.steps,
        "search_steps": args.search_steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "ground_truth": {k: [round(a, 4) for a in v] for k, v in truth.items()},
        "ground_truth_mean": {k: round(v, 4) for k, v in mean.items()},
        "default": default_key,
        "default_accuracy": round(mean[default_key], 4),
        "best_accuracy": round(max(mean.values()), 4),
        "seconds_per_step_alone": round(per_step_alone, 5),
        "methods": methods,
        # "better" only beyond the spread: every mixture run above every single-supernet run
        "mixture_ranks_better": mixture["kendall_tau_range"][0] > single["kendall_tau_range"][1],
        "mixture_pick_beats_default": mixture["top_pick_accuracy_range"][0]
        > max(truth[default_key]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, writes nothing")
    parser.add_argument("--placements", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--search-steps", type=int, default=400)
    parser.add_argument("--supernets", type=int, default=4)
    parser.add_argument("--search-seeds", type=int, default=2, help="searches per method")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--search-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", type=Path, default=None, help="where the record goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.placements, args.seeds, args.steps, args.search_steps = 3, 1, 6, 6
        args.images, args.blocks, args.supernets, args.batch_size = 60, 1, 2, 8
        args.search_seeds = 1
    with tempfile.TemporaryDirectory() as tmp:
        body = run(args, Path(tmp))
    body["provenance"] = provenance(script_command(__file__, argv))
    body["quick"] = args.quick
    target = args.record or (None if args.quick else RECORDS / "search" / "digits.json")
    if target is not None:
        write_json(target, body)
        print(f"wrote {target}")
    print(json.dumps({k: body[k] for k in ("methods", "default_accuracy")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
