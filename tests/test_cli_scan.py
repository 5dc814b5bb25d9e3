"""`surgeon scan` and the CLI's error path: tables, JSON, one-line errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.clirun import run_cli


def test_scan_prints_a_table_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "scan", "resnet18", "--input-size", "3x65x65")
    assert code == 0, err
    assert "layer2.0.downsample.0" in out and "k1 s2 p0" in out
    assert "8 downsampling sites; 1 global pool; found by fx" in out
    assert "torchvision:resnet18" in err


def test_scan_json_has_the_same_sites(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "scan", "resnet18", "--input-size", "3x64x64", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "torchvision:resnet18"
    downsampling = [s["name"] for s in data["sites"] if s["role"] == "downsample"]
    assert downsampling[:2] == ["conv1", "maxpool"] and len(downsampling) == 8
    assert data["sites"][0]["out_shape"] == [1, 64, 32, 32]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["scan", "resnet5"],
            1,
            "error: unknown model 'resnet5' (not in torchvision or timm); did you mean",
        ),
        (["scan", "resnet18", "--input-size", "3x0x224"], 2, "error: bad --input-size 3x0x224:"),
        (["scan", "resnet18", "--model-kwarg", "oops"], 2, "error: bad --model-kwarg oops;"),
        (
            ["scan", "resnet18", "--input-size", "4x64x64"],
            3,
            "error: the model failed on the example input",
        ),
        (["scan", "resnet18", "--weights", "/nonexistent/w.pt"], 1, "error:"),
        (["patch", "resnet18", "--policy", "no-such-policy", "--dry-run"], 1, "error:"),
        (
            ["scan", "resnet18", "--bogus"],
            2,
            "error: No such option: --bogus; see `surgeon scan --help`",
        ),
        (["patch", "resnet18", "--policy"], 2, "error: Option '--policy' requires an argument"),
        (["bogus"], 2, "error: No such command 'bogus'; see `surgeon --help`"),
    ],
)
def test_bad_input_gets_one_line_and_an_exit_code(
    capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    got, out, err = run_cli(capsys, *args)
    assert got == code, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert "Traceback" not in err + out


def test_the_installed_command_never_prints_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from surgeon.cli import main; main()", "scan", "resnet5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown model 'resnet5'")
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from surgeon.cli import main; main()",
            "--debug",
            "scan",
            "resnet5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
