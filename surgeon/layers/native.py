"""Compiled CPU kernels for inference: BlurPool and 2x2 space-to-depth in one pass each.

PyTorch has no single op for either: BlurPool is a padded copy plus a depthwise convolution
(oneDNN's is 2.7x slower in NCHW memory than in channels-last) and space-to-depth a strided copy
whose inner loop steps by 2. No formulation in PyTorch ops beat the reference implementations in
both layouts (docs/benchmarks.md); `native.c` does, by reading each input row once.

The C source ships with the package and is compiled on first use with the system C compiler
(`$CC`, else `cc`) into a per-user cache (`$SURGEON_CACHE_DIR`, else `$XDG_CACHE_HOME/surgeon`
or `~/.cache/surgeon`), keyed by the source, the flags, the compiler and the CPU. The kernels
serve eager float32 CPU inference only: with autograd recording, under autocast, scripting,
tracing, torch.compile or export, for other dtypes or devices, with no compiler, or with
`SURGEON_NATIVE=0`, the layers run their PyTorch formulation, which gives the same results
(bit for bit for space-to-depth, to float rounding for BlurPool).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from surgeon.layers.eager import inference_route

__all__ = ["NativeBuildError", "available", "blur2d", "build", "disabled", "space_to_depth2"]

_SOURCE = Path(__file__).with_name("native.c")
# -march=native: the cache key holds the CPU, so a cached library never runs on a CPU it was not
# built for; each later entry drops what an older compiler (or clang without OpenMP) rejects
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_INT = ctypes.c_int
_switched_off = [False]


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (no compiler, a failed build)."""


def _cache_dir() -> Path:
    explicit = os.environ.get("SURGEON_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "surgeon"


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in wanted]
    return "\n".join(dict.fromkeys(lines))  # the first CPU's lines; the rest repeat them


def build(cache_dir: Path | None = None, compiler: str | None = None) -> Path:
    """Compile `native.c` (once per source, compiler and CPU) and return the library's path.

    Raises NativeBuildError with the compiler's message when no flag set compiles. The library
    is written under a temporary name and renamed into place, so concurrent builds (pytest-xdist
    workers, DDP ranks) never load a half-written file.
    """
    import hashlib
    import shutil
    import subprocess
    import tempfile

    name = compiler or os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if path is None:
        raise NativeBuildError(
            f"no C compiler {name!r} on PATH; install one (gcc or clang) or set CC to it"
        )
    source = _SOURCE.read_bytes()
    directory = cache_dir or _cache_dir()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), os.path.realpath(path).encode()])
            + _cpu_identity().encode()
        ).hexdigest()[:16]
        target = directory / f"surgeon_native_{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
        except OSError as error:
            raise NativeBuildError(
                f"cannot write the kernel cache {directory} ({error.strerror}); set "
                "SURGEON_CACHE_DIR to a writable directory"
            ) from error
        os.close(handle)
        command = [path, *flags, "-shared", "-fPIC", "-o", partial, str(_SOURCE)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                os.replace(partial, target)
                return target
            errors.append(result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"])
        except (OSError, subprocess.TimeoutExpired) as error:
            errors.append([str(error)])
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    detail = "; ".join(e[0] for e in errors)
    raise NativeBuildError(f"compiling {_SOURCE.name} with {path} failed: {detail}")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SURGEON_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        library = ctypes.CDLL(str(build()))
    except (NativeBuildError, OSError):
        return None  # the PyTorch formulation serves instead; `build()` says why
    tables = [_PTR, _PTR, _PTR, _I64, _I64, _INT]  # taps, rows, cols, padded width, left
    signatures = {
        "surgeon_blur2d_nchw": ([_PTR, _PTR, *[_I64] * 7, *tables], _INT),
        "surgeon_blur2d_nhwc": ([_PTR, _PTR, *[_I64] * 8, *tables], _INT),
        "surgeon_space_to_depth2_nchw": ([_PTR, _PTR, *[_I64] * 8, _INT, _INT], None),
        "surgeon_space_to_depth2_nhwc": ([_PTR, _PTR, *[_I64] * 8, _INT, _INT], _INT),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = result
    return library


def available() -> bool:
    """Whether the kernels are compiled and loaded (building them on the first call)."""
    return _library() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block the layers run their PyTorch formulation: to compare the two, or to rule
    the kernels out while debugging."""
    previous = _switched_off[0]
    _switched_off[0] = True
    try:
        yield
    finally:
        _switched_off[0] = previous


def _eligible(x: Tensor) -> ctypes.CDLL | None:
    # the library when `x` may take a kernel: eager float32 CPU inference of a 4-d tensor
    if _switched_off[0] or not inference_route(x) or x.dim() != 4 or x.numel() == 0:
        return None
    return _library()


def _layout(x: Tensor) -> str | None:
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


@torch.jit.unused  # ctypes calls cannot be scripted; callers script their PyTorch path
def blur2d(
    x: Tensor, taps: Tensor, rows: Tensor, cols: Tensor, stride: int, lengths: Sequence[int]
) -> Tensor | None:
    """BlurPool of a 4-d `x` by the compiled kernel, or None where it does not apply.

    `taps` is the 1-d filter (float32), `rows[i * f + k]` the input row tap k of output row i
    reads and `cols[p]` the input column of padded column p (-1: zero); `stride` is the
    horizontal stride (the vertical one is in `rows`), `lengths` the output size.
    """
    library = _eligible(x)
    layout = _layout(x)
    if library is None or layout is None or torch.is_autocast_enabled("cpu"):
        return None
    n, c, h, w = x.shape
    ho, wo = int(lengths[0]), int(lengths[1])
    f = taps.numel()
    tables = (taps.data_ptr(), rows.data_ptr(), cols.data_ptr(), cols.numel(), (f - 1) // 2)
    threads = torch.get_num_threads()
    if layout == "nchw":
        out = torch.empty((n, c, ho, wo), dtype=x.dtype)
        failed = library.surgeon_blur2d_nchw(
            x.data_ptr(), out.data_ptr(), n * c, h, w, ho, wo, f, stride, *tables, threads
        )
    else:
        out = torch.empty((n, c, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
        failed = library.surgeon_blur2d_nhwc(
            x.data_ptr(), out.data_ptr(), n, h, w, c, ho, wo, f, stride, *tables, threads
        )
    if failed:
        raise MemoryError("BlurPool's native kernel could not allocate its row buffer")
    return out


@torch.jit.unused
def space_to_depth2(
    x: Tensor, lefts: Sequence[int], reduced: Sequence[int], phase_major: bool
) -> Tensor | None:
    """Block-2x2 space-to-depth of a 4-d `x` zero-padded by `lefts` and cut or zero-filled to
    `reduced` blocks, by the compiled kernel, or None where it does not apply. The output is
    channels-last when `x` is, contiguous otherwise."""
    library = _eligible(x)
    layout = _layout(x)
    if library is None or layout is None:
        return None
    n, c, h, w = x.shape
    ho, wo = int(reduced[0]), int(reduced[1])
    arguments = (n, c, h, w, ho, wo, int(lefts[0]), int(lefts[1]), int(phase_major))
    threads = torch.get_num_threads()
    if layout == "nchw":
        out = torch.empty((n, 4 * c, ho, wo), dtype=x.dtype)
        library.surgeon_space_to_depth2_nchw(x.data_ptr(), out.data_ptr(), *arguments, threads)
        return out
    out = torch.empty((n, 4 * c, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
    if library.surgeon_space_to_depth2_nhwc(x.data_ptr(), out.data_ptr(), *arguments, threads):
        raise MemoryError("space-to-depth's native kernel could not allocate its zero row")
    return out
