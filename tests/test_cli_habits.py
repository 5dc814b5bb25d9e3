"""The usual CLI habits: --version, --help as Click CLIs print it, shell completion, outputs
probed before any work, output files that follow the umask."""

from __future__ import annotations

import importlib.metadata
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.models import load_model
from surgeon.patch import patch
from surgeon.report import write_report
from tests.clirun import run_cli


def test_version_prints_surgeon_then_the_libraries(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0
    first, second = stdout.strip().splitlines()
    assert first == f"surgeon {surgeon.__version__}"
    assert f"torch {torch.__version__}" in second
    assert f"timm {importlib.metadata.version('timm')}" in second


@pytest.mark.parametrize("command", [(), ("patch",), ("scan",)], ids=["root", "patch", "scan"])
def test_help_lists_flags_without_a_type_and_values_with_theirs(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    code, stdout, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    assert "<bool>" not in stdout, f"a flag is shown as taking a value:\n{stdout}"
    help_line = next(line for line in stdout.splitlines() if line.strip().startswith("--help"))
    assert "<" not in help_line, help_line
    if command == ("patch",):
        assert "--seed <int>" in stdout and "--out <path>" in stdout
        assert "--pretrained [TAG]" in stdout


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary home directory, and bash as the user's shell (whatever runs the tests)."""
    import shellingham

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(shellingham, "detect_shell", lambda: ("bash", "/bin/bash"))
    yield tmp_path


def test_install_completion_installs_a_script_that_completes_commands(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, stdout, err = run_cli(capsys, "--install-completion")
    assert code == 0, err
    script = home / ".bash_completions" / "surgeon.sh"
    assert "_SURGEON_COMPLETE=complete_bash" in script.read_text()
    assert f"source '{script}'" in (home / ".bashrc").read_text()

    # what the installed script asks the CLI when the user presses tab after `surgeon pa`
    monkeypatch.setenv("_SURGEON_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "surgeon pa")
    monkeypatch.setenv("COMP_CWORD", "1")
    code, stdout, _ = run_cli(capsys)
    assert code == 0 and stdout.split() == ["patch"]


@pytest.mark.parametrize("option", ["--out", "--report"])
def test_an_unwritable_output_fails_before_the_model_is_built(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    target = "/proc/surgeon-test/ck" if option == "--out" else "/proc/surgeon-test/r.md"
    code, stdout, err = run_cli(capsys, "patch", "resnet18", "--policy", "spd", option, target)
    assert code == 1, err
    assert stdout == "", "the model was patched and its table printed before the check"
    assert "model torchvision:resnet18" not in err, "the model was built before the check"
    (line,) = err.strip().splitlines()
    assert line.startswith("error: cannot write") and "/proc/surgeon-test" in line


def test_a_report_path_that_is_a_directory_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "r.md").mkdir()
    code, stdout, err = run_cli(
        capsys,
        "patch",
        "resnet18",
        "--policy",
        "spd",
        "--dry-run",
        "--report",
        str(tmp_path / "r.md"),
    )
    assert code == 1 and stdout == ""
    (line,) = err.strip().splitlines()
    assert "is a directory" in line


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_reports_and_checkpoint_files_follow_the_umask(
    umask: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ck"
    html = tmp_path / "report.html"
    args = ["--out", str(out), "--report", str(html), "--input-size", "3x64x64"]
    code, _, err = run_cli(capsys, "patch", "resnet18", "--policy", "spd", *args)
    assert code == 0, err
    _, report = patch(load_model("resnet18").model, "spd", torch.randn(1, 3, 64, 64))
    for suffix in (".md", ".json"):
        write_report(report, tmp_path / f"report{suffix}")
    os.umask(0o027)
    write_report(report, tmp_path / "group.md")
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [html, tmp_path / "report.md", tmp_path / "report.json", *out.iterdir()]
    }
    assert modes == dict.fromkeys(modes, 0o644), f"not 0666 minus umask 022: {modes}"
    assert stat.S_IMODE((tmp_path / "group.md").stat().st_mode) == 0o640
