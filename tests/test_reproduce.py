"""scripts/reproduce.py --quick: the miniature reproduction runs end to end, trains, and scores
all three variants."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def reproduce() -> ModuleType:
    return load_script("reproduce")


def test_data_is_deterministic_and_objects_fit_every_shifted_crop(reproduce: ModuleType) -> None:
    first, second = reproduce.make_split(16, seed=7), reproduce.make_split(16, seed=7)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.images.shape == (16, 3, reproduce.CANVAS, reproduce.CANVAS)
    low, high = reproduce.HEIGHTS
    assert bool(((first.heights >= low) & (first.heights <= high)).all())
    assert first.crops(slice(None)).shape == (16, 3, reproduce.SIZE, reproduce.SIZE)


def test_quick_run_trains_and_evaluates_every_variant(
    reproduce: ModuleType, tmp_path: Path
) -> None:
    raw = tmp_path / "results.json"
    results = reproduce.main(["--quick", "--out", str(tmp_path), "--json", str(raw)])
    runs = results["runs"]
    assert sorted({r["variant"] for r in runs}) == sorted(reproduce.VARIANTS)
    for run in runs:
        losses = run["losses"]
        assert losses[-1] < losses[0], f"{run['variant']}: training did not lower the loss {losses}"
        for key in ("accuracy", "consistency_crop", "consistency_circular"):
            assert 0.0 <= run[key] <= 1.0, f"{run['variant']} {key} = {run[key]}"
        assert set(run["accuracy_by_height"]) == {f"{lo}-{hi}" for lo, hi in reproduce.BUCKETS}
    # the patched variants really differ from the original
    costs = results["costs"]
    assert costs["spd"]["params"] > costs["original"]["params"]
    assert costs["antialias"]["params"] == costs["original"]["params"]
    assert costs["antialias"]["macs"] > costs["original"]["macs"]

    page = (tmp_path / "results.md").read_text(encoding="utf-8")
    for variant in reproduce.VARIANTS:
        assert f"| {variant} |" in page, f"{variant} missing from results.md"
    assert json.loads(raw.read_text())["config"]["seeds"] == [0]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results_accuracy_by_size.png").stat().st_size > 1000
        assert (tmp_path / "results_consistency.png").stat().st_size > 1000
