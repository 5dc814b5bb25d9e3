"""Reports a user can read at a glance: why a policy changed nothing, each site's role, runs of
global pools as one row, `exact at this input` for an approximate transfer measured exact, a
bad `--report` name refused before any work, and errors that name what the reader passes
(Python arguments from Python, flags from the command line)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import typer.main
from torch import nn

import surgeon
from surgeon.cli import app, flag
from surgeon.errors import Argument, CheckpointError
from surgeon.evaluate import EvalOptions
from surgeon.models import example_inputs, load_model
from tests.clirun import run_cli

HERE = "tests.test_report_readability"
SIZE = ("--input-size", "3x32x32")
PYTHON_ONLY = {"max_shift", "batch_size", "warmup"}
"""EvalOptions fields the CLI does not set: their errors only reach Python callers."""


class _SqueezeExcite(nn.Module):
    """x · sigmoid(conv(global average of x)): a global pool that is not a downsampler."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(self.pool(x)))


def se_net() -> nn.Module:
    """Strided stem, one SE block, a strided conv, three SE blocks, a pooled head: one lone
    global pool, then a run of four (the last SE blocks and the head's pool)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1),
        _SqueezeExcite(4),
        nn.Conv2d(4, 8, 3, 2, 1),
        *(_SqueezeExcite(8) for _ in range(3)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def flat_pool_net() -> nn.Module:
    """A 1x1 conv whose output is constant per channel (zero weights, bias 1, 2, 4, 8), then a
    max pool: averaging a constant window gives its maximum exactly."""
    conv = nn.Conv2d(3, 4, 1)
    conv.weight = nn.Parameter(torch.zeros_like(conv.weight))
    conv.bias = nn.Parameter(torch.tensor([1.0, 2.0, 4.0, 8.0]))
    return nn.Sequential(
        conv, nn.MaxPool2d(2, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def test_a_policy_that_patches_nothing_says_why_and_writes_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cn"
    args = ["patch", "convnext_nano", "--policy", "spd", *SIZE, "--out", str(out)]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "0 patched" in stdout
    reasons = [line for line in err.splitlines() if line.startswith("policy spd patched none")]
    assert len(reasons) == 1, err
    reason = reasons[0]
    assert "3 patchify and 1 global_pool, roles its rules do not select" in reason, reason
    assert "a rule with `match: {role: patchify}` selects the patchify sites" in reason, reason
    assert reason.endswith("no checkpoint written (--allow-unchanged writes one)"), reason
    assert not out.exists(), "a checkpoint identical to the original was written"

    code, _, err = run_cli(capsys, *args, "--allow-unchanged")
    assert code == 0 and (out / "surgery.json").is_file(), err
    code, _, err = run_cli(capsys, *args[:-2], "--dry-run")
    assert code == 0 and "policy spd patched none of 4 sites" in err, err


def test_scan_and_patch_tables_show_each_sites_role(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["scan"], ["patch", "--policy", "spd", "--dry-run"]):
        code, stdout, err = run_cli(capsys, command[0], f"{HERE}:se_net", *command[1:], *SIZE)
        assert code == 0, err
        header = next(line for line in stdout.splitlines() if "site" in line and "op" in line)
        assert "role" in header, f"{command[0]} has no role column:\n{stdout}"
        stem = next(line for line in stdout.splitlines() if line.startswith("│ 0 "))
        assert "downsample" in stem, stem
        lone = next(line for line in stdout.splitlines() if line.startswith("│ 1.pool"))
        assert "global_pool" in lone, lone


def _site_cells(table: str) -> list[str]:
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    return [cell for cell in cells if cell]  # continuation lines of wrapped cells are empty


def test_runs_of_global_pools_collapse_into_one_row_unless_all(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["patch", f"{HERE}:se_net", "--policy", "spd", *SIZE, "--dry-run"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    sites = _site_cells(stdout)
    assert sites == ["0", "1.pool", "2", "4 global pools"], stdout
    assert "--all lists the global pools summarised above" in stdout
    code, stdout, err = run_cli(capsys, *args, "--all")
    assert code == 0, err
    sites = _site_cells(stdout)
    assert sites == ["0", "1.pool", "2", "3.pool", "4.pool", "5.pool", "6"], stdout
    assert "summarised" not in stdout


def test_an_approximate_transfer_measured_exact_says_exact_at_this_input(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["patch", f"{HERE}:flat_pool_net", "--policy", "allconv", *SIZE, "--dry-run"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    pool = next(line for line in stdout.splitlines() if line.startswith("│ 1 "))
    assert "exact at this input" in pool and "approximate" not in pool, pool
    _, report = surgeon.patch(flat_pool_net(), "allconv", torch.randn(1, 3, 32, 32))
    (row,) = (r for r in report.rows if r.status == "patched")
    assert row.transfer == "approximate", "the record must keep what the transfer is"


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "write"])
def test_an_unknown_report_extension_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: bool
) -> None:
    args = ["patch", "resnet18", "--policy", "spd", "--report", str(tmp_path / "rep.txt")]
    args += ["--out", str(tmp_path / "ck"), *(["--dry-run"] if dry_run else [])]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 1 and stdout == "", "the model was patched before the report name was checked"
    assert "model torchvision:resnet18" not in err, "the model was built before the check"
    (line,) = err.strip().splitlines()
    assert line.startswith("error: cannot write a report to") and ".md, .json or .html" in line
    assert not (tmp_path / "ck").exists()


def test_python_errors_name_arguments_and_the_cli_names_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = "tests.tiny_models:tiny_resnet"
    loaded = load_model(spec)
    loaded.input_size = (3, 32, 32)
    model, report = surgeon.patch(
        loaded.model, "spd", example_inputs("classification", (3, 32, 32))
    )
    ck = surgeon.save(tmp_path / "ck", model, loaded, report, "spd")
    with pytest.raises(CheckpointError) as caught:
        surgeon.load(ck)
    assert f"pass trust_import=['{spec}'] if you trust it" in str(caught.value)
    assert "--" not in str(caught.value), "a Python error names a command-line flag"
    code, _, err = run_cli(capsys, "load", str(ck))
    assert code == 1 and f"pass --trust-import {spec} if you trust it" in err, err

    with pytest.raises(surgeon.errors.OutputError, match=r"pass force=True to replace it"):
        surgeon.save(ck, model, loaded, report, "spd")


def _arguments_named_in_errors() -> set[str]:
    """The name of every `Argument(...)` the library builds, read from its source: the literal
    ones, and every field of EvalOptions (whose checks name their fields in loops)."""
    names = {f.name for f in dataclasses.fields(EvalOptions)}
    for path in (Path(surgeon.__file__).parent).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Argument"
                and node.args
            ):
                first = node.args[0]
                if isinstance(first, ast.Constant):
                    names.add(str(first.value))
    return names


def test_every_argument_an_error_names_is_a_flag_of_the_cli() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    flags = {opt for command in commands.values() for p in command.params for opt in p.opts}
    names = _arguments_named_in_errors()
    assert {"trust_import", "plugins", "force", "weights_override", "class_map"} <= names
    missing = {
        name: flag(Argument(name))
        for name in names - PYTHON_ONLY
        if flag(Argument(name)) not in flags
    }
    assert not missing, (
        f"errors name arguments the CLI has no flag for (add them to FLAGS): {missing}"
    )
