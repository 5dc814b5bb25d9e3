"""Bad input, faults and safety: per-site refusals, weights, determinism, no silent imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import surgeon.api
from surgeon.errors import CheckpointError
from surgeon.models import load_model
from surgeon.patch import patch
from tests.clirun import run_cli


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.plain = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.lp = nn.LPPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lp(self.plain(self.reflect(x)))


def test_a_replacement_that_cannot_apply_is_refused_for_that_site_only() -> None:
    model = _TwoConvs().eval()
    _, report = patch(model, "spd", torch.randn(1, 3, 33, 33))
    rows = {r.site: r for r in report.rows}
    assert rows["reflect"].status == "skipped" and "reflect" in rows["reflect"].note
    assert rows["plain"].status == "patched" and rows["plain"].transfer == "exact"
    assert rows["lp"].status in ("unmatched", "skipped")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "error:"),
        (b"\x80\x02garbage-not-a-pickle", "error:"),
    ],
)
def test_broken_weights_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "scan", "resnet18", "--weights", str(path))
    assert code == 1 and err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_weights_for_another_architecture_name_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.pt"
    torch.save(load_model("resnet18").model.state_dict(), path)
    code, _, err = run_cli(capsys, "scan", "resnet34", "--weights", str(path))
    assert code == 1 and "Missing key(s)" in err and "another architecture" in err


def _checkpoint(tmp_path: Path, name: str, perturb: int = 0) -> Path:
    torch.manual_seed(7)
    loaded = load_model("resnet18")
    torch.rand(perturb)  # the global RNG state before patching must not matter: the seed decides
    policy = "spd"
    example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model, report = patch(loaded.model, policy, example, seed=3)
    from surgeon.patch import resolve_policy

    loaded.input_size = (3, 64, 64)
    return surgeon.api.save(
        tmp_path / name,
        model,
        loaded,
        report,
        resolve_policy(policy).to_dict(),
        seed=3,
        created="2026-01-01T00:00:00+00:00",
    )


def test_patching_twice_gives_byte_identical_checkpoints(tmp_path: Path) -> None:
    a = _checkpoint(tmp_path, "a")
    b = _checkpoint(tmp_path, "b", perturb=5)
    for name in ("model.safetensors", "surgery.json", "report.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_tampered_manifest_cannot_make_surgeon_import_code(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, "c")
    manifest = json.loads((path / "surgery.json").read_text())
    manifest["model"].update(source="import", name="os:system", spec="os:system")
    (path / "surgery.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="trust"):
        surgeon.api.load(path)


def test_tampered_weights_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _checkpoint(tmp_path, "d")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "load", str(path))
    assert code == 1 and "checksum" in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_quantized_model_is_refused_with_the_layer_and_the_fix() -> None:
    import torchvision

    from surgeon.errors import AnalysisError
    from surgeon.scan import scan

    model = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    model.fuse_model()
    model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    torch.ao.quantization.prepare(model, inplace=True)
    model(torch.randn(2, 3, 32, 32))
    torch.ao.quantization.convert(model, inplace=True)
    x = torch.randn(1, 3, 32, 32)
    for run in (lambda: scan(model, x), lambda: patch(model, "spd", x)):
        with pytest.raises(AnalysisError) as info:
            run()
        message = str(info.value)
        assert message.startswith("the model is quantized (conv1: ConvReLU2d and ")
        assert "patch the float model" in message and "\n" not in message
