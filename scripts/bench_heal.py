"""What a heal step costs, and how many images per second heal trains on 1 and 2 processes.

    python scripts/bench_heal.py          # resnet50 + antialias, batch 64, CUDA if any
    python scripts/bench_heal.py --quick  # smoke run: resnet18 at 64 px on the CPU, writes nothing

1. **Step cost.** One heal step (`surgeon.training.Trainer.train_step`: the teacher's forward
   under inference_mode, the student's forward and backward, the distillation loss, gradient
   clipping, the NaN check across processes, the AdamW step) against its two parts measured
   on their own at the same batch size: the teacher's inference forward, and a plain training
   step of the student (forward, cross-entropy, backward, AdamW step). Target: heal step ≤
   1.15 × (teacher forward + student step). The three are timed in interleaved rounds on one
   batch already on the device (data loading is not part of the step), same precision
   (`auto`: bf16 on recent GPUs, fp32 on CPU) and channels_last memory.
2. **Throughput.** `surgeon.heal` end to end (JPEG decoding in DataLoader workers, augmentation,
   the steps) on a generated folder of images, under `torchrun --nproc-per-node P` for each P
   of `--processes`: images per second over all processes, from the JSONL log after the
   first logged window (warm-up). CUDA runs need P GPUs; otherwise the run is on the CPU
   (gloo), each process with cores/P threads.

Writes its record, docs/records/bench/heal.json; `make docs` renders the "## Heal" section of
docs/benchmarks.md from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_layers import interleaved  # noqa: E402
from bench_page import BENCH_RECORDS, save_section  # noqa: E402
from records import script_command  # noqa: E402

from surgeon.data import ImageBatch  # noqa: E402
from surgeon.distill import DistillLoss  # noqa: E402
from surgeon.heal import HealObjective, heal  # noqa: E402
from surgeon.models import load_model  # noqa: E402
from surgeon.patch import patch  # noqa: E402
from surgeon.training import Distributed, TrainConfig, Trainer, resolve_precision  # noqa: E402


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _models(spec: str, policy: str, size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    loaded = load_model(spec)
    teacher = loaded.model.eval()
    student, _ = patch(copy.deepcopy(teacher), policy, torch.randn(1, 3, size, size))
    return teacher, student


def _timer(device: torch.device) -> Callable[[Callable[[Any], Any], Any], float]:
    def measure(candidate: Callable[[Any], Any], x: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        candidate(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000.0

    return measure


def step_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Median milliseconds of the heal step and of its two parts; see the module docstring."""
    device = _device(args.device)
    precision = resolve_precision("auto", device)
    teacher, student = _models(args.model, args.policy, args.size)
    plain = copy.deepcopy(student)
    dist = Distributed(1, 0, 0, device, None)
    teacher = teacher.to(device).eval().requires_grad_(False)
    teacher = teacher.to(memory_format=torch.channels_last)
    config = TrainConfig(
        steps=10**6, batch_size=args.batch, precision=precision, compile=args.compile, workers=0
    )
    trainer = Trainer(student, HealObjective(student, teacher, DistillLoss()), config, dist)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    batch = ImageBatch(images, labels, torch.arange(args.batch), ())

    plain = plain.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def teacher_forward(x: ImageBatch) -> None:
        with torch.inference_mode(), trainer.autocast():
            teacher(x.images)

    def student_step(x: ImageBatch) -> None:
        with trainer.autocast():
            logits = plain(x.images)
        loss = F.cross_entropy(logits.float(), x.labels % logits.shape[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def heal_step(x: ImageBatch) -> None:
        trainer.train_step(x)

    candidates = {
        "teacher forward": teacher_forward,
        "student step": student_step,
        "heal step": heal_step,
    }
    samples = interleaved(
        candidates, batch, args.rounds, measure=_timer(device), warmup=args.warmup
    )
    ms = {name: statistics.median(times) for name, times in samples.items()}
    ratio = ms["heal step"] / (ms["teacher forward"] + ms["student step"])
    return {"ms": ms, "ratio": ratio, "precision": precision, "device": _device_name(device)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _write_images(root: Path, count: int, size: int) -> None:
    """`count` seeded smooth-noise JPEGs of size×size (the decode cost of real photos)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = torch.rand(1, 3, 8, 8, generator=gen)
        image = F.interpolate(small, size=(size, size), mode="bicubic").clamp(0, 1)[0]
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:05d}.jpg", quality=90)


def throughput(args: argparse.Namespace, processes: int, data: Path) -> dict[str, Any]:
    """Images per second of `surgeon.heal` under torchrun with `processes` processes."""
    device = _device(args.device)
    if device.type == "cuda" and processes > torch.cuda.device_count():
        device = torch.device("cpu")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            __file__,
            "--worker",
            str(data),
            "--state-dir",
            tmp,
            "--device",
            device.type,
            *("--model", args.model, "--policy", args.policy),
            *("--size", str(args.size), "--batch", str(args.batch)),
            *("--steps", str(args.steps), "--workers", str(args.workers)),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{processes}-process run failed:\n{done.stderr[-3000:]}")
        lines = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    steady = [r["images_per_s"] for r in lines if "step" in r][1:] or [
        r["images_per_s"] for r in lines if "step" in r
    ]
    return {
        "processes": processes,
        "device": _device_name(device),
        "images_per_s": statistics.median(steady),
        "threads": env.get("OMP_NUM_THREADS", ""),
    }


def worker(args: argparse.Namespace) -> None:
    """One process of a throughput run (started by torchrun)."""
    teacher, student = _models(args.model, args.policy, args.size)
    spec = load_model(args.model).spec.text
    heal(
        student,
        teacher,
        args.worker,
        steps=args.steps,
        batch_size=args.batch,
        device=args.device,
        input_size=(3, args.size, args.size),
        spec=spec,
        workers=args.workers,
        holdout=0.0,
        state_dir=args.state_dir,
        state_every=10**6,
        log_every=max(1, args.steps // 5),
        progress=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--policy", default="antialias")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--threads", type=int, help="torch threads for the step-cost part")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60, help="steps of each throughput run")
    parser.add_argument("--images", type=int, default=2048, help="images in the generated folder")
    parser.add_argument("--workers", type=int, default=6, help="DataLoader workers per process")
    parser.add_argument("--quick", action="store_true", help="a smoke run: resnet18, 64 px, CPU")
    parser.add_argument(
        "--records",
        type=Path,
        help="where the record goes (default docs/records/bench; --quick: nowhere)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    if args.quick:
        args.model, args.size, args.batch, args.device = "resnet18", 64, 8, "cpu"
        args.rounds, args.warmup, args.steps, args.images, args.workers = 5, 1, 6, 64, 1
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    cost = step_cost(args)
    print(json.dumps(cost), flush=True)
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        _write_images(data, args.images, max(args.size * 8 // 7, args.size + 8))
        for processes in args.processes:
            rates.append(throughput(args, processes, data))
            print(json.dumps(rates[-1]), flush=True)
    settings = {
        key: getattr(args, key)
        for key in ("model", "policy", "size", "batch", "compile", "rounds", "steps", "workers")
    }
    body = {"cost": cost, "rates": rates, "settings": settings}
    records = args.records if args.records or args.quick else BENCH_RECORDS
    command = script_command(__file__, argv)
    print(save_section("heal", body, command=command, directory=records, quick=args.quick))


if __name__ == "__main__":
    main()
