"""`surgeon search` end to end: the ranking and policies written, the policies applied by
`surgeon patch` as they are, one-line refusals that write nothing, torchrun, Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from surgeon.checkpoint.restore import load_checkpoint
from tests.clirun import run_cli
from tests.heal_fixtures import write_images

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.search_fixtures:plain_net"
SIZE = 16
QUICK = ("--input-size", f"3x{SIZE}x{SIZE}", "--batch-size", "8", "--workers", "0")
QUICK += ("--device", "cpu", "--lr", "0.003")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search-cli")
    write_images(root, 80, classes=3, size=SIZE)
    return root


def test_search_writes_policies_that_patch_applies_as_they_are(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ranking"
    code, stdout, err = run_cli(
        capsys, "search", FACTORY, "--data", str(images), "--budget", "12", "--supernets", "2",
        "--top", "2", "--out", str(out), *QUICK,
    )  # fmt: skip
    assert code == 0, err
    assert "rank" in stdout and "placement" in stdout and f"wrote {out}" in err
    record = json.loads((out / "ranking.json").read_text())
    assert len(record["candidates"]) == 6 and record["supernets"] == 2
    for candidate in record["candidates"][:2]:
        policy = out / "policies" / f"rank-{candidate['rank']}.yaml"
        patched = tmp_path / f"patched-{candidate['rank']}"
        code, _, err = run_cli(
            capsys, "patch", FACTORY, "--policy", str(policy), "--out", str(patched),
            "--input-size", f"3x{SIZE}x{SIZE}",
        )  # fmt: skip
        assert code == 0, err
        model = load_checkpoint(patched, trust_import=[FACTORY])
        strided = [
            name
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)
        ]
        assert strided == candidate["placement"], f"{policy} patched {strided}"


def test_json_prints_the_ranking_record(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = run_cli(
        capsys, "search", FACTORY, "--data", str(images), "--budget", "6", "--supernets", "1",
        "--out", str(tmp_path / "r"), "--json", *QUICK,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(stdout)
    assert record["kind"] == "search" and record["shares"] == [1.0]
    assert [c["rank"] for c in record["candidates"]] == [1, 2, 3, 4, 5, 6]


def test_refusals_are_one_line_and_write_nothing(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    cases = [
        ("tests.heal_fixtures:tiny_net", images, "12", 2, "no downsampling that can move"),
        (FACTORY, empty, "12", 1, "no images in"),
        (FACTORY, images, "3", 2, "cannot visit each of the 6 candidate placements"),
    ]
    for model, data, budget, exit_code, words in cases:
        code, _, err = run_cli(
            capsys, "search", model, "--data", str(data), "--budget", budget, "--out", str(out),
            *QUICK,
        )  # fmt: skip
        lines = [line for line in err.splitlines() if not line.startswith("model ")]
        assert code == exit_code and words in err, err
        assert len(lines) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], f"{words}: wrote files"


def test_torchrun_runs_the_search_on_two_processes_and_rank_0_alone_writes(
    images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ranking"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc-per-node", "2", "-m", "surgeon", "search", FACTORY),
            *("--data", str(images), "--out", str(out), "--budget", "6", "--supernets", "2"),
            *("--json", *QUICK),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)  # one JSON document: rank 1 printed nothing
    assert record["world_size"] == 2 and record["steps"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking"]
    log = [json.loads(line) for line in (out / "search-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [6], "each logged step once, by rank 0"
    assert log[0]["images"] == 6 * 2 * 8, "each step saw a batch of 8 on both processes"
    assert done.stderr.count(f"wrote {out}") == 1


def test_ctrl_c_says_where_the_state_is_and_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["surgeon.search"], "search", interrupted)
    out = tmp_path / "ranking"
    code, _, err = run_cli(
        capsys, "search", FACTORY, "--data", "images", "--out", str(out), "--budget", "6", *QUICK
    )
    assert code == 130, err
    assert f"{out} was not written" in err and "ranking.search-state" in err and "--resume" in err
