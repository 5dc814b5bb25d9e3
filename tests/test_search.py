"""surgeon.search: supernets that run a placement exactly as `patch` applies it, an assignment
kept balanced, every candidate visited and scored, one supernet or several, refusals that
write nothing, and a run that survives SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.errors import DataError, UsageError
from surgeon.patch import patch
from surgeon.placements import PlacementSpace, placement_policy
from surgeon.search import candidate_placements, placement_at, recalibrate_batchnorm, search
from surgeon.supernet import (
    MovableStrides,
    balance_penalty,
    balanced_routes,
    layer_settings,
    update_assignment,
)
from surgeon.training import STATE_FILE
from tests.conftest import load_script
from tests.heal_fixtures import TinyNet, write_images
from tests.search_fixtures import plain_net
from tests.tiny_models import tiny_resnet

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
QUICK = {
    "batch_size": 8,
    "lr": 3e-3,
    "input_size": (3, SIZE, SIZE),
    "workers": 0,
    "device": "cpu",
    "progress": False,
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search-images")
    write_images(root, 96, classes=3, size=SIZE)
    return root


def _example() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("factory", [plain_net, tiny_resnet])
def test_a_supernet_runs_each_placement_exactly_as_patch_applies_its_policy(
    factory: Callable[[], nn.Module],
) -> None:
    model = factory().eval()
    space = PlacementSpace.of(model, _example())
    supernet = copy.deepcopy(model)
    movable = MovableStrides(supernet, [layer.name for layer in space.candidates])
    placements = list(space.placements())
    assert len(placements) > 1
    for placement in placements:
        movable.apply(layer_settings(movable.geometries, placement))
        patched, _ = patch(copy.deepcopy(model), placement_policy(placement), _example())
        with torch.no_grad():
            want, got = patched(_example()), supernet(_example())
        assert torch.equal(want, got), f"{placement.layers}: supernet differs from patch"
    movable.close()
    with torch.no_grad():
        assert torch.equal(supernet(_example()), model(_example())), "close() left strides moved"


def test_the_balance_penalty_pulls_a_collapsed_assignment_back_to_equal_shares() -> None:
    """Every placement starts on supernet 0, which also has the lowest loss: without the
    penalty it keeps them all; with it the expected shares come back to equal, and the
    capacity-constrained routes spread the placements whatever the logits."""
    losses = torch.tensor([0.50, 0.55, 0.55, 0.55])
    outcomes = {}
    for balance in (0.0, 1.0):
        logits = torch.zeros(8, 4)
        logits[:, 0] = 3.0
        start = float(balance_penalty(torch.softmax(logits, -1)))
        for step in range(400):
            update_assignment(logits, step % 8, losses, lr=1.0, balance=balance)
        probs = torch.softmax(logits, -1)
        usage = probs.mean(0)
        outcomes[balance] = (start, float(balance_penalty(probs)), usage, probs)
    start, end, usage, probs = outcomes[0.0]
    assert usage[0] > 0.9 and end >= start * 0.9, f"no penalty: usage {usage}, {start}->{end}"
    assert set(probs.argmax(-1).tolist()) == {0}, "without the penalty supernet 0 keeps all"
    start, end, usage, probs = outcomes[1.0]
    assert end < 0.1 * start, f"penalty {start:.3f} -> {end:.3f}: not pulled back to balance"
    assert usage.max() < 0.35, f"one supernet still has {usage.max():.0%} of the probability"
    routes = balanced_routes(outcomes[0.0][3], capacity=2)
    assert torch.bincount(torch.tensor(routes), minlength=4).tolist() == [2, 2, 2, 2], routes


def test_routes_take_the_most_probable_supernet_until_it_is_full() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    assert balanced_routes(probs, capacity=2) == [0, 0, 1, 1]
    assert balanced_routes(probs, capacity=4) == [0, 0, 0, 1]


def test_the_assignment_moves_a_placement_towards_the_supernet_that_fits_it() -> None:
    logits = torch.zeros(3, 2)
    before = torch.softmax(logits, -1)[1, 1].item()
    for _ in range(20):
        update_assignment(logits, 1, torch.tensor([1.0, 0.2]), lr=1.0, balance=0.0)
    probs = torch.softmax(logits, -1)
    assert probs[1, 1] > before + 0.2, f"p(supernet 1 | placement 1) stayed {probs[1, 1]:.2f}"
    assert torch.equal(logits[0], torch.zeros(2)), "another placement's row moved"


def test_each_pass_over_the_budget_visits_every_candidate_once_in_a_new_order() -> None:
    passes = [[placement_at(p * 7 + i, 7, seed=3) for i in range(7)] for p in range(3)]
    for order in passes:
        assert sorted(order) == list(range(7)), order
    assert passes[0] != passes[1], "every pass in the same order"
    assert passes[0] == [placement_at(i, 7, seed=3) for i in range(7)], "not deterministic"


def test_a_sample_of_candidates_is_seeded_and_keeps_the_models_own_placement() -> None:
    space = PlacementSpace.of(tiny_resnet(), _example())
    every, total = candidate_placements(space, 100, seed=0)
    assert len(every) == total == space.count() and every[0] == space.current
    sample, total = candidate_placements(space, 3, seed=0)
    assert len(sample) == 3 and sample[0] == space.current and total == len(every)
    assert sample == candidate_placements(space, 3, seed=0)[0]
    assert {p.layers for p in sample} <= {p.layers for p in every}


def test_recalibration_estimates_batchnorm_statistics_from_the_given_batches() -> None:
    model = plain_net().train()
    batches = [torch.randn(4, 3, SIZE, SIZE) * 3 + 1 for _ in range(2)]
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        first = model[0](torch.cat(batches))
    bn = model[1]
    assert torch.allclose(bn.running_mean, first.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and model.training, "momentum or mode not restored"


@pytest.mark.parametrize("supernets", [1, 3])
def test_search_scores_every_candidate_and_writes_the_ranking(
    images: Path, tmp_path: Path, supernets: int
) -> None:
    out = tmp_path / "ranking"
    model = plain_net()
    before = copy.deepcopy(model.state_dict())
    result = search(
        model, images, budget=18, supernets=supernets, top=2, out=out, labels=True, **QUICK
    )
    assert [c.rank for c in result.candidates] == list(range(1, 7))
    assert sum(c.default for c in result.candidates) == 1
    assert all(0.0 <= c.score <= 1.0 and c.macs > 0 for c in result.candidates)
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert any(c.pareto for c in result.candidates)
    assert len(result.shares) == supernets and abs(sum(result.shares) - 1) < 1e-6
    if supernets == 1:
        assert result.shares == (1.0,) and result.balance == 0.0
    else:
        assert max(result.shares) < 1.0, f"one supernet took every placement: {result.shares}"
        assert len({c.supernet for c in result.candidates}) > 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "model changed"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [
        "policies/rank-1.yaml",
        "policies/rank-2.yaml",
        "ranking.json",
        "ranking.md",
        "ranking.png",
        "report.html",
        "search-log.jsonl",
    ]
    record = json.loads((out / "ranking.json").read_text())
    assert record["supernets"] == supernets and len(record["candidates"]) == 6
    assert (out / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    md = (out / "ranking.md").read_text()
    assert "| rank | placement | score | MACs |" in md and md.count("\n| ") == 7
    own = next(c for c in result.candidates if c.default)
    verdict = "ranks first" if own.rank == 1 else f"ranks {own.rank} of 6"
    assert f"The model's own placement {verdict}" in md, md
    log = [json.loads(line) for line in (out / "search-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 18] and all("balance" in r for r in log)
    assert not (tmp_path / "ranking.search-state").exists(), "state left behind"


def test_the_top_policies_apply_the_ranked_placements_through_patch(
    images: Path, tmp_path: Path
) -> None:
    result = search(plain_net(), images, budget=6, supernets=2, top=3, out=tmp_path / "r", **QUICK)
    for candidate in result.candidates[:3]:
        policy = tmp_path / "r" / "policies" / f"rank-{candidate.rank}.yaml"
        patched, _ = patch(plain_net(), policy, _example())
        strided = [
            name
            for name, m in patched.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)
        ]
        assert tuple(strided) == candidate.placement.layers, policy.read_text()


def test_refusals_name_the_problem_and_write_nothing(images: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    cases = [
        (TinyNet(), images, 10, UsageError, "no downsampling that can move"),
        (plain_net(), empty, 10, DataError, "no images in"),
        (plain_net(), images, 5, UsageError, "cannot visit each of the 6 candidate placements"),
    ]
    for model, data, budget, error, words in cases:
        with pytest.raises(error) as caught:
            search(model, data, budget=budget, out=out, **QUICK)
        assert words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "something was written"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    run = ROOT / "tests" / "search_run.py"
    done = subprocess.run(
        [sys.executable, str(run), *args], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sigkill_then_resume_gives_the_same_ranking(images: Path, tmp_path: Path) -> None:
    _run(str(images), str(tmp_path / "whole"))
    killed = tmp_path / "killed"
    state = tmp_path / "killed.search-state"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "search_run.py"),
            str(images),
            str(killed),
            "--sleep",
            "0.05",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while not (state / STATE_FILE).exists():
        assert proc.poll() is None, f"the run ended before a state checkpoint: {proc.stderr}"
        assert time.monotonic() < deadline, "no state checkpoint within 90 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    step = torch.load(state / STATE_FILE, weights_only=True)["step"]
    assert 0 < step < 12, f"killed at step {step}: not mid-run"
    assert not killed.exists(), "a killed run wrote its ranking"
    resumed = _run(str(images), str(killed), "--resume")
    assert f"resumed from {step}" in resumed.stdout, resumed.stdout
    whole = json.loads((tmp_path / "whole" / "ranking.json").read_text())
    again = json.loads((killed / "ranking.json").read_text())
    for key in ("candidates", "shares", "balance", "losses"):
        assert whole[key] == again[key], f"{key} differs after resume"
    steps = [json.loads(line)["step"] for line in (killed / "search-log.jsonl").open()]
    assert steps == [2, 4, 6, 8, 10, 12], f"log after resume: {steps}"


def test_kendall_tau_of_the_evidence_script() -> None:
    digits = load_script("search_digits")
    assert digits.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert digits.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert abs(digits.kendall_tau([1, 2, 3], [1, 3, 2]) - 1 / 3) < 1e-9


def test_the_evidence_scripts_quick_mode_writes_a_record(tmp_path: Path) -> None:
    digits = load_script("search_digits")
    record = tmp_path / "digits.json"
    assert digits.main(["--quick", "--threads", "1", "--record", str(record)]) == 0
    body = json.loads(record.read_text())
    assert body["quick"] is True and len(body["ground_truth"]) == 3
    assert set(body["methods"]) == {"mixture", "single"}
    for method in body["methods"].values():
        (run,) = method["runs"]  # --quick: one search per method
        assert -1.0 <= method["kendall_tau"] == run["kendall_tau"] <= 1.0
        assert run["top_pick"] in body["ground_truth"]
    assert body["provenance"]["command"].endswith("--record " + str(record))


def test_the_original_keeps_its_modes_and_requires_grad_flags(images: Path) -> None:
    model = plain_net().train()
    model[0].weight.requires_grad_(False)
    search(model, images, budget=6, supernets=2, **QUICK)
    assert all(m.training for m in model.modules()), "the original was left in eval mode"
    flags = [p.requires_grad for p in model.parameters()]
    assert flags[0] is False and all(flags[1:]), f"requires_grad flags changed: {flags}"


def test_a_model_without_class_scores_is_refused_before_training(
    images: Path, tmp_path: Path
) -> None:
    from surgeon.errors import AnalysisError

    backbone = torch.nn.Sequential(*list(plain_net())[:12])  # the convs, no pooled head
    with pytest.raises(AnalysisError, match="returns no class scores"):
        search(backbone, images, budget=6, out=tmp_path / "out", **QUICK)
    assert not any(tmp_path.iterdir()), "something was written"


def test_the_pareto_front_keeps_the_points_nothing_beats() -> None:
    from surgeon.ranking import pareto_front

    points = [(0.9, 100), (0.8, 50), (0.85, 120), (0.9, 100), (0.7, 50), (0.95, 200)]
    assert pareto_front(points) == [True, True, False, True, False, True]


def test_a_step_trains_only_the_supernet_its_placement_is_routed_to() -> None:
    from surgeon.data import ImageBatch
    from surgeon.distill import DistillLoss
    from surgeon.search import SearchObjective
    from surgeon.supernet import SupernetMixture
    from surgeon.training import Distributed

    teacher = plain_net().eval()
    space = PlacementSpace.of(teacher, _example())
    candidates = list(space.placements())
    layers = [layer.name for layer in space.candidates]
    mixture = SupernetMixture(teacher, layers, candidates, supernets=3, seed=0)
    objective = SearchObjective(
        mixture,
        teacher,
        DistillLoss(),
        Distributed(1, 0, 0, torch.device("cpu"), None),
        labels=False,
        assignment_lr=1.0,
        balance=1.0,
        seed=0,
    )
    before = mixture.assignment.clone()
    index = placement_at(0, len(candidates), 0)
    route = mixture.assigned()[index]
    images = torch.randn(4, 3, SIZE, SIZE)
    batch = ImageBatch(images, torch.zeros(4, dtype=torch.long), torch.arange(4), ())
    objective(mixture, batch).loss.backward()
    for k, net in enumerate(mixture.supernets):
        norm = sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
        assert (norm > 0) == (k == route), f"supernet {k} (route {route}): gradient {norm}"
    moved = (mixture.assignment - before).abs().sum(-1)
    assert moved[index] > 0, "the trained placement's assignment did not move"
    assert mixture.selected == index
