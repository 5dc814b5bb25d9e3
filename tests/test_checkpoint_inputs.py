"""Checkpoints as inputs: every command that takes a model takes a checkpoint directory, a
checkpoint patched again records an ordered history that `load` rebuilds and `info` shows, and
a policy applied twice changes nothing and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.checkpoint.resolve import resolve_model
from surgeon.errors import UsageError
from surgeon.models import example_inputs, load_model
from tests.clirun import run_cli

TINY = "tests.tiny_models:tiny_resnet"
TRUST = ("--trust-import", TINY)
SIZE = ("--input-size", "3x32x32")


@pytest.fixture(scope="module")
def spd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_resnet (random init, seed 0) patched with spd at 32x32, as `surgeon patch` writes it."""
    loaded = load_model(TINY)
    loaded.input_size = (3, 32, 32)
    model, report = surgeon.patch(
        loaded.model, "spd", example_inputs("classification", (3, 32, 32))
    )
    return surgeon.save(tmp_path_factory.mktemp("ck") / "tiny-spd", model, loaded, report, "spd")


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_every_model_command_takes_a_checkpoint_directory(
    spd_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = str(spd_checkpoint)
    code, stdout, err = run_cli(capsys, "scan", ck, *TRUST, "--json")
    assert code == 0, err
    assert f"checkpoint {ck}: {TINY} (random weights, seed 0) patched with spd" in err
    scanned = json.loads(stdout)
    assert scanned["model"] == ck
    # the patched model is scanned: its strided convs became SPD-Conv, its max pools remain
    assert {s["name"] for s in scanned["sites"] if s["role"] == "downsample"} == {
        "maxpool",
        "head:max_pool2d",
    }

    code, stdout, err = run_cli(capsys, "placements", ck, *TRUST)
    assert code == 0 and "current placement" in stdout, err

    code, stdout, err = run_cli(capsys, "eval", ck, *TRUST, "--pairs", "2", "--latency-runs", "0")
    assert code == 0 and "spd" in stdout, err

    exported = tmp_path / "tiny.pt"
    args = ["--format", "torchscript", "--method", "trace", "--out", str(exported)]
    code, stdout, err = run_cli(capsys, "export", ck, *TRUST, *args)
    assert code == 0 and exported.is_file(), err

    code, stdout, err = run_cli(capsys, "patch", ck, *TRUST, "-p", "antialias", "--dry-run")
    assert code == 0 and "dry run" in err, err


def test_weights_options_are_refused_with_a_checkpoint(
    spd_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = run_cli(
        capsys, "scan", str(spd_checkpoint), *TRUST, "--model-kwarg", "width=8"
    )
    assert code == 2 and stdout == ""
    assert "is a checkpoint" in _one_error(err) and "--model-kwarg applies to model specs" in err
    with pytest.raises(UsageError, match="weights applies to model specs only"):
        resolve_model(spd_checkpoint, weights=Path("w.pt"))


def test_stacked_surgery_is_an_ordered_history_that_load_rebuilds_and_info_shows(
    spd_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stacked = tmp_path / "tiny-spd-aa"
    code, stdout, err = run_cli(
        capsys, "patch", str(spd_checkpoint), *TRUST, "-p", "antialias", "--out", str(stacked)
    )
    assert code == 0, err
    manifest = json.loads((stacked / "surgery.json").read_text())
    first = json.loads((spd_checkpoint / "surgery.json").read_text())
    assert [e["kind"] for e in manifest["history"]] == ["patch", "patch"]
    assert [e["policy"]["name"] for e in manifest["history"]] == ["spd", "antialias"]
    assert manifest["history"][0] == first["history"][0], "the first surgery was not kept as is"
    assert manifest["model"] == first["model"], "the source model is still the original"

    # load applies both entries in order: the same function as patching the loaded checkpoint
    expected, _ = surgeon.patch(
        surgeon.load(spd_checkpoint, trust_import=[TINY]),
        "antialias",
        example_inputs("classification", (3, 32, 32)),
    )
    rebuilt = surgeon.load(stacked, trust_import=[TINY])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected.eval()(x)), "load did not rebuild the stack"

    code, stdout, err = run_cli(capsys, "info", str(stacked))
    assert code == 0, err
    assert f"{TINY} patched with policy spd + antialias" in stdout
    assert "format version 2; patch + patch" in stdout
    numbered = [line.strip() for line in stdout.splitlines() if line.strip()[:3] in ("1. ", "2. ")]
    assert numbered[0].startswith("1. patch with policy spd (seed 0): 3 sites patched"), stdout
    assert numbered[1].startswith("2. patch with policy antialias (seed 0): 2 sites"), stdout
    assert "source: tests.tiny_models:tiny_resnet (random weights, seed 0)" in stdout


def test_patching_the_same_policy_twice_changes_nothing_and_says_so(
    spd_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = tmp_path / "again"
    code, stdout, err = run_cli(
        capsys, "patch", str(spd_checkpoint), *TRUST, "-p", "spd", "--out", str(again)
    )
    assert code == 0, err
    assert "0 patched" in stdout
    (line,) = [line for line in err.splitlines() if line.startswith("policy spd")]
    assert "was already applied (history entry 1) and changes nothing more" in line
    assert "2 kept by rule 1 (keep-max-pools)" in line, line
    assert line.endswith("no checkpoint written (--allow-unchanged writes one)"), line
    assert not again.exists(), "a checkpoint identical to its input was written"

    code, _, err = run_cli(
        capsys,
        "patch",
        str(spd_checkpoint),
        *TRUST,
        "-p",
        "spd",
        "--out",
        str(again),
        "--allow-unchanged",
    )
    assert code == 0 and "already applied" in err and f"wrote {again}" in err, err
    kinds = [e["kind"] for e in json.loads((again / "surgery.json").read_text())["history"]]
    assert kinds == ["patch", "patch"]


def test_a_version_1_checkpoint_is_upgraded_before_it_is_patched_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "v1" / "tiny-spd", old)
    code, _, err = run_cli(capsys, "patch", str(old), *TRUST, "-p", "antialias", "--dry-run")
    assert code == 1
    assert _one_error(err).endswith(f"rewrite it as version 2 first (surgeon upgrade {old})")


def test_load_returns_eval_mode_and_train_true_returns_training_mode(spd_checkpoint: Path) -> None:
    model = surgeon.load(spd_checkpoint, trust_import=[TINY])
    assert not any(m.training for m in model.modules()), "load did not return eval mode"
    model = surgeon.load(spd_checkpoint, train=True, trust_import=[TINY])
    assert all(m.training for m in model.modules()), "train=True did not return training mode"
