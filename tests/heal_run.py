"""A heal run in its own process, for the tests that kill it or start it under torchrun.

    python tests/heal_run.py DATA STATE_DIR WEIGHTS_OUT [--steps N] [--resume] [--sleep S]

The teacher is TinyNet seeded with 0 and the student the same model patched with
`antialias`; the healed student's state dict is written to WEIGHTS_OUT (safetensors) by rank 0.
`--sleep` slows each student forward down (without touching the numbers), so that a test can
kill the process between two state checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.heal import heal
from surgeon.patch import patch
from tests.heal_fixtures import SIZE, TinyNet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--state-every", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    student = copy.deepcopy(teacher)
    student, _ = patch(student, "antialias", torch.randn(1, 3, SIZE, SIZE))
    if args.sleep:

        def slow(module: Any, inputs: Any) -> None:
            time.sleep(args.sleep)

        student.register_forward_pre_hook(slow)
    result = heal(
        student,
        teacher,
        args.data,
        steps=args.steps,
        batch_size=8,
        lr=3e-3,
        input_size=(3, SIZE, SIZE),
        workers=0,
        state_dir=args.state_dir,
        state_every=args.state_every,
        log_every=2,
        resume=args.resume,
        progress=False,
    )
    if result.is_main:
        state = {k: v.contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(args.weights))
        print(f"done {result.steps} steps, resumed from {result.resumed_from}", flush=True)


if __name__ == "__main__":
    main()
