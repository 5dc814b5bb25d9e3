"""User weights files (`--weights`): read a state dict safely, check that it fits a model.

`.safetensors` files are read with safetensors; `.pt`, `.pth` and `.bin` files only with
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from surgeon.errors import WeightsError

__all__ = ["WEIGHTS_SUFFIXES", "check_state_dict_fits", "load_weights_file"]

WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def load_weights_file(path: Path) -> dict[str, Tensor]:
    """Return the state dict in a user's weights file (.safetensors, or .pt/.pth/.bin).

    Pickle-based files are read with `torch.load(weights_only=True)` only. A file may hold the
    state dict itself or a dict with a `state_dict` or `model` entry holding it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    if path.is_dir():
        raise WeightsError(f"weights file {path} is a directory, not a file")
    if suffix not in WEIGHTS_SUFFIXES:
        raise WeightsError(
            f"weights file {path} has an unknown extension {suffix or '(none)'!r}; surgeon reads "
            + ", ".join(WEIGHTS_SUFFIXES)
        )
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError) as err:
            raise WeightsError(
                f"weights file {path} is not a valid safetensors file (truncated or corrupt: "
                f"{_first_line(err)}); re-download or re-save it"
            ) from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise WeightsError(
                f"{path} contains pickled objects that are not plain tensors; surgeon only "
                "loads weights_only=True files — re-save with "
                "torch.save(model.state_dict(), path) or convert to .safetensors"
            ) from err
        raise WeightsError(_corrupt(path, err)) from err
    except Exception as err:  # torch.load reports damage as RuntimeError, EOFError, KeyError...
        raise WeightsError(_corrupt(path, err)) from err
    return _find_state_dict(loaded, path)


def _find_state_dict(loaded: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(loaded, Mapping):
        for entry in ("state_dict", "model"):
            if isinstance(loaded.get(entry), Mapping):
                loaded = loaded[entry]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsError(
            f"{path} holds no state dict: expected a dict of tensors, or a dict with a "
            f"'state_dict' or 'model' entry holding one (found {_summarise(loaded)})"
        )
    bad = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"{path} holds no state dict: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'}"
            f" not tensors ({_key_list(bad)}); expected a dict of tensors, or a dict with a "
            "'state_dict' or 'model' entry holding one"
        )
    return dict(loaded)


def check_state_dict_fits(
    expected: Mapping[str, Sequence[int]],
    state_dict: Mapping[str, Tensor],
    *,
    source: str | Path = "the weights file",
) -> None:
    """Raise WeightsError unless `state_dict` has exactly the keys and shapes in `expected`.

    `expected` maps each key of the model's state dict to its shape, e.g.
    `{k: v.shape for k, v in model.state_dict().items()}`. The message lists up to five keys
    of each kind (missing, unexpected, wrong shape) with the counts.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        k
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(int(n) for n in expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    counts = [
        f"{len(keys)} {label}"
        for keys, label in (
            (missing, "missing key(s)"),
            (unexpected, "unexpected key(s)"),
            (mismatched, "shape mismatch(es)"),
        )
        if keys
    ]
    summary = f"{', '.join(counts)}; the model has {len(expected)} keys"
    parts = [f"{source} does not fit the model ({summary})."]
    if missing:
        parts.append(f"Missing key(s) in state_dict: {_key_list(missing)}.")
    if unexpected:
        parts.append(f"Unexpected key(s) in state_dict: {_key_list(unexpected)}.")
    if mismatched:
        shown = [
            f'"{k}" is {_shape(state_dict[k].shape)} in the file, '
            f"{_shape(expected[k])} in the model"
            for k in mismatched[:5]
        ]
        more = f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""
        parts.append(f"Size mismatch: {'; '.join(shown)}{more}.")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        parts.append("Its keys start with 'module.' (saved from DataParallel/DDP): strip it.")
    else:
        parts.append("Is it for another architecture or model variant?")
    raise WeightsError(" ".join(parts))


def _corrupt(path: Path, err: BaseException) -> str:
    if path.stat().st_size == 0:
        detail = "the file is empty"
    else:
        detail = f"{type(err).__name__}: {_first_line(err)}"
    return f"weights file {path} is truncated or corrupt ({detail}); re-download or re-save it"


def _first_line(err: BaseException) -> str:
    """The first sentence of an error message, for a one-line report."""
    lines = str(err).strip().splitlines()
    line = lines[0].split(". ")[0].rstrip(".") if lines else "no details"
    return line if len(line) <= 120 else line[:117] + "..."


def _key_list(keys: Sequence[Any]) -> str:
    shown = ", ".join(f'"{k}"' for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def _summarise(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {_key_list(list(value))}" if value else "an empty dict"
    return f"a {type(value).__name__}"
