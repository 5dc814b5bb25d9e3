"""`surgeon eval` measures models a user can trust at a glance: a spec is built the same way on
every run (from --seed, or with the same weights options as `surgeon patch`), each row says
which weights it measured, `--baseline` compares a checkpoint with the original it was patched
from, and a data folder that does not fit the model is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import typer.main
from PIL import Image

import surgeon
from surgeon.checkpoint.resolve import load_original
from surgeon.cli import app
from surgeon.errors import CheckpointError, UsageError, WeightsError
from surgeon.evaluate import EvalOptions, evaluate
from surgeon.models import example_inputs, load_model
from tests.clirun import run_cli
from tests.hubcache import HubCache

TINY = "tests.tiny_models:tiny_resnet"
TRUST = ("--trust-import", TINY)
QUICK = ("--pairs", "8", "--latency-runs", "0", "--input-size", "3x32x32")


def _patched(directory: Path, spec: str = TINY, **build: object) -> Path:
    """`spec` (built with `build`) patched with spd at 32x32 and saved to `directory`."""
    loaded = load_model(spec, **build)  # type: ignore[arg-type]
    loaded.input_size = (3, 32, 32)
    model, report = surgeon.patch(
        loaded.model, "spd", example_inputs("classification", (3, 32, 32))
    )
    return surgeon.save(directory, model, loaded, report, "spd")


def _rows(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    code, stdout, err = run_cli(capsys, "eval", *args, "--json")
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(stdout)
    return rows


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_spec_is_built_from_the_seed_so_two_runs_give_identical_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, first, err = run_cli(capsys, "eval", TINY, *QUICK, "--json")
    assert code == 0, err
    code, second, err = run_cli(capsys, "eval", TINY, *QUICK, "--json")
    assert code == 0, err
    assert first == second, "two runs of the same command measured different models"
    (row,) = json.loads(first)
    assert row["weights"] == {"kind": "random", "seed": 0} and row["latency_ms"] is None
    (other,) = _rows(capsys, TINY, *QUICK, "--seed", "1")
    assert other["weights"] == {"kind": "random", "seed": 1}
    assert other["softmax_change"] != row["softmax_change"], "--seed 1 built the same model"


def test_eval_takes_the_model_options_of_patch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    for name in ("--weights", "--pretrained", "--model-kwarg", "--seed", "--input-size"):
        shown = {
            command: next((p.help, p.metavar) for p in commands[command].params if name in p.opts)
            for command in ("patch", "eval")
        }
        assert shown["patch"] == shown["eval"], f"eval's {name} differs from patch's: {shown}"

    weights = tmp_path / "w.pt"
    torch.save(load_model(TINY, seed=7).model.state_dict(), weights)
    (row,) = _rows(capsys, TINY, *QUICK, "--weights", str(weights))
    assert row["weights"]["kind"] == "file" and row["weights"]["path"] == str(weights.resolve())
    (wide,) = _rows(capsys, TINY, *QUICK, "--model-kwarg", "width=8")
    assert wide["params"] > row["params"], "--model-kwarg did not reach the factory"
    code, _, err = run_cli(capsys, "eval", TINY, *QUICK, "--pretrained")
    assert code == 2 and "user factory with no library weights; pass --weights FILE" in err


def test_every_row_says_which_weights_it_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _patched(tmp_path / "ck")
    code, stdout, err = run_cli(capsys, "eval", TINY, str(ck), *TRUST, *QUICK)
    assert code == 0, err
    spec_row = next(line for line in stdout.splitlines() if "tests.tiny_models" in line)
    ck_row = next(line for line in stdout.splitlines() if " spd " in line)
    assert "random, seed 0 " in spec_row and "random, seed 0, patched" in ck_row, stdout


def test_baseline_of_an_exact_transfer_checkpoint_gives_equal_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _patched(tmp_path / "ck", seed=3)
    original, patched = _rows(capsys, str(ck), *TRUST, *QUICK, "--baseline")
    assert original["model"] == f"{ck} (original)" and original["baseline_of"] == str(ck)
    assert original["policy"] is None and patched["policy"] == "spd"
    assert original["weights"] == patched["weights"] == {"kind": "random", "seed": 3}
    # spd transfers exactly: the same function, so the same measurements (to float rounding)
    for key in ("consistency_crop", "consistency_circular"):
        assert original[key] == patched[key], key
    assert original["softmax_change"] == pytest.approx(patched["softmax_change"], abs=1e-5)
    assert patched["params"] > original["params"], "the baseline is the patched model again"


def test_baseline_weights_that_are_gone_changed_or_unrecorded_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, spare = tmp_path / "w.pt", tmp_path / "spare.pt"
    torch.save(load_model(TINY, seed=5).model.state_dict(), weights)
    shutil.copy(weights, spare)
    ck = _patched(tmp_path / "ck", weights=weights)
    original, _ = _rows(capsys, str(ck), *TRUST, *QUICK, "--baseline")
    assert original["weights"]["kind"] == "file"

    torch.save(load_model(TINY, seed=6).model.state_dict(), weights)
    code, _, err = run_cli(capsys, "eval", str(ck), *TRUST, *QUICK, "--baseline")
    assert code == 1
    line = _one_error(err)
    assert "has changed since" in line and line.endswith(
        "pass --weights FILE with the weights it was patched from"
    )
    _rows(capsys, str(ck), *TRUST, *QUICK, "--baseline", "--weights", str(spare))
    with pytest.raises(WeightsError, match=r"pass weights_override=FILE"):
        load_original(ck, trust_import=[TINY])

    weights.unlink()
    code, _, err = run_cli(capsys, "eval", str(ck), *TRUST, *QUICK, "--baseline")
    assert code == 1 and "which no longer exists; pass --weights FILE" in _one_error(err)

    old = tmp_path / "old"
    surgeon.upgrade(Path(__file__).parent / "data" / "v1" / "tiny-spd", old, trust_import=[TINY])
    code, _, err = run_cli(capsys, "eval", str(old), *TRUST, *QUICK, "--baseline")
    assert code == 1 and "does not record the weights it was patched from" in _one_error(err)
    with pytest.raises(CheckpointError, match="pass weights_override=FILE"):
        load_original(old, trust_import=[TINY])


def test_baseline_of_a_pretrained_checkpoint_is_built_from_the_same_cached_weights(
    hub_cache: HubCache, tmp_path: Path
) -> None:
    name = "timm:test_resnet.r160_in1k"
    _, seeded = hub_cache.seed_timm("test_resnet.r160_in1k", tmp_path, seed=3)
    ck = _patched(tmp_path / "ck", name, pretrained=True)
    original = load_original(ck)
    assert original.weights["kind"] == "pretrained" and original.input_size == (3, 32, 32)
    state = original.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in seeded.items()), "not the cached weights"

    hub_cache.seed_timm("test_resnet.r160_in1k", tmp_path / "other", seed=4)
    with pytest.raises(WeightsError, match=r"are not those .* was patched from"):
        load_original(ck)


def _image_folder(root: Path, classes: tuple[str, ...]) -> Path:
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(2):
            colour = (200 * (k == 0), 200 * (k == 1), 40 * i)
            Image.new("RGB", (24, 24), colour).save(root / name / f"{i}.png")
    return root


def test_a_data_folder_that_does_not_fit_the_outputs_is_one_line_and_a_class_map_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _image_folder(tmp_path / "data", ("cat", "dog"))  # tiny_resnet has 3 classes
    code, stdout, err = run_cli(capsys, "eval", TINY, *QUICK, "--data", str(data))
    assert code == 2 and stdout == ""
    line = _one_error(err)
    assert "has 2 class folders but the model has 3 outputs" in line
    assert "pass --class-map FILE.json" in line
    with pytest.raises(UsageError, match=r"pass class_map=FILE\.json"):
        evaluate([TINY], EvalOptions(pairs=2, latency_runs=0, data=data))

    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps({"cat": 0, "dog": 2}))
    args = ("--data", str(data), "--class-map", str(class_map))
    (row,) = _rows(capsys, TINY, *QUICK, *args)
    assert row["accuracy_images"] == 4 and row["accuracy_top5"] == 1.0  # 3 classes: all in top 5
    code, stdout, err = run_cli(capsys, "eval", TINY, *QUICK, *args)
    assert code == 0, err
    header = next(line for line in stdout.splitlines() if "top-1" in line)
    assert "top-5" in header, "the table hides the top-5 accuracy the JSON has"

    class_map.write_text(json.dumps({"cat": 0, "dog": 3}))
    code, _, err = run_cli(capsys, "eval", TINY, *QUICK, *args)
    assert code == 2 and "gives 'dog' class index 3, but the model has 3 outputs" in err
