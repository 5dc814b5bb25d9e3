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


def test_pretrained_protocol_trains_patches_heals_and_controls(
    reproduce: ModuleType, tmp_path: Path
) -> None:
    raw = tmp_path / "pretrained.json"
    results = reproduce.main(["--protocol", "pretrained", "--quick", "--json", str(raw)])
    stages = {(r["policy"], r["stage"]) for r in results["runs"]}
    expected = {("original", "trained"), ("original", "fine-tuned")}
    for policy in reproduce.HEAL_POLICIES:
        expected |= {(policy, "step 0"), (policy, "healed")}
    assert stages == expected, f"missing: {expected - stages}"
    spd = [r for r in results["runs"] if r["policy"] == "spd" and r["stage"] == "step 0"]
    assert spd[0]["logit_max_diff"] < 1e-4, "spd at step 0 should compute the original"
    healed = [r for r in results["runs"] if r["stage"] == "healed"]
    assert all(r["losses"]["kd"] >= 0 for r in healed)
    assert json.loads(raw.read_text())["complete"] is True
    section = "\n".join(reproduce.pretrained_section(results))
    for policy in reproduce.HEAL_POLICIES:
        assert f"| {policy} | healed |" in section
    assert "| original | fine-tuned |" in section and "`spd` at step 0" in section
    # the section joins the page when the page is rendered from raw results
    scratch = Path(__file__).resolve().parents[1] / "docs" / "reproduce" / "results.json"
    out = tmp_path / "page"
    render = ["--render", str(scratch), "--pretrained-results", str(raw), "--no-plots"]
    reproduce.main([*render, "--out", str(out)])
    page = (out / "results.md").read_text(encoding="utf-8")
    assert "## Pretrained models: patch, then heal" in page
    assert page.index("## Pretrained models") < page.index("## Per-seed numbers")
