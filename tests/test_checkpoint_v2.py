"""Checkpoint format version 2: the edits are recorded, and loading applies them.

A version-2 checkpoint loads with the tracer and the policy out of order, without running the
model; every kind of edit (replace, wrap, set_attrs, replace_call; patch and fold entries;
dilate and relocate geometry) round-trips to the same state dict and the same outputs; a bad
layer type, argument or module path is one line naming the field; version-1 checkpoints (the
committed fixtures in tests/data/v1) still load and upgrade.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import surgeon
from surgeon import policy as policy_module
from surgeon import trace as trace_module
from surgeon.checkpoint import read_checkpoint
from surgeon.checkpoint.restore import LegacyCheckpointWarning
from surgeon.errors import CheckpointError
from surgeon.fold import fold
from surgeon.layers import BlurPool
from surgeon.models import example_inputs, load_model
from surgeon.patch import resolve_policy
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import action_schemas
from tests.clirun import run_cli

V1 = Path(__file__).resolve().parent / "data" / "v1"
TINY = "tests.tiny_models:tiny_resnet"
TRUST = (TINY, "tests.tiny_models:tiny_root_pool")
SIZE = (3, 32, 32)
X = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))

RELOCATE = {
    "name": "tiny-relocate",
    "description": "the block's stride from its first conv to its second",
    "rules": [
        {"match": {"name": "layer1.conv1"}, "action": "relocate", "params": {"to": "layer1.conv2"}}
    ],
}


def _every_form(model: nn.Module) -> dict[str, str]:
    """Fold forms that rewrite every unit of an antialiased model without timing: each
    BlurPool into its separable form, each blur + 1x1 conv into one strided conv."""
    forms = {}
    for name, module in model.named_modules():
        if isinstance(module, BlurPool):
            forms[name] = "separable"
        elif (
            isinstance(module, nn.Sequential)
            and isinstance(module[0], BlurPool)
            and module[1].kernel_size == (1, 1)
        ):
            forms[name] = "folded"
    return forms


def _write(
    directory: Path, spec: str, policy: Any, *, folded: bool = False, **params: Any
) -> tuple[Path, nn.Module]:
    """Patch `spec` with `policy` (and fold it: SPD layers folded, blurs in other forms),
    save it to `directory`; (path, patched model)."""
    loaded = load_model(spec, seed=0)
    loaded.input_size = SIZE
    resolved = policy
    if isinstance(policy, dict):
        resolved = policy_from_dict(policy, action_schemas())
    elif params:
        resolved = resolve_policy(policy).with_params("dilate", params, action_schemas()["dilate"])
    args = example_inputs(loaded.task, SIZE)
    model, report = surgeon.patch(loaded.model, resolved, args, model_name=spec)
    record = None
    if folded and policy == "antialias":
        model, record = fold(model, args, backend="onnxruntime", forms=_every_form(model))
    elif folded:
        model, record = fold(model, args, choose="folded")
    surgeon.save(directory, model, loaded, report, resolved, fold=record)
    return directory, model.eval()


@pytest.fixture(scope="session")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    """One checkpoint per kind of edit, written once for the whole session."""
    root = tmp_path_factory.mktemp("v2")
    return {
        "spd": _write(root / "spd", TINY, "spd"),
        "antialias": _write(root / "antialias", TINY, "antialias"),
        "allconv": _write(root / "allconv", TINY, "allconv"),
        "dilate": _write(root / "dilate", TINY, "dilate", output_stride=4),
        "relocate": _write(root / "relocate", TINY, RELOCATE),
        "fold": _write(root / "fold", TINY, "spd", folded=True),
        "fold-blur": _write(root / "fold-blur", TINY, "antialias", folded=True),
        "root-call": _write(root / "root-call", "tests.tiny_models:tiny_root_pool", "allconv"),
    }


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"state-dict keys differ: {set(sa) ^ set(sb)}"
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "state-dict values differ"
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    with torch.no_grad():
        assert torch.equal(a(X), b(X)), "the loaded model computes something else"


@pytest.mark.parametrize(
    "kind",
    ["spd", "antialias", "allconv", "dilate", "relocate", "fold", "fold-blur", "root-call"],
)
def test_every_kind_of_edit_round_trips(
    written: dict[str, tuple[Path, nn.Module]], kind: str
) -> None:
    directory, model = written[kind]
    loaded = surgeon.load(directory, trust_import=TRUST)
    _same(model, loaded)
    assert not loaded.training


def test_the_manifest_records_the_edits_as_data(written: dict[str, tuple[Path, nn.Module]]) -> None:
    manifest, _ = read_checkpoint(written["antialias"][0])
    assert manifest["format_version"] == 2
    assert manifest["model"]["weights"] == {"kind": "random", "seed": 0}
    (entry,) = manifest["history"]
    ops = [e["op"] for e in entry["edits"]]
    assert set(ops) == {"replace", "wrap", "set_attrs", "replace_call"}, ops
    call = next(e for e in entry["edits"] if e["op"] == "replace_call")
    assert (call["owner"], call["function"], call["index"]) == ("head", "max_pool2d", 0)
    assert "surgeon." not in json.dumps(entry["edits"]), "an import path was recorded"
    dilate, _ = read_checkpoint(written["dilate"][0])
    attrs = [e["attrs"] for e in dilate["history"][0]["edits"] if e["op"] == "set_attrs"]
    assert {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]} in attrs, attrs
    folded, _ = read_checkpoint(written["fold"][0])
    assert [e["kind"] for e in folded["history"]] == ["patch", "fold"]
    assert folded["history"][1]["backend"] == "eager"
    blurred, _ = read_checkpoint(written["fold-blur"][0])
    entry = blurred["history"][1]
    assert entry["backend"] == "onnxruntime" and entry["choose"] == "replayed"
    assert {layer["form"] for layer in entry["layers"]} == {"separable", "folded"}
    types = {e["module"]["type"] for e in entry["edits"]}
    assert types == {"BlurPool", "FoldedBlurConv"}, types


def test_loading_needs_neither_the_tracer_nor_the_policy(
    written: dict[str, tuple[Path, nn.Module]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load must not trace the model or run the policy")

    monkeypatch.setattr(trace_module, "analyse", broken)
    monkeypatch.setattr(trace_module.SurgeonTracer, "trace", broken)
    monkeypatch.setattr(policy_module, "decide", broken)
    monkeypatch.setattr(policy_module.Rule, "matches", broken)
    for kind in ("spd", "dilate", "relocate", "fold"):
        directory, model = written[kind]
        _same(model, surgeon.load(directory, trust_import=TRUST))


def test_loading_never_runs_the_model(
    written: dict[str, tuple[Path, nn.Module]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = nn.Module.__call__

    def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__call__", counted)
    for kind in written:
        surgeon.load(written[kind][0], trust_import=TRUST)
    assert calls["n"] == 0, f"load ran {calls['n']} module forward calls"


def _edited(tmp_path: Path, source: Path, change: Any) -> Path:
    """A copy of checkpoint `source` whose surgery.json `change(manifest)` edited (the weights
    checksum still holds: it covers model.safetensors only)."""
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    manifest = json.loads((target / "surgery.json").read_text())
    change(manifest)
    (target / "surgery.json").write_text(json.dumps(manifest))
    return target


def _first(manifest: dict[str, Any], op: str) -> dict[str, Any]:
    return next(e for e in manifest["history"][0]["edits"] if e["op"] == op)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: _first(m, "replace")["module"].update(type="NoSuchLayer"),
            r"field 'history\[0\]\.edits\[0\]\.module': unknown layer type 'NoSuchLayer'",
        ),
        (
            lambda m: _first(m, "replace")["module"]["args"].update(block="two"),
            r"field 'history\[0\]\.edits\[0\]\.module': SpaceToDepthConv: argument 'block'",
        ),
        (
            lambda m: _first(m, "replace").update(path="layer9.conv1"),
            r"field 'history\[0\]\.edits\[0\]\.path': the model has no module 'layer9\.conv1'",
        ),
        (
            lambda m: _first(m, "replace").update(path=7),
            r"field 'history\[0\]\.edits\[0\]\.path' must be a string",
        ),
        (
            lambda m: m["history"][0].update(kind="transplant"),
            r"field 'history\[0\]\.kind' must be one of 'patch', 'fold', 'heal'",
        ),
        (
            lambda m: m["model"]["weights"].update(kind="magic"),
            r"field 'model\.weights\.kind' must be one of",
        ),
    ],
    ids=["unknown-type", "wrong-argument", "missing-path", "path-type", "entry-kind", "weights"],
)
def test_a_bad_edit_is_one_line_naming_the_field(
    written: dict[str, tuple[Path, nn.Module]], tmp_path: Path, change: Any, message: str
) -> None:
    directory = _edited(tmp_path, written["spd"][0], change)
    with pytest.raises(CheckpointError, match=message) as info:
        surgeon.load(directory, trust_import=TRUST)
    assert "\n" not in str(info.value)


def test_a_missing_functional_call_is_named(
    written: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    directory = _edited(
        tmp_path, written["allconv"][0], lambda m: _first(m, "replace_call").update(index=3)
    )
    with pytest.raises(
        CheckpointError, match=r"edits\[\d\]\.index': head makes 1 direct max_pool2d"
    ):
        surgeon.load(directory, trust_import=TRUST)


@pytest.mark.parametrize("name", sorted(p.name for p in V1.iterdir() if p.is_dir()))
def test_version_1_fixtures_load_with_a_note_and_upgrade(tmp_path: Path, name: str) -> None:
    with pytest.warns(LegacyCheckpointWarning, match="surgeon upgrade"):
        replayed = surgeon.load(V1 / name, trust_import=TRUST)
    out = surgeon.upgrade(V1 / name, tmp_path / name, trust_import=TRUST)
    manifest, _ = read_checkpoint(out)
    assert manifest["format_version"] == 2 and manifest["model"]["weights"]["kind"] == "unrecorded"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a version-2 checkpoint loads without the note
        upgraded = surgeon.load(out, trust_import=TRUST)
    _same(replayed, upgraded)


def test_upgrade_in_place_and_its_refusals(tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(V1 / "tiny-spd", copy)
    surgeon.upgrade(copy, trust_import=TRUST)
    assert read_checkpoint(copy)[0]["format_version"] == 2
    with pytest.raises(CheckpointError, match="already a version-2 checkpoint"):
        surgeon.upgrade(copy, trust_import=TRUST)
    taken = tmp_path / "taken"
    shutil.copytree(V1 / "tiny-antialias", taken)
    with pytest.raises(surgeon.errors.OutputError, match="pass force=True"):
        surgeon.upgrade(V1 / "tiny-dilate", taken, trust_import=TRUST)
    surgeon.upgrade(V1 / "tiny-dilate", taken, force=True, trust_import=TRUST)
    assert read_checkpoint(taken)[0]["model"]["input_size"] == [3, 32, 32]


def test_cli_upgrade_and_the_one_line_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(V1 / "tiny-relocate", copy)
    code, _, err = run_cli(capsys, "load", str(copy), "--trust-import", TINY)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "surgeon upgrade" in notes[0], err
    code, _, err = run_cli(capsys, "upgrade", str(copy), "--trust-import", TINY)
    assert code == 0 and re.search(r"wrote .*ckpt \(checkpoint format version 2\)", err), err
    code, out, err = run_cli(capsys, "info", str(copy))
    # a long temporary path (pytest-xdist's popen-gwN) wraps the line at 160 columns
    assert code == 0 and "format version 2" in " ".join(out.split()), out
    code, _, err = run_cli(capsys, "load", str(copy), "--trust-import", TINY)
    assert code == 0 and "note:" not in err, err
