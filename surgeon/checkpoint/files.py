"""Checkpoint directories: write one atomically, read one back after checking it is whole.

A patched checkpoint is a directory::

    model.safetensors   the patched state dict
    surgery.json        the manifest (`surgeon.checkpoint.manifest`)
    report.md           the human-readable report (and any other extra files)

Reads check the manifest and the weights checksum before anything is used, load tensors with
safetensors only (nothing is unpickled) and never import code named by a checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from torch import Tensor

from surgeon.checkpoint.atomic import check_writable as check_writable_directory
from surgeon.checkpoint.atomic import interrupted_hint, write_directory, write_file
from surgeon.checkpoint.manifest import (
    FIX_MANIFEST,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    validate_manifest,
)
from surgeon.errors import CheckpointError, OutputError

__all__ = ["check_writable", "read_checkpoint", "read_manifest", "sha256_file", "write_checkpoint"]

_EXTRA_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHUNK = 1 << 20


def write_checkpoint(
    directory: Path,
    state_dict: Mapping[str, Tensor],
    manifest: Mapping[str, Any],
    extra_files: Mapping[str, str] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    The manifest is normalised through JSON (tuples become lists), gets `format`,
    `format_version`, `weights` (file, sha256, bytes) and, if absent, `created`, and is
    validated against `MANIFEST_SCHEMA` before anything is written. Same inputs (with a
    fixed `created`) give byte-identical files. An existing non-empty directory is refused
    unless `force`; with `force` it is swapped out atomically, and only if it holds a
    surgery.json (surgeon never deletes a directory that is not one of its checkpoints).
    """
    files = dict(extra_files or {})
    for name in files:
        if not _EXTRA_FILE_NAME.match(name) or name in (WEIGHTS_FILE, MANIFEST_FILE):
            raise ValueError(
                f"extra file name {name!r} must be a plain file name other than "
                f"{WEIGHTS_FILE} and {MANIFEST_FILE}"
            )
    tensors = _contiguous_tensors(state_dict)
    # everything but the weights' checksum is known now: refuse a bad manifest before writing
    validate_manifest(_complete_manifest(manifest, "0" * 64, 0))
    texts = {name: text.encode("utf-8") for name, text in sorted(files.items())}

    def fill(tmp: Path) -> None:
        # the weights are streamed to disk (no in-memory copy of a large model) and hashed
        # from the file; surgery.json comes last: it vouches for the rest
        weights = tmp / WEIGHTS_FILE
        _write_weights(weights, tensors)
        full = _complete_manifest(manifest, sha256_file(weights), weights.stat().st_size)
        for name, data in [*texts.items(), (MANIFEST_FILE, _manifest_bytes(full))]:
            write_file(tmp / name, data)

    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    write_directory(Path(directory), fill, force=force, marker=MANIFEST_FILE, needed=needed)
    return Path(directory)


def _contiguous_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors by key, sorted, shared storage cloned apart (safetensors refuses
    tensors that share memory: tied weights, views of one buffer)."""
    tensors: dict[str, Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, Tensor):
            raise OutputError(
                f"cannot save state_dict entry {key!r} ({type(value).__name__}): "
                f"only tensors can be stored in {WEIGHTS_FILE}"
            )
        tensor = value.detach().to("cpu").contiguous()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage[1] != 0 and storage in seen_storage:
            tensor = tensor.clone()
        seen_storage.add((str(tensor.device), tensor.untyped_storage().data_ptr()))
        tensors[key] = tensor
    return tensors


def _write_weights(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """safetensors straight to `path`, then fsync. Its I/O errors come back as OSError with
    the errno the Rust side reports, so they get the same one-line messages as any write."""
    # safetensors writes its files 0600; the weights get the mode open() gives every other file
    # of the checkpoint (0666 minus the umask), learnt from creating the file that way first
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(path.stat().st_mode)
    try:
        safetensors.torch.save_file(dict(tensors), str(path), metadata={"format": "pt"})
    except safetensors.SafetensorError as err:
        code = re.search(r"code: (\d+)", str(err))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(err), str(path)) from err
    os.chmod(path, mode)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _complete_manifest(manifest: Mapping[str, Any], sha256: str, size: int) -> dict[str, Any]:
    try:
        full: dict[str, Any] = json.loads(json.dumps(dict(manifest), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the manifest cannot be written as JSON: {err}") from err
    full["format"] = FORMAT
    full["format_version"] = FORMAT_VERSION
    full["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256, "bytes": size}
    full.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return full


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def check_writable(directory: Path, *, force: bool = False) -> None:
    """Fail early (before any slow work) if `write_checkpoint` would refuse `directory`."""
    check_writable_directory(directory, force=force, marker=MANIFEST_FILE)


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Return (manifest, state dict) of a checkpoint, after checking it is whole and untouched.

    Checks, in order: the directory and both files exist; surgery.json is a JSON object of a
    known format and version that matches `MANIFEST_SCHEMA`; model.safetensors has the size and
    SHA-256 the manifest records (hashed in chunks, so a large model is not held twice); its
    safetensors header parses. Tensors are loaded with safetensors; nothing is unpickled or
    imported.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"checkpoint {directory} {what}{interrupted_hint(directory)}")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{directory} is not a surgeon checkpoint: {MANIFEST_FILE} is missing"
        )
    manifest = _read_manifest(manifest_path)
    validate_manifest(manifest)

    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; {FIX_MANIFEST}")
    recorded = manifest["weights"]
    try:  # hashed in chunks and then loaded: never two copies of a large model in memory
        matches = (
            weights_path.stat().st_size == recorded["bytes"]
            and sha256_file(weights_path) == recorded["sha256"]
        )
    except OSError as err:
        raise CheckpointError(f"cannot read {weights_path}: {err.strerror or err}") from err
    if not matches:
        raise CheckpointError(
            f"{weights_path} does not match the checksum in {MANIFEST_FILE} "
            f"(modified or corrupt); {FIX_MANIFEST}"
        )
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except safetensors.SafetensorError as err:
        raise CheckpointError(
            f"{weights_path} is not a valid safetensors file ({err}); {FIX_MANIFEST}"
        ) from err
    return manifest, tensors


def read_manifest(directory: Path) -> dict[str, Any]:
    """The validated surgery.json of a checkpoint directory (the weights are not read)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a surgeon checkpoint: {MANIFEST_FILE} is missing"
        )
    manifest = _read_manifest(path)
    validate_manifest(manifest)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text; {FIX_MANIFEST}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            f"{FIX_MANIFEST}"
        ) from err
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} must hold a JSON object; {FIX_MANIFEST}")
    return manifest


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
