"""Run the `surgeon` CLI in-process and capture exit code, stdout and stderr."""

from __future__ import annotations

import sys

import pytest

from surgeon.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Invoke `surgeon ARGS...` through the real entry point (error mapping included)."""
    argv = sys.argv
    sys.argv = ["surgeon", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err
