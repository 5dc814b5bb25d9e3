"""The compiled inference kernels: they build where a C compiler exists, give what the PyTorch
formulation gives, serve only eager float32 CPU inference, and step aside cleanly otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from surgeon.layers import BlurPool, native
from surgeon.layers.spd import _rearrange

FAST = settings(
    max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
HAS_COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None
needs_kernels = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@needs_kernels
def test_kernels_build_and_load_where_a_c_compiler_exists() -> None:
    assert native.available(), "native.c did not compile here: run native.build() to see why"


def test_build_without_a_compiler_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(native.NativeBuildError, match="no C compiler 'no-such-cc' on PATH"):
        native.build(tmp_path, compiler="no-such-cc")
    assert not any(tmp_path.iterdir())


@needs_kernels
def test_build_into_an_unwritable_cache_says_which_directory_to_set(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory should go
    with pytest.raises(native.NativeBuildError, match="set SURGEON_CACHE_DIR"):
        native.build(blocked / "cache")


@needs_kernels
def test_build_caches_one_library_and_leaves_no_partial_file(tmp_path: Path) -> None:
    first = native.build(tmp_path)
    modified = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first
    assert first.stat().st_mtime_ns == modified, "a cached library was rebuilt"
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@FAST
@given(
    size=st.tuples(st.integers(1, 11), st.integers(1, 11)),
    lefts=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    extra=st.tuples(st.integers(-2, 2), st.integers(-2, 2)),
    channels=st.integers(1, 10),
    channels_last=st.booleans(),
    phase_major=st.booleans(),
)
@needs_kernels
def test_native_space_to_depth_equals_pad_then_rearrange(
    size: tuple[int, int],
    lefts: tuple[int, int],
    extra: tuple[int, int],
    channels: int,
    channels_last: bool,
    phase_major: bool,
) -> None:
    # every left pad, and right ends that pad, crop, or leave whole phases to padding
    reduced = [
        max(1, -(-left // 2), (s + left) // 2 + e)
        for s, left, e in zip(size, lefts, extra, strict=True)
    ]
    x = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(sum(size)))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pads = [lefts[1], 2 * reduced[1] - size[1] - lefts[1]]
    pads += [lefts[0], 2 * reduced[0] - size[0] - lefts[0]]
    with native.disabled():
        expected = _rearrange(F.pad(x, pads), [2, 2], reduced, phase_major)
    got = native.space_to_depth2(x, lefts, reduced, phase_major)
    assert got is not None
    assert torch.equal(got, expected), f"{tuple(x.shape)} lefts {lefts} -> {reduced}"
    # the input's layout (one channel, or 1x1 maps, are both layouts: contiguous out)
    layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    assert got.is_contiguous(memory_format=layout)


@FAST
@given(
    size=st.tuples(st.integers(1, 40), st.integers(1, 70)),
    filter_size=st.integers(1, 7),
    stride=st.sampled_from([(2, 2), (3, 2), (1, 2)]),
    pad_mode=st.sampled_from(["reflect", "replicate", "zero"]),
    ceil_source=st.sampled_from([None, (3, 1, 1), (2, 0, 1)]),
)
@needs_kernels
def test_native_blur_at_column_stride_2_matches_on_narrow_and_wide_maps(
    size: tuple[int, int],
    filter_size: int,
    stride: tuple[int, int],
    pad_mode: str,
    ceil_source: tuple[int, int, int] | None,
) -> None:
    # NCHW maps up to 32 wide take the flat whole-plane passes, wider ones the per-row loop
    blur = BlurPool(
        5, filter_size=filter_size, stride=stride, pad_mode=pad_mode, ceil_source=ceil_source
    )
    x = torch.randn(2, 5, *size, generator=torch.Generator().manual_seed(sum(size)))
    with native.disabled():
        expected = blur(x)
    got = blur(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6), f"{blur} on {tuple(x.shape)}"


@needs_kernels
@pytest.mark.parametrize("stride", [(2, 3), (2, 2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pad_mode", ["reflect", "replicate", "zero"])
def test_native_blur_uses_every_thread_and_matches_the_pytorch_formulation(
    layout: torch.memory_format, pad_mode: str, stride: tuple[int, int]
) -> None:
    blur = BlurPool(24, filter_size=5, stride=stride, pad_mode=pad_mode)
    x = torch.randn(3, 24, 37, 30).contiguous(memory_format=layout)
    with native.disabled():
        expected = blur(x)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            got = blur(x)
            assert torch.allclose(got, expected, atol=1e-6), f"{count} threads"
            assert got.is_contiguous(memory_format=layout)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_kernels_serve_only_eager_float32_cpu_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[bool] = []
    kernel = native.blur2d

    def spy(*args: object) -> torch.Tensor | None:
        out = kernel(*args)  # type: ignore[arg-type]
        ran.append(out is not None)
        return out

    monkeypatch.setattr(native, "blur2d", spy)
    blur = BlurPool(4)
    x = torch.randn(1, 4, 12, 12)

    def took_kernel(x: torch.Tensor) -> bool:
        ran.clear()
        blur(x)
        return ran == [True]

    assert took_kernel(x)
    assert not took_kernel(x.double())
    assert not took_kernel(x.requires_grad_())
    with torch.no_grad():
        assert took_kernel(x)  # requires_grad, but nothing is recorded
    x = x.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not took_kernel(x)
    with native.disabled():
        assert not took_kernel(x)
    assert not took_kernel(x[:, :, :, ::2])  # neither layout: PyTorch copies as needed
    ran.clear()
    traced = torch.jit.trace(blur, x, check_trace=False)
    other = torch.randn(2, 4, 9, 7)
    assert torch.allclose(traced(other), blur(other), atol=1e-6)  # sizes stay dynamic
    assert ran == [True], "tracing, or the traced graph, called the kernel"  # only blur(other)


@needs_kernels
def test_dispatch_modes_see_the_pytorch_ops_not_the_kernels() -> None:
    # FlopCounterMode counts the blur's convolution (surgeon's MAC figures rely on it) and
    # FakeTensorMode runs the layers without data
    model = torch.nn.Sequential(BlurPool(8), BlurPool(8, filter_size=3))
    x = torch.randn(2, 8, 32, 32)
    counts = []
    for switched_off in (False, True):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if switched_off:
                with native.disabled():
                    model(x)
            else:
                model(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        out = model(fake.from_tensor(x))
    assert out.shape == (2, 8, 8, 8)


@needs_kernels
def test_blur_backpropagates_when_autograd_records() -> None:
    blur = BlurPool(2, filter_size=3)
    x = torch.randn(1, 2, 9, 8, requires_grad=True)
    blur(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


FALLBACK = """
import torch
from surgeon.layers import BlurPool, native, space_to_depth
x = torch.randn(2, 6, 10, 12)
with native.disabled():
    blur, s2d = BlurPool(6)(x), space_to_depth(x, (2, 2))
assert torch.equal(BlurPool(6)(x), blur) and torch.equal(space_to_depth(x, (2, 2)), s2d)
print(native.available())
"""


@pytest.mark.parametrize(
    "env",
    [{"SURGEON_NATIVE": "0"}, {"CC": "/nonexistent/cc"}],
    ids=["switched-off", "no-compiler"],
)
def test_layers_fall_back_to_pytorch_without_kernels(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_python(FALLBACK, SURGEON_CACHE_DIR=str(tmp_path), **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert not any(tmp_path.iterdir())
