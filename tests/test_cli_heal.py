"""`surgeon heal` end to end: the teacher rebuilt from the checkpoint (and its weights' hash
checked), a healed checkpoint that info, load, eval and export use, and torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.clirun import run_cli
from tests.heal_fixtures import SIZE, TinyNet, trained_tiny_net, write_images

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.heal_fixtures:tiny_net"
TRUST = ("--trust-import", FACTORY)
QUICK = ("--batch-size", "16", "--workers", "0", "--device", "cpu", *TRUST)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled image folder, the original's weights trained on it, and a checkpoint of
    the original patched with `antialias` from that weights file."""
    root = tmp_path_factory.mktemp("heal-cli")
    write_images(root / "images", 120, classes=3, size=SIZE)
    teacher = trained_tiny_net(root / "images")
    save_file(teacher.state_dict(), str(root / "teacher.safetensors"))
    torch.manual_seed(7)
    save_file(TinyNet(num_classes=3).state_dict(), str(root / "other.safetensors"))
    done = _surgeon(
        "patch",
        FACTORY,
        "--model-kwarg",
        "num_classes=3",
        "--policy",
        "antialias",
        "--weights",
        str(root / "teacher.safetensors"),
        "--input-size",
        f"3x{SIZE}x{SIZE}",
        "--out",
        str(root / "patched"),
    )
    assert done.returncode == 0, done.stderr
    return root


def _surgeon(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "surgeon", *args], env=env, capture_output=True, text=True
    )


def test_heal_writes_a_checkpoint_that_info_load_eval_and_export_use(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "healed"
    images = str(setup / "images")
    code, stdout, err = run_cli(
        capsys,
        "heal",
        str(setup / "patched"),
        "--data",
        images,
        "--out",
        str(out),
        "--steps",
        "12",
        "--lr",
        "3e-3",
        "--features",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    record = json.loads(stdout)
    # healing itself is pinned in test_heal.py; here: it ran, measured and matched features
    assert record["after"]["agreement"] >= 0.9 and record["teacher"]["agreement"] == 1.0, record
    assert {"kd", "features"} <= set(record["losses"]), record["losses"]
    assert record["features"] == ["3", "6"], record["features"]
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "surgery.json",
        "report.md",
        "heal-log.jsonl",
    }
    assert not (tmp_path / "healed.heal-state").exists(), "the state directory was left behind"
    manifest = json.loads((out / "surgery.json").read_text())
    assert [e["kind"] for e in manifest["history"]] == ["patch", "heal"]
    entry = manifest["history"][1]
    assert entry["data"]["images"] == 120 and entry["steps"] == 12 and entry["world_size"] == 1
    assert len(entry["data"]["sha256"]) == 64 and entry["versions"]["torch"]
    assert "## Heal" in (out / "report.md").read_text()

    code, stdout, err = run_cli(capsys, "info", str(out))
    assert code == 0, err
    shown = " ".join(stdout.split())  # long tmp paths wrap the lines
    assert "patch + heal" in shown and "healed (" in shown and "12 steps of 16 x 1" in shown
    code, stdout, err = run_cli(capsys, "load", str(out), *TRUST)
    assert code == 0 and "forward pass ok" in stdout, err
    code, stdout, err = run_cli(
        capsys,
        "eval",
        str(setup / "patched"),
        str(out),
        "--baseline",
        "--pairs",
        "8",
        "--json",
        *TRUST,
    )
    assert code == 0, err
    rows = json.loads(stdout)
    assert [(r["model"], r["policy"]) for r in rows] == [
        (f"{setup / 'patched'} (original)", None),
        (str(setup / "patched"), "antialias"),
        (str(out), "antialias + heal"),
    ]
    assert rows[0]["macs"] < rows[1]["macs"] == rows[2]["macs"]
    code, stdout, err = run_cli(
        capsys,
        "export",
        str(out),
        "--format",
        "torchscript",
        "--out",
        str(tmp_path / "h.pt"),
        *TRUST,
    )
    assert code == 0, err


def test_teacher_weights_that_moved_are_found_and_others_refused(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patched = tmp_path / "patched"
    shutil.copytree(setup / "patched", patched)
    manifest = json.loads((patched / "surgery.json").read_text())
    moved = tmp_path / "moved.safetensors"
    shutil.copy(setup / "teacher.safetensors", moved)
    # the checkpoint as it would read had the file lived somewhere that is gone now
    manifest["model"]["weights"]["path"] = str(tmp_path / "gone" / "teacher.safetensors")
    (patched / "surgery.json").write_text(json.dumps(manifest))
    common = ("heal", str(patched), "--data", str(setup / "images"), "--steps", "1", *QUICK)

    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "a"))
    assert code == 1 and "is gone; pass --teacher-weights FILE" in err, err
    assert len(err.strip().splitlines()) == 1, err
    other = str(setup / "other.safetensors")
    code, _, err = run_cli(
        capsys, *common, "--out", str(tmp_path / "b"), "--teacher-weights", other
    )
    assert code == 1 and "but the original was patched from weights with" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()
    code, _, err = run_cli(
        capsys, *common, "--out", str(tmp_path / "c"), "--teacher-weights", str(moved)
    )
    assert code == 0, err


def test_a_random_original_is_rebuilt_from_its_seed(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`spd` transfers weights exactly, so the rebuilt teacher agrees with the student on
    every held-out image before any step, if (and only if) it is the same random model."""
    patched = tmp_path / "spd"
    code, _, err = run_cli(
        capsys,
        "patch",
        FACTORY,
        "--model-kwarg",
        "num_classes=3",
        "--policy",
        "spd",
        "--seed",
        "3",
        "--input-size",
        f"3x{SIZE}x{SIZE}",
        "--out",
        str(patched),
    )
    assert code == 0, err
    code, stdout, err = run_cli(
        capsys,
        "heal",
        str(patched),
        "--data",
        str(setup / "images"),
        "--out",
        str(tmp_path / "healed"),
        "--steps",
        "1",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    record = json.loads(stdout)
    assert record["before"]["agreement"] == 1.0, record["before"]
    assert record["before"]["consistency_crop"] == record["teacher"]["consistency_crop"]


def test_refusals_are_one_line(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = str(setup / "images")
    v1 = ROOT / "tests" / "data" / "v1" / "tiny-spd"
    code, _, err = run_cli(
        capsys, "heal", str(v1), "--data", images, "--out", str(tmp_path / "a"), "--steps", "1"
    )
    assert code == 1 and "version-1 checkpoint" in err and "surgeon upgrade" in err, err
    code, _, err = run_cli(
        capsys,
        "heal",
        str(setup / "patched"),
        "--data",
        images,
        "--out",
        str(tmp_path / "b"),
        "--steps",
        "2",
        "--epochs",
        "1",
    )
    assert code == 2 and "either steps or epochs" in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(
        capsys,
        "heal",
        str(setup / "patched"),
        "--data",
        str(empty),
        "--out",
        str(tmp_path / "c"),
        "--steps",
        "2",
        *QUICK,
    )
    assert code == 1 and "no images in" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_torchrun_runs_the_same_command_on_two_processes_and_rank_0_alone_writes(
    setup: Path, tmp_path: Path
) -> None:
    out = tmp_path / "healed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc-per-node", "2", "-m", "surgeon", "heal", str(setup / "patched")),
            *("--data", str(setup / "images"), "--out", str(out), "--steps", "4"),
            *("--batch-size", "8", "--workers", "0", "--device", "cpu", "--json", *TRUST),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)  # one JSON document: rank 1 printed nothing
    assert record["world_size"] == 2 and record["steps"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]
    log = [json.loads(line) for line in (out / "heal-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4], "each logged step once, by rank 0"
    assert log[0]["images"] == 4 * 2 * 8, "each step saw a batch of 8 on both processes"
    assert done.stderr.count(f"wrote {out}") == 1


def test_ctrl_c_says_where_the_state_is_and_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["surgeon.heal"], "heal_checkpoint", interrupted)
    out = tmp_path / "healed"
    code, _, err = run_cli(
        capsys, "heal", "ckpt", "--data", "images", "--out", str(out), "--steps", "1"
    )
    assert code == 130, err
    assert f"{out} was not written" in err and "healed.heal-state" in err and "--resume" in err
