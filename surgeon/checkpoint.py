"""Patched checkpoints on disk (safetensors + surgery.json), and reading user weights files.

A patched checkpoint is a directory::

    model.safetensors   the patched state dict
    surgery.json        the manifest: how to rebuild the model, the decisions, a weights checksum
    report.md           the human-readable report (and any other extra files)

Writes are atomic: everything goes into a hidden sibling directory that is renamed into place,
so a crash leaves either no checkpoint or the previous one, never a half-written one. Reads
check the manifest and the weights checksum before anything is used, load tensors with
safetensors only (nothing is unpickled) and never import code named by a checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import stat
import sys
import types
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from surgeon.errors import CheckpointError, OutputError, WeightsError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "WEIGHTS_FILE",
    "WEIGHTS_SUFFIXES",
    "check_state_dict_fits",
    "check_writable",
    "load_weights_file",
    "read_checkpoint",
    "require_trusted_import",
    "sha256_file",
    "validate_manifest",
    "write_checkpoint",
]

FORMAT = "surgeon-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "surgery.json"
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

JSONScalar = str | int | float | bool | None
# model kwargs: scalars or flat lists of them (replace_stride_with_dilation=[false, true, true])
JSONKwarg = JSONScalar | list[JSONScalar]

# The one description of surgery.json: field -> expected JSON type. A nested dict is an object
# whose fields are all required; other fields anywhere are allowed and kept (forward
# compatibility within a format version). docs/checkpoint.md documents every field listed here.
MANIFEST_SCHEMA: dict[str, Any] = {
    "format": Literal["surgeon-checkpoint"],
    "format_version": int,
    "created": str,
    "model": {
        "spec": str,
        "source": Literal["torchvision", "timm", "import"],
        "name": str,
        "kwargs": dict[str, JSONKwarg],
        "input_size": list[int],
    },
    "policy": dict[str, Any],
    "sites": list[dict[str, Any]],
    "decisions": list[dict[str, Any]],
    "versions": dict[str, str],
    "weights": {
        "file": Literal["model.safetensors"],
        "sha256": str,
        "bytes": int,
    },
}

_IMPORT_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXTRA_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIX_MANIFEST = "re-create the checkpoint"
_CHUNK = 1 << 20

# Temporary directories this process is writing right now; everything else with our naming
# pattern and a dead (or our own, recycled) pid is left over from a killed write.
_in_flight: set[Path] = set()


# --- writing -------------------------------------------------------------------------------


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
    # Absolute and normalised, so `.` or `out/..` name a real directory with a parent.
    target = Path(os.path.abspath(directory))
    if not target.name:
        raise OutputError(f"cannot write a checkpoint to {target}; choose a directory below it")
    try:
        _recover_interrupted_write(target)
        replace = _check_target(target, force=force)
    except OSError as err:
        raise _output_error(err, target, needed=0) from err

    tensors = _contiguous_tensors(state_dict)
    # everything but the weights' checksum is known now: refuse a bad manifest before writing
    validate_manifest(_complete_manifest(manifest, "0" * 64, 0))
    texts = {name: text.encode("utf-8") for name, text in sorted(files.items())}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())

    created_parents = _make_parents(target)
    tmp: Path | None = None
    try:
        tmp = _make_tmp_sibling(target)
        # the weights are streamed to disk (no in-memory copy of a large model) and hashed
        # from the file; surgery.json comes last: it vouches for the rest
        weights = tmp / WEIGHTS_FILE
        _write_weights(weights, tensors)
        full = _complete_manifest(manifest, sha256_file(weights), weights.stat().st_size)
        for name, data in [*texts.items(), (MANIFEST_FILE, _manifest_bytes(full))]:
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        _move_into_place(tmp, target, replace=replace)
    except BaseException as err:
        _discard(tmp)
        for parent in reversed(created_parents):
            _rmdir_quietly(parent)
        if isinstance(err, OSError):
            raise _output_error(err, target, needed=needed) from err
        raise
    _discard(tmp)  # after an exchange it holds the previous checkpoint
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
    """Fail early (before any slow work) if `write_checkpoint` would refuse `directory` or could
    not write it: the hidden sibling it writes into (and any missing parent) is created and
    removed again, so a target on a read-only or pseudo file system (/proc) is caught here."""
    target = Path(os.path.abspath(directory))
    if not target.name:
        raise OutputError(f"cannot write a checkpoint to {target}; choose a directory below it")
    try:
        _check_target(target, force=force)
    except OSError as err:
        raise _output_error(err, target, needed=0) from err
    created = _make_parents(target)
    tmp: Path | None = None
    try:
        tmp = _make_tmp_sibling(target)
    except OSError as err:
        raise _output_error(err, target, needed=0) from err
    finally:
        _discard(tmp)
        for parent in reversed(created):
            _rmdir_quietly(parent)


def _check_target(directory: Path, *, force: bool) -> bool:
    """Refuse a target we must not touch; return whether an existing checkpoint is replaced."""
    if directory.is_symlink():
        raise OutputError(f"{directory} is a symbolic link; pass the real path to write to")
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise OutputError(f"{directory} exists and is a file; choose a directory path")
    if not any(directory.iterdir()):
        return False
    if not force:
        raise OutputError(f"{directory} exists and is not empty; pass --force to replace it")
    if not (directory / MANIFEST_FILE).is_file():
        raise OutputError(
            f"{directory} is not a surgeon checkpoint (no {MANIFEST_FILE}); refusing to "
            "replace it even with --force: remove it yourself or choose another directory"
        )
    return True


def _make_parents(directory: Path) -> list[Path]:
    """Create missing parent directories; return those created (outermost first)."""
    missing: list[Path] = []
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"cannot create {directory}: {parent} is a file, not a directory; "
            "choose another output directory"
        )
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except OSError as err:
        for path in reversed(created):
            _rmdir_quietly(path)
        raise _output_error(err, directory, needed=0) from err
    return created


def _make_tmp_sibling(directory: Path) -> Path:
    while True:
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()  # mode 0o777 minus umask, like any directory the user creates
        except FileExistsError:
            continue
        _in_flight.add(tmp)
        return tmp


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, directory: Path, *, replace: bool) -> None:
    """Rename `tmp` to `directory`; an existing checkpoint ends up at `tmp` (or is removed)."""
    if replace:
        if _exchange(tmp, directory):
            _fsync_dir(directory.parent)
            return
        _replace_via_aside(tmp, directory)
    else:
        try:
            # Atomically replaces an empty directory; fails if someone filled it meanwhile.
            os.rename(tmp, directory)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(
                    f"{directory} exists and is not empty; pass --force to replace it"
                ) from err
            raise
    _fsync_dir(directory.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):
        return False  # unsupported here (or the target vanished): the fallback handles it
    raise OSError(code, os.strerror(code), str(b))


def _replace_via_aside(tmp: Path, directory: Path) -> None:
    """Rename the old checkpoint aside, the new one in, then delete the old one.

    A crash between the two renames leaves the old checkpoint at `.{name}.old-{pid}-{hex}`;
    the next write (or `_recover_interrupted_write`) renames it back.
    """
    aside = directory.parent / f".{directory.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    _in_flight.add(aside)
    try:
        try:
            os.rename(directory, aside)
        except FileNotFoundError:
            os.rename(tmp, directory)
            return
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(aside, directory)
            raise
        _fsync_dir(directory.parent)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        _in_flight.discard(aside)


def _recover_interrupted_write(directory: Path) -> None:
    """Put back a checkpoint a killed replace left aside; delete stale temporary siblings."""
    parent = directory.parent
    if not parent.is_dir():
        return
    stale = list(_stale_siblings(directory))
    asides = sorted((p for kind, p in stale if kind == "old"), key=_mtime, reverse=True)
    if asides and not directory.exists():
        try:
            os.rename(asides[0], directory)
            asides = asides[1:]
        except OSError:
            pass
    for path in [p for kind, p in stale if kind == "tmp"] + asides:
        shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _stale_siblings(directory: Path) -> Iterator[tuple[str, Path]]:
    pattern = re.compile(rf"^\.{re.escape(directory.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    try:
        entries = list(directory.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            pid = int(match.group(2))
            if entry not in _in_flight and not _process_alive(pid):
                yield match.group(1), entry


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our pid but not in flight: a killed earlier process had the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _discard(tmp: Path | None) -> None:
    if tmp is not None:
        _in_flight.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _output_error(err: OSError, directory: Path, *, needed: int) -> OutputError:
    where = err.filename or directory.parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        size = f" (needs about {needed / 1e6:.0f} MB)" if needed >= 1e6 else ""
        return OutputError(
            f"not enough disk space to write {directory}{size}; "
            "free some space or choose another output directory"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return OutputError(
            f"cannot write {directory}: permission denied on {where}; "
            "choose another output directory or fix its permissions"
        )
    if err.errno == errno.EROFS:
        return OutputError(
            f"cannot write {directory}: {where} is on a read-only file system; "
            "choose another output directory"
        )
    if err.errno == errno.ENOTDIR:
        return OutputError(
            f"cannot write {directory}: a parent of it is a file, not a directory; "
            "choose another output directory"
        )
    return OutputError(
        f"cannot write {directory}: {err.strerror or err} ({where}); "
        "choose another output directory"
    )


# --- reading -------------------------------------------------------------------------------


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
        raise CheckpointError(f"checkpoint {directory} {what}{_interrupted_hint(directory)}")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{directory} is not a surgeon checkpoint: {MANIFEST_FILE} is missing"
        )
    manifest = _read_manifest(manifest_path)
    validate_manifest(manifest)

    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; {_FIX_MANIFEST}")
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
            f"(modified or corrupt); {_FIX_MANIFEST}"
        )
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except safetensors.SafetensorError as err:
        raise CheckpointError(
            f"{weights_path} is not a valid safetensors file ({err}); {_FIX_MANIFEST}"
        ) from err
    return manifest, tensors


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text; {_FIX_MANIFEST}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            f"{_FIX_MANIFEST}"
        ) from err
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} must hold a JSON object; {_FIX_MANIFEST}")
    return manifest


def _interrupted_hint(directory: Path) -> str:
    leftovers = sorted(p.name for _, p in _stale_siblings(directory))
    if not leftovers:
        return ""
    return f" (an interrupted write left {directory.parent / leftovers[0]})"


# --- the manifest --------------------------------------------------------------------------


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the first field of `manifest` that breaks the schema.

    The format and version are checked first, so a checkpoint from a newer surgeon asks for an
    upgrade instead of reporting a field it cannot know about.
    """
    if not isinstance(manifest, Mapping):
        raise CheckpointError(f"{MANIFEST_FILE} must hold a JSON object; {_FIX_MANIFEST}")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{MANIFEST_FILE} is not a surgeon checkpoint manifest "
            f"(format is {manifest.get('format')!r}, expected {FORMAT!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(
            f"{MANIFEST_FILE}: field 'format_version' must be an integer, got {version!r}; "
            f"{_FIX_MANIFEST}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"this checkpoint has format_version {version}, newer than this surgeon reads "
            f"({FORMAT_VERSION}); upgrade surgeon (pip install -U surgeon)"
        )
    if version < 1:
        raise CheckpointError(f"{MANIFEST_FILE}: format_version {version} is not valid")

    _check_field(manifest, MANIFEST_SCHEMA, "")
    model = manifest["model"]
    if not model["input_size"] or any(n <= 0 for n in model["input_size"]):
        _field_error(
            "model.input_size", "a non-empty list of positive integers", model["input_size"]
        )
    if model["source"] == "import" and not _IMPORT_SPEC.match(model["name"]):
        _field_error("model.name", "an import spec 'pkg.module:factory'", model["name"])
    weights = manifest["weights"]
    if not _SHA256.match(weights["sha256"]):
        _field_error("weights.sha256", "64 lowercase hex digits", weights["sha256"])
    if weights["bytes"] < 0:
        _field_error("weights.bytes", "a size in bytes", weights["bytes"])


def require_trusted_import(manifest: Mapping[str, Any], allowed: Collection[str]) -> None:
    """Raise CheckpointError if rebuilding the model would import code the user did not name.

    For `model.source == "import"` the factory `model.name` ("pkg.mod:fn") must be in
    `allowed` (what the user passed with `--trust-import`); other sources import nothing.
    """
    model = manifest.get("model")
    if not isinstance(model, Mapping) or model.get("source") != "import":
        return
    spec = model.get("name")
    if spec not in allowed:
        raise CheckpointError(
            f"this checkpoint rebuilds its model by importing and calling {spec!r}, which runs "
            f"that code; surgeon imports nothing from a checkpoint on its own: pass "
            f"--trust-import {spec} if you trust it"
        )


def _check_field(value: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        if not isinstance(value, Mapping):
            _field_error(where, "an object", value)
        for key, sub in expected.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                raise CheckpointError(
                    f"{MANIFEST_FILE}: required field '{path}' is missing; {_FIX_MANIFEST}"
                )
            _check_field(value[key], sub, path)
        return
    if expected is Any:
        return
    origin, args = get_origin(expected), get_args(expected)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            _field_error(where, "one of " + ", ".join(repr(a) for a in args), value)
    elif origin in (Union, types.UnionType):
        if not any(_matches(value, arg) for arg in args):
            _field_error(where, _describe(expected), value)
    elif origin is list:
        if not isinstance(value, list):
            _field_error(where, _describe(expected), value)
        for i, item in enumerate(value):
            _check_field(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            _field_error(where, _describe(expected), value)
        for key, item in value.items():
            _check_field(item, args[1], f"{where}.{key}")
    elif not _matches(value, expected):
        _field_error(where, _describe(expected), value)


def _matches(value: Any, expected: Any) -> bool:
    if expected is type(None) or expected is None:
        return value is None
    if get_origin(expected) is not None or isinstance(expected, dict):
        try:
            _check_field(value, expected, "")
        except CheckpointError:
            return False
        return True
    if expected is int:
        return _is_int(value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(expected: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    origin, args = get_origin(expected), get_args(expected)
    if expected == JSONScalar:
        return "a string, number, true/false or null"
    if expected == JSONKwarg:
        return "a string, number, true/false, null or a list of those"
    if expected in names:
        return names[expected]
    if expected is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "an object" if args[1] is Any else f"an object of {_describe(args[1])} values"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return getattr(expected, "__name__", str(expected))


def _field_error(where: str, expected: str, value: Any) -> NoReturn:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise CheckpointError(
        f"{MANIFEST_FILE}: field '{where}' must be {expected}, got {type(value).__name__} "
        f"{shown}; {_FIX_MANIFEST}"
    )


# --- user weights files --------------------------------------------------------------------


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


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
