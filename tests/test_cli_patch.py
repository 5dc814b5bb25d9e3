"""`surgeon patch/info/load` end to end: the checkpoint round trip, weights, plugins, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgeon.api
from surgeon.models import load_model
from surgeon.patch import patch
from tests.clirun import run_cli


def test_patch_writes_a_checkpoint_that_reloads_bit_identically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r18"
    code, stdout, err = run_cli(
        capsys,
        "patch",
        "resnet18",
        "--policy",
        "spd",
        "--out",
        str(out),
        "--input-size",
        "3x64x64",
        "--report",
        str(tmp_path / "r.json"),
    )
    assert code == 0, err
    assert "SPD b2 + conv" in stdout and f"wrote {out}" in err
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "surgery.json", "report.md"}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["patched"] == 7

    loaded_a = surgeon.api.load(out)
    loaded_b = surgeon.api.load(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded_a(x), loaded_b(x))
    # the same as patching by hand with the same seed and the checkpoint's weights
    model, _ = patch(load_model("resnet18").model, "spd", torch.randn(1, 3, 64, 64))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(out / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(x), loaded_a(x))

    code, stdout, _ = run_cli(capsys, "info", str(out))
    assert code == 0 and "7 sites patched" in stdout and "policy spd" in stdout
    code, stdout, _ = run_cli(capsys, "load", str(out))
    assert code == 0 and "weights verified" in stdout


def test_spd_exact_with_weights_keeps_the_function_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = load_model("mobilenet_v3_large").model
    weights = tmp_path / "w.pt"
    torch.save(original.state_dict(), weights)
    out = tmp_path / "ck"
    code, _, err = run_cli(
        capsys,
        "patch",
        "mobilenet_v3_large",
        "--policy",
        "spd",
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--input-size",
        "3x97x97",
    )
    assert code == 0, err
    patched = surgeon.api.load(out)
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        a, b = original(x), patched(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


def test_dry_run_writes_the_report_but_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    report = tmp_path / "diff.md"
    code, stdout, err = run_cli(
        capsys,
        "patch",
        "resnet18",
        "--policy",
        "antialias",
        "--out",
        str(out),
        "--dry-run",
        "--report",
        str(report),
        "--input-size",
        "3x64x64",
    )
    assert code == 0 and "BlurPool" in stdout and "dry run: no checkpoint written" in err
    assert not out.exists(), "a dry run wrote a checkpoint"
    assert report.is_file(), "a dry run dropped the --report file"
    assert "BlurPool" in report.read_text() and f"wrote {report}" in err


def test_existing_output_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "patch", "resnet18", "--policy", "spd", "--out", str(out))
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error:") and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_a_plugin_replacement_is_named_in_a_policy_like_a_builtin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "name: mine\ndescription: plugin\n"
        "rules:\n  - match: {op: max_pool}\n    action: max-to-avg\n"
    )
    code, stdout, err = run_cli(
        capsys,
        "patch",
        "resnet18",
        "--policy",
        str(policy),
        "--plugin",
        "tests.plugin_example",
        "--dry-run",
        "--input-size",
        "3x64x64",
    )
    assert code == 0, err
    assert "AvgPool2d" in stdout


def test_eval_and_export_run_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "aa"
    code, _, err = run_cli(
        capsys, "patch", "resnet18", "--policy", "antialias", "--out", str(out),
        "--input-size", "3x64x64",
    )  # fmt: skip
    assert code == 0, err
    code, stdout, err = run_cli(
        capsys, "eval", "resnet18", str(out), "--pairs", "4", "--input-size", "3x64x64", "--json"
    )
    assert code == 0, err
    rows = json.loads(stdout)
    assert [r["policy"] for r in rows] == [None, "antialias"]
    assert rows[0]["params"] == rows[1]["params"] and rows[1]["macs"] > rows[0]["macs"]
    code, stdout, err = run_cli(
        capsys, "export", str(out), "--format", "torchscript", "--out", str(tmp_path / "m.pt")
    )
    assert code == 0, err
    assert "matches eager PyTorch" in stdout and (tmp_path / "m.pt").exists()
    code, stdout, err = run_cli(capsys, "export", str(out), "--format", "onnx", "--fold", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["path"].endswith("model-folded.onnx")
    assert result["fold"]["backend"] == "onnxruntime" and "rewritten for onnxruntime" in err
    code, _, err = run_cli(capsys, "export", str(out), "--fold", "--fold-for", "tensorrt")
    assert code == 2 and "unknown fold backend 'tensorrt'" in err, err
    assert err.strip().count("\n") == 0, err


def test_patch_fold_for_a_backend_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "spd-ort"
    code, _, err = run_cli(
        capsys, "patch", "resnet18", "--policy", "spd", "--input-size", "3x32x32",
        "--fold", "--fold-for", "onnxruntime", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    fold = json.loads((out / "surgery.json").read_text())["history"][1]
    assert fold["backend"] == "onnxruntime" and len(fold["layers"]) == 7
    assert all(set(layer["timings"]) == {"kept", "folded"} for layer in fold["layers"])


def test_dilate_output_stride_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run_cli(
        capsys, "patch", "resnet18", "--policy", "dilate", "--output-stride", "16", "--dry-run",
        "--input-size", "3x64x64", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["summary"]["patched"] >= 1


def test_patch_fold_records_the_fold_and_load_replays_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from surgeon.fold import FoldedSpaceToDepthConv
    from surgeon.layers.spd import SpaceToDepthConv

    plain, folded = tmp_path / "plain", tmp_path / "folded"
    common = ["resnet18", "--policy", "spd", "--input-size", "3x48x48"]
    assert run_cli(capsys, "patch", *common, "--out", str(plain))[0] == 0
    code, _, err = run_cli(capsys, "patch", *common, "--out", str(folded), "--fold")
    assert code == 0, err
    assert "layers rewritten for eager" in err
    history = json.loads((folded / "surgery.json").read_text())["history"]
    assert [entry["kind"] for entry in history] == ["patch", "fold"]
    record = history[1]
    forms = {layer["name"]: layer["form"] for layer in record["layers"]}
    assert len(forms) == 7 and set(forms.values()) <= {"folded", "kept"}

    model = surgeon.api.load(folded)
    for name, form in forms.items():
        kind = FoldedSpaceToDepthConv if form == "folded" else SpaceToDepthConv
        assert isinstance(model.get_submodule(name), kind), name
    # the folded checkpoint computes what the unfolded one does
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want, got = surgeon.api.load(plain)(x), model(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()

    code, stdout, _ = run_cli(capsys, "info", str(folded))
    assert (
        code == 0
        and f"folded (patch --fold): {sum(f == 'folded' for f in forms.values())} of 7 layers"
        in stdout
    )

    # a fold record that names a form surgeon does not know is refused, nothing is built
    manifest = json.loads((folded / "surgery.json").read_text())
    manifest["history"][1]["layers"][0]["form"] = "squashed"
    (folded / "surgery.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "load", str(folded))
    assert code != 0 and "history[1].layers[0].form" in err and "\n" not in err.strip()


def test_the_console_script_writes_a_complete_checkpoint_and_exits_with_the_code(
    tmp_path: Path,
) -> None:
    # `surgeon` (surgeon.cli:entry) skips the interpreter's teardown: its output and files
    # must still be complete, and its exit codes the same as main()'s
    script = Path(sys.executable).parent / "surgeon"
    out = tmp_path / "ckpt"
    args = ["patch", "resnet18", "--policy", "spd", "--input-size", "3x64x64", "--json"]
    done = subprocess.run(
        [str(script), *args, "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["patched"] == 7  # the whole document arrived
    model = surgeon.api.load(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
    refused = subprocess.run(
        [str(script), *args, "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and "--force" in refused.stderr
