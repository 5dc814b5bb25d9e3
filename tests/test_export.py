"""`export`: patched models as TorchScript, ONNX and ExportedProgram files, numerically checked
against eager PyTorch at two input sizes, written atomically."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.api import save
from surgeon.errors import OutputError, PatchError, UsageError
from surgeon.export import METADATA_FILE, ExportResult, check_sizes, export
from surgeon.models import example_inputs, load_model
from surgeon.patch import patch, resolve_policy

SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "exported-program": ".pt2"}


# Both replacement layers in one model, so each fast test exports SpaceToDepthConv (stem conv
# and max pool) and BlurPool (every later stride) at once.
MIXED_POLICY = """\
name: mixed
description: SPD in the stem, anti-aliasing in the later stages
rules:
  - match: {stage_in: {max: 2}}
    action: spd
  - match: {op: [conv, max_pool]}
    action: antialias
"""


@pytest.fixture(scope="module")
def patched_resnet18(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """resnet18 at 64×64 with SPD in the stem and BlurPool after (patched once per module)."""
    policy = tmp_path_factory.mktemp("policy") / "mixed.yaml"
    policy.write_text(MIXED_POLICY)
    torch.manual_seed(0)
    model, report = patch(load_model("resnet18").model, policy, torch.randn(1, 3, 64, 64))
    replaced = [row.replacement for row in report.rows if row.status == "patched"]
    assert sum("SPD" in r for r in replaced) == 2 and sum("BlurPool" in r for r in replaced) == 6
    return model


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _assert_checked(result: ExportResult) -> None:
    assert [c.input_shape for c in result.checks] == [(1, 3, 64, 64), (2, 3, 49, 49)]
    assert all(c.rel_diff <= 1e-4 for c in result.checks), result.checks


@pytest.mark.parametrize("method", ["script", "trace"])
def test_torchscript_scripting_and_tracing_both_work_on_patched_models(
    patched_resnet18: nn.Module, method: str, tmp_path: Path
) -> None:
    target = tmp_path / "model.pt"
    x = torch.randn(1, 3, 64, 64)
    result = export(patched_resnet18, "torchscript", target, example_input=x, method=method)
    assert result.method == method and target.is_file() and not _leftovers(tmp_path)
    _assert_checked(result)
    extra = {METADATA_FILE: ""}
    loaded = torch.jit.load(str(target), _extra_files=extra)
    assert json.loads(extra[METADATA_FILE])["input"]["dynamic"] == ["batch", "height", "width"]
    with torch.no_grad():
        assert loaded(torch.randn(3, 3, 37, 80)).shape == (3, 1000), "a third size runs too"


def test_onnx_export_keeps_batch_and_spatial_axes_dynamic(
    patched_resnet18: nn.Module, tmp_path: Path
) -> None:
    import onnxruntime

    target = tmp_path / "model.onnx"
    result = export(patched_resnet18, "onnx", target, example_input=torch.randn(1, 3, 64, 64))
    _assert_checked(result)
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert session.run(None, {"input": torch.randn(3, 3, 90, 33).numpy()})[0].shape == (3, 1000)


def test_exported_program_has_dynamic_batch_and_spatial_dims(
    patched_resnet18: nn.Module, tmp_path: Path
) -> None:
    target = tmp_path / "model.pt2"
    x = torch.randn(1, 3, 64, 64)
    result = export(patched_resnet18, "exported-program", target, example_input=x)
    _assert_checked(result)
    program = torch.export.load(target)
    symbolic = [not isinstance(d, int) for d in _input_shape(program)]
    assert symbolic == [True, False, True, True], "batch, height and width must be symbolic"
    with zipfile.ZipFile(target) as archive:
        assert any(name.endswith(METADATA_FILE) for name in archive.namelist())


def _input_shape(program: torch.export.ExportedProgram) -> tuple[object, ...]:
    user_input = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.name == user_input)
    return tuple(node.meta["val"].shape)


def test_export_from_a_checkpoint_directory_folds_and_records_the_fold(tmp_path: Path) -> None:
    loaded = load_model("resnet18")
    loaded.input_size = (3, 64, 64)
    model, report = patch(loaded.model, "spd", example_inputs(loaded.task, loaded.input_size))
    directory = save(tmp_path / "r18-spd", model, loaded, report, resolve_policy("spd").to_dict())
    result = export(directory, "onnx", fold_layers="folded")
    assert result.path == directory / "model-folded.onnx" and result.path.is_file()
    assert result.fold is not None and result.fold.folded == 7
    _assert_checked(result)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    metadata = json.loads(props[METADATA_FILE])
    assert metadata["fold"]["folded"] == 7 and metadata["source"]["policy"] == "spd"
    assert {layer["form"] for layer in metadata["fold"]["layers"]} == {"folded"}


class _FrozenBranch(nn.Module):
    """Tracing freezes the branch taken at the example size: wrong at other sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 50:
            return x.mean(dim=(2, 3)) * 2
        return x.mean(dim=(2, 3))


def test_a_failed_check_is_a_one_line_error_and_nothing_is_written(tmp_path: Path) -> None:
    target = tmp_path / "bad.pt"
    with pytest.raises(PatchError) as info:
        export(
            _FrozenBranch(),
            "torchscript",
            target,
            example_input=torch.randn(1, 3, 64, 64),
            method="trace",
        )
    message = str(info.value)
    assert "\n" not in message and "2x3x49x49" in message and "nothing was written" in message
    assert not target.exists() and not _leftovers(tmp_path)


def test_an_existing_file_is_refused_without_force(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_text("keep me")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
    with pytest.raises(OutputError, match="exists; pass force=True"):
        export(model, "torchscript", target, example_input=torch.randn(1, 3, 16, 16))
    assert target.read_text() == "keep me"
    export(model, "torchscript", target, example_input=torch.randn(1, 3, 16, 16), force=True)
    assert target.stat().st_size > 7


def test_unknown_formats_and_non_image_inputs_are_usage_errors(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(UsageError, match="unknown export format 'tflite'"):
        export(model, "tflite", tmp_path / "m", example_input=torch.randn(1, 4))
    with pytest.raises(UsageError, match=r"one floating-point tensor \(N, C, \*spatial\)"):
        export(model, "onnx", tmp_path / "m.onnx", example_input=torch.randn(1, 4))


def test_check_sizes_change_batch_and_use_odd_spatial_sizes() -> None:
    assert check_sizes((1, 3, 224, 224)) == ((1, 3, 224, 224), (2, 3, 169, 169))
    assert check_sizes((1, 3, 4, 5))[1] == (2, 3, 3, 3)
    assert check_sizes((1, 3, 3, 3))[1] == (2, 3, 5, 5), "never the example's own size"


@pytest.mark.slow
@pytest.mark.parametrize("format", ["torchscript", "onnx", "exported-program"])
@pytest.mark.parametrize("policy", ["spd", "antialias"])
def test_patched_resnet50_exports_pass_their_checks(
    policy: str, format: str, tmp_path: Path
) -> None:
    x = torch.randn(1, 3, 224, 224)
    model, _ = patch(load_model("resnet50").model, policy, x)
    result = export(
        model,
        format,
        tmp_path / f"r50{SUFFIX[format]}",
        example_input=x,
        fold_layers=policy == "spd",
    )
    assert [c.input_shape for c in result.checks] == [(1, 3, 224, 224), (2, 3, 169, 169)]
    assert max(c.rel_diff for c in result.checks) <= 1e-4
