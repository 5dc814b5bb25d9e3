"""The library's exception types; each carries the CLI exit code it maps to.

Every user-facing failure is one of these, with a message that names the problem and the fix,
so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AnalysisError",
    "CheckpointError",
    "DataError",
    "ExitCode",
    "ModelSpecError",
    "OutputError",
    "PatchError",
    "PolicyError",
    "SurgeonError",
    "TrainingError",
    "UsageError",
    "WeightsError",
    "describe_value",
    "did_you_mean",
    "one_line",
    "show_value",
]


class ExitCode:
    """Documented exit codes of the `surgeon` command."""

    OK = 0
    USER_ERROR = 1
    USAGE_ERROR = 2
    ANALYSIS_ERROR = 3
    VERIFY_ERROR = 4
    INTERRUPTED = 130


class SurgeonError(Exception):
    """Base class: a failure the user can act on; `str(err)` is the one-line message."""

    exit_code: int = ExitCode.USER_ERROR


class UsageError(SurgeonError):
    """A malformed option value (an input size such as `3x0x224`, a `key=value` without `=`)."""

    exit_code = ExitCode.USAGE_ERROR


class ModelSpecError(SurgeonError):
    """The model spec does not resolve to a model (unknown name, bad factory, bad kwargs)."""


class WeightsError(SurgeonError):
    """A weights file is missing, unreadable, unsafe or does not fit the model."""


class PolicyError(SurgeonError):
    """A policy file is malformed or invalid; the message names file, line and field."""


class CheckpointError(SurgeonError):
    """A patched checkpoint directory is missing, tampered with or inconsistent."""


class OutputError(SurgeonError):
    """An output path cannot be written (exists, not writable, disk full)."""


class AnalysisError(SurgeonError):
    """The model could not be run or analysed on the example input."""

    exit_code = ExitCode.ANALYSIS_ERROR


class PatchError(SurgeonError):
    """The patched model failed verification (a shape changed, an exact transfer was not)."""

    exit_code = ExitCode.VERIFY_ERROR


class DataError(SurgeonError):
    """A training data folder is missing, empty, or has too many unreadable images."""


class TrainingError(SurgeonError):
    """Training cannot go on: the loss became NaN/inf, or a state checkpoint does not fit."""


# Message helpers: every error is one line, so values are shown short and on one line.


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `options`, or an empty string."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_line(text: str) -> str:
    """`text` with every run of whitespace, newlines included, as one space."""
    return " ".join(text.split())


def show_value(value: Any) -> str:
    """A short one-line rendering of a value for messages."""
    text = one_line(repr(value) if isinstance(value, str) else str(value))
    return text if len(text) <= 60 else text[:57] + "..."


def describe_value(value: Any) -> str:
    """What a value is, in YAML/JSON words: `null`, `a list`, `'x' (a string)`, `3`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"{show_value(value)} (a string)"
    if isinstance(value, int | float):
        return show_value(value)
    return f"{show_value(value)} ({type(value).__name__})"
