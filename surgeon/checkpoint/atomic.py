"""Atomic writes: a directory or a file appears complete at its path, or not at all.

Everything is written into a hidden sibling (`.NAME.tmp-PID-RANDOM`, same parent, so the same
file system), fsynced, then renamed into place. Replacing an existing directory swaps the two in
one step where Linux `renameat2(RENAME_EXCHANGE)` exists, else renames the old one aside first
(`.NAME.old-PID-RANDOM`, put back by the next write if a crash came between the renames). The
one implementation for checkpoints and exports.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from surgeon.errors import Argument, OutputError

__all__ = [
    "check_writable",
    "interrupted_hint",
    "temporary_file",
    "write_directory",
    "write_file",
]

# Temporary directories this process is writing right now; everything else with our naming
# pattern and a dead (or our own, recycled) pid is left over from a killed write.
_in_flight: set[Path] = set()

FORCE = Argument("force", True)  # what replacing an existing output takes


def write_directory(
    directory: Path,
    fill: Callable[[Path], None],
    *,
    force: bool = False,
    marker: str,
    needed: int = 0,
) -> Path:
    """Create `directory` atomically with the files `fill(tmp)` writes into a temporary sibling.

    An existing non-empty directory is refused unless `force`, and even then only replaced when
    it holds the file `marker` (surgeon never deletes a directory it did not write). Parents
    are created and removed again on failure; OSErrors become one-line OutputErrors (`needed`
    bytes are named when the disk is full). Returns the absolute path written.
    """
    # Absolute and normalised, so `.` or `out/..` name a real directory with a parent.
    target = Path(os.path.abspath(directory))
    if not target.name:
        raise OutputError(f"cannot write to {target}; choose a directory below it")
    try:
        _recover_interrupted_write(target)
        replace = _check_target(target, force=force, marker=marker)
    except OSError as err:
        raise _output_error(err, target, needed=0) from err
    created_parents = _make_parents(target)
    tmp: Path | None = None
    try:
        tmp = _make_tmp_sibling(target)
        fill(tmp)
        _fsync_dir(tmp)
        _move_into_place(tmp, target, replace=replace)
    except BaseException as err:
        _discard(tmp)
        for parent in reversed(created_parents):
            _rmdir_quietly(parent)
        if isinstance(err, OSError):
            raise _output_error(err, target, needed=needed) from err
        raise
    _discard(tmp)  # after an exchange it holds the previous directory
    return target


@contextlib.contextmanager
def temporary_file(target: Path) -> Iterator[Path]:
    """A hidden temporary path next to `target` (same file system, so `os.replace(tmp,
    target)` is atomic), removed on the way out unless it was renamed into place. Missing
    parents are created; OSErrors inside become one-line OutputErrors."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {target.parent}: {exc.strerror or exc}") from exc
    # the suffix stays last: torch.export.save/load want a name ending in .pt2
    name = f".{target.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"
    tmp = target.with_name(name)
    try:
        yield tmp
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_file(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (refuses an existing path)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_writable(directory: Path, *, force: bool = False, marker: str) -> None:
    """Fail early (before any slow work) if `write_directory` would refuse `directory` or could
    not write it: the hidden sibling it writes into (and any missing parent) is created and
    removed again, so a target on a read-only or pseudo file system (/proc) is caught here."""
    target = Path(os.path.abspath(directory))
    if not target.name:
        raise OutputError(f"cannot write to {target}; choose a directory below it")
    try:
        _check_target(target, force=force, marker=marker)
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


def _check_target(directory: Path, *, force: bool, marker: str) -> bool:
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
        raise OutputError(f"{directory} exists and is not empty; pass ", FORCE, " to replace it")
    if not (directory / marker).is_file():
        raise OutputError(
            f"{directory} is not a surgeon checkpoint (no {marker}); refusing to "
            "replace it even with ",
            FORCE,
            ": remove it yourself or choose another directory",
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
                    f"{directory} exists and is not empty; pass ", FORCE, " to replace it"
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


def interrupted_hint(directory: Path) -> str:
    """` (an interrupted write left PATH)` when a killed write left a sibling, else ""."""
    leftovers = sorted(p.name for _, p in _stale_siblings(directory))
    if not leftovers:
        return ""
    return f" (an interrupted write left {directory.parent / leftovers[0]})"
