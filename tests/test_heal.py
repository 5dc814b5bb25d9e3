"""surgeon.heal: distillation brings a patched model back to its original, on one process or
two (torchrun), survives SIGKILL (resume is bit-identical), and stops cleanly on NaN."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from surgeon.errors import TrainingError, UsageError
from surgeon.heal import heal
from surgeon.patch import patch
from surgeon.training import STATE_FILE
from tests.heal_fixtures import SIZE, trained_tiny_net, write_images

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "heal_run.py"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Two torch threads on a shared 2-core machine spin against each other (BatchNorm on
    tiny maps: 300x slower); these tests are about numbers, not speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    write_images(root, 240, classes=3, size=SIZE)
    return root


def _trained_teacher(data: Path) -> nn.Module:
    return trained_tiny_net(data)


def _patched(teacher: nn.Module, policy: str | Path) -> tuple[nn.Module, list[str]]:
    student, report = patch(copy.deepcopy(teacher), policy, torch.randn(1, 3, SIZE, SIZE))
    return student, [r.site for r in report.rows if r.status == "patched"]


RANDOM_SPD = """\
name: spd-random
description: SPD-Conv at every strided conv, new weights drawn at random (no transfer)
rules:
  - match: {op: conv}
    action: spd
    params: {init: random}
"""


def test_heal_brings_a_patched_model_back_to_its_original(labelled: Path, tmp_path: Path) -> None:
    """SPD-Conv layers started at random lose the teacher's function; distillation on the
    unlabelled images gives it back."""
    teacher = _trained_teacher(labelled)
    policy = tmp_path / "spd-random.yaml"
    policy.write_text(RANDOM_SPD)
    student, _ = _patched(teacher, policy)
    result = heal(
        student,
        teacher,
        labelled,
        steps=40,
        batch_size=16,
        lr=3e-3,
        input_size=(3, SIZE, SIZE),
        workers=0,
        holdout=0.25,
        progress=False,
    )
    before, after = result.before.agreement, result.after.agreement
    assert before is not None and after is not None
    assert after > before, f"agreement with the teacher went {before:.3f} -> {after:.3f}"
    assert after >= 0.9, f"healed agreement only {after:.3f}"
    assert result.teacher.agreement == 1.0
    assert result.holdout_images == 60 and result.train_images == 180
    assert result.images == 240 and result.images_skipped == 0
    assert set(result.losses) >= {"loss", "kd", "agreement"}
    assert result.after.consistency_crop is not None
    record = result.record()
    assert record["kind"] == "heal" and record["data"]["sha256"] == result.data_sha256
    json.dumps(record)  # JSON-ready
    assert not student.training, "the healed student is left in train mode"


def test_labels_add_cross_entropy_and_features_match_the_patched_sites(labelled: Path) -> None:
    teacher = _trained_teacher(labelled)
    student, sites = _patched(teacher, "antialias")
    console = Console(width=120, file=io.StringIO(), color_system=None)
    result = heal(
        student,
        teacher,
        labelled,
        steps=6,
        batch_size=16,
        labels=True,
        features=sites,
        input_size=(3, SIZE, SIZE),
        workers=0,
        console=console,
    )
    assert result.features == ("3", "6"), result.features
    assert {"kd", "ce", "features"} <= set(result.losses), result.losses
    assert result.after.accuracy is not None and result.teacher.accuracy is not None
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "6/6" in shown and "loss" in shown and "agree" in shown and "img/s" in shown, shown


def test_freeze_bn_keeps_the_running_statistics(labelled: Path) -> None:
    teacher = _trained_teacher(labelled)
    student, _ = _patched(teacher, "antialias")
    norms = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    means = [m.running_mean.clone() for m in norms]
    heal(
        student,
        teacher,
        labelled,
        steps=3,
        batch_size=16,
        freeze_bn=True,
        input_size=(3, SIZE, SIZE),
        workers=0,
        progress=False,
    )
    for m, before in zip(norms, means, strict=True):
        assert torch.equal(m.running_mean, before), "freeze_bn let BatchNorm statistics move"
    heal(
        student,
        teacher,
        labelled,
        steps=3,
        batch_size=16,
        input_size=(3, SIZE, SIZE),
        workers=0,
        progress=False,
    )
    assert not torch.equal(norms[0].running_mean, means[0]), "BatchNorm did not train"


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_state(
    labelled: Path, tmp_path: Path
) -> None:
    teacher = _trained_teacher(labelled)
    student, _ = _patched(teacher, "antialias")
    calls = {"n": 0}

    def poison(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # no held-out images, no features: one student forward per step
        return output * float("nan") if calls["n"] > 4 else output

    student.register_forward_hook(poison)
    state_dir = tmp_path / "state"
    with pytest.raises(TrainingError) as err:
        heal(
            student,
            teacher,
            labelled,
            steps=20,
            batch_size=16,
            input_size=(3, SIZE, SIZE),
            workers=0,
            holdout=0.0,
            state_dir=state_dir,
            state_every=2,
            progress=False,
        )
    message = str(err.value)
    assert "\n" not in message
    assert "nan at step 5" in message and "--lr" in message, message
    state = torch.load(state_dir / STATE_FILE, weights_only=True)
    assert state["step"] == 4, f"the state checkpoint moved to step {state['step']}"
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert sorted(p.name for p in state_dir.iterdir()) == ["log.jsonl", STATE_FILE]


def test_an_earlier_state_needs_resume_and_resume_needs_the_same_options(
    labelled: Path, tmp_path: Path
) -> None:
    teacher = _trained_teacher(labelled)
    student, _ = _patched(teacher, "antialias")
    options = dict(input_size=(3, SIZE, SIZE), workers=0, progress=False, state_every=2)
    state_dir = tmp_path / "state"
    heal(student, teacher, labelled, steps=4, batch_size=16, state_dir=state_dir, **options)
    with pytest.raises(TrainingError, match="pass --resume to continue it"):
        heal(student, teacher, labelled, steps=4, batch_size=16, state_dir=state_dir, **options)
    with pytest.raises(TrainingError, match="batch_size 16, this run has 8"):
        heal(
            student,
            teacher,
            labelled,
            steps=4,
            batch_size=8,
            state_dir=state_dir,
            resume=True,
            **options,
        )
    # a lower learning rate is the way out of a diverged run: it may change on resume
    resumed = heal(
        student,
        teacher,
        labelled,
        steps=4,
        batch_size=16,
        lr=1e-5,
        state_dir=state_dir,
        resume=True,
        **options,
    )
    assert resumed.resumed_from == 2 and resumed.steps == 4
    with pytest.raises(TrainingError, match="no state checkpoint"):
        heal(student, teacher, labelled, steps=4, state_dir=tmp_path / "none", resume=True)
    with pytest.raises(UsageError, match="either steps or epochs"):
        heal(student, teacher, labelled, steps=4, epochs=1.0)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(RUN), *args], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_images(data, 40)
    _run(str(data), str(tmp_path / "whole"), str(tmp_path / "whole.safetensors"))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(RUN),
            str(data),
            str(killed),
            str(tmp_path / "r.safetensors"),
            "--sleep",
            "0.15",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while not (killed / STATE_FILE).exists():
        assert proc.poll() is None, f"the run ended before a state checkpoint: {proc.stderr}"
        assert time.monotonic() < deadline, "no state checkpoint within 90 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(killed / STATE_FILE, weights_only=True)["step"]
    assert 0 < step < 12, f"killed at step {step}: not mid-run"

    resumed = _run(str(data), str(killed), str(tmp_path / "r.safetensors"), "--resume")
    assert f"resumed from {step}" in resumed.stdout, resumed.stdout
    whole = load_file(tmp_path / "whole.safetensors")
    again = load_file(tmp_path / "r.safetensors")
    assert whole.keys() == again.keys()
    differ = [k for k in whole if not torch.equal(whole[k], again[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ}"
    log = (killed / "log.jsonl").read_text().splitlines()
    steps = [json.loads(line).get("step") for line in log]
    assert steps == [2, 4, 6, 8, 10, 12], f"log after resume: {steps}"


@pytest.mark.slow
def test_compiled_student_heals_with_feature_taps(labelled: Path) -> None:
    """torch.compile of the student (inductor needs a C++ compiler: about a minute on CPU)."""
    teacher = _trained_teacher(labelled)
    student, sites = _patched(teacher, "antialias")
    result = heal(
        student,
        teacher,
        labelled,
        steps=4,
        batch_size=16,
        features=sites,
        compile=True,
        input_size=(3, SIZE, SIZE),
        workers=0,
        progress=False,
    )
    assert result.steps == 4 and "features" in result.losses
