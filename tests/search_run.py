"""A search run in its own process, for the test that kills it and resumes it.

    python tests/search_run.py DATA OUT [--resume] [--sleep S]

The model is `PlainNet` (tests/search_fixtures.py); the ranking goes to OUT and the state to
OUT.search-state. `--sleep` slows every forward of the model (and so of its supernet copies)
down without touching the numbers, so that a test can kill the run between state checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.search import search
from tests.search_fixtures import plain_net


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = plain_net()
    if args.sleep:

        def slow(module: Any, inputs: Any) -> None:
            time.sleep(args.sleep)

        model.register_forward_pre_hook(slow)
    result = search(
        model,
        args.data,
        budget=12,
        supernets=2,
        batch_size=8,
        lr=3e-3,
        input_size=(3, 16, 16),
        workers=0,
        device="cpu",
        out=args.out,
        state_every=3,
        log_every=2,
        resume=args.resume,
        progress=False,
    )
    print(f"done {result.steps} steps, resumed from {result.resumed_from}", flush=True)


if __name__ == "__main__":
    main()
