"""The library's exception types; each carries the CLI exit code it maps to.

Every user-facing failure is one of these, with a message that names the problem and the fix,
so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AnalysisError",
    "Argument",
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


@dataclass(frozen=True)
class Argument:
    """An argument an error message tells the user to pass or fix, named once for both
    audiences: `str(error)` shows it as the Python keyword (`trust_import=['pkg.mod:fn']`),
    the CLI as its flag (`--trust-import pkg.mod:fn`, see `SurgeonError.render`).

    `value` None names the argument itself (`kwargs` / `--model-kwarg`); True is a switch
    (`force=True` / `--force`); anything else is the value to pass, or `metavar` stands for
    one (`weights=FILE` / `--weights FILE`). `many` marks a collection parameter, shown as a
    list in Python and as one flag per value on the command line."""

    name: str
    value: Any = None
    many: bool = False
    metavar: str = ""

    def python(self) -> str:
        """How a Python caller writes it: `trust_import=['pkg.mod:fn']`, `force=True`."""
        if self.metavar:
            shown = self.metavar
        elif self.value is None:
            return self.name
        else:
            shown = repr(self.value)
        return f"{self.name}=[{shown}]" if self.many else f"{self.name}={shown}"

    def flag(self, flag: str) -> str:
        """How a command line writes it, given the option's flag (`--trust-import`); a value is
        quoted as a shell needs it."""
        if self.metavar:
            return f"{flag} {self.metavar}"
        if self.value is None or self.value is True:
            return flag
        return f"{flag} {shlex.quote(str(self.value))}"


class SurgeonError(Exception):
    """Base class: a failure the user can act on; `str(err)` is the one-line message.

    A message is text with `Argument`s in it (`CheckpointError("pass ", Argument(...),
    " if you trust it")`): `str()` renders them as Python arguments, `render(...)` as the
    caller likes (the CLI: as flags)."""

    exit_code: int = ExitCode.USER_ERROR

    def __init__(self, *parts: str | Argument) -> None:
        super().__init__(*parts)
        self.parts = parts

    def __str__(self) -> str:
        return self.render(Argument.python)

    def render(self, argument: Callable[[Argument], str]) -> str:
        """The message with each Argument written by `argument`."""
        return "".join(p if isinstance(p, str) else argument(p) for p in self.parts)


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
