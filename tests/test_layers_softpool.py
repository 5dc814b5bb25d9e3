"""SoftPool: the softmax-weighted window mean against a direct definition (padding, ceil_mode,
dilation, 1-3 dims), its place between average and max pooling, numerical stability for large
activations (property test), config round trip and deployment."""

from __future__ import annotations

import io
import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from surgeon.arithmetic import pool_output_size
from surgeon.layers import SoftPool, pool_arguments

FAST = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def definition(x: Tensor, pool: SoftPool) -> Tensor:
    """sum e^x x / sum e^x over the in-input positions of every window, in float64."""
    x = x.double()
    lengths = [
        pool_output_size(size, k, s, p, d, pool.ceil_mode)
        for size, k, s, p, d in zip(
            x.shape[2:], pool.kernel_size, pool.stride, pool.padding, pool.dilation, strict=True
        )
    ]
    out = torch.empty(*x.shape[:2], *lengths, dtype=torch.float64)
    for position in itertools.product(*(range(t) for t in lengths)):
        values = []
        for tap in itertools.product(*(range(k) for k in pool.kernel_size)):
            index = [
                t * s - p + j * d
                for t, s, p, j, d in zip(
                    position, pool.stride, pool.padding, tap, pool.dilation, strict=True
                )
            ]
            if all(0 <= i < size for i, size in zip(index, x.shape[2:], strict=True)):
                values.append(x[(slice(None), slice(None), *index)])
        window = torch.stack(values, -1)
        out[(slice(None), slice(None), *position)] = (window.softmax(-1) * window).sum(-1)
    return out


CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=2, stride=3, ceil_mode=True),
    dict(kernel_size=4, stride=4, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_softpool_matches_its_definition_at_odd_and_even_sizes(case: int) -> None:
    pool = SoftPool(**CASES[case])  # type: ignore[arg-type]
    for size in [(7, 8), (9, 9), (6, 5)]:
        x = torch.randn(2, 3, *size) * 3
        expected = definition(x, pool)
        got = pool(x)
        assert got.shape == expected.shape, (CASES[case], size)
        assert torch.allclose(got.double(), expected, atol=1e-5), (CASES[case], size)


@pytest.mark.parametrize("dims", [1, 3])
def test_softpool_matches_its_definition_in_one_and_three_dims(dims: int) -> None:
    pool = SoftPool(dims=dims, kernel_size=3, stride=2, padding=1, ceil_mode=True)
    x = torch.randn([2, 2, *[6, 5, 7][:dims]])
    assert torch.allclose(pool(x).double(), definition(x, pool), atol=1e-5)


def test_softpool_lies_between_average_and_max_pooling() -> None:
    x = torch.randn(2, 3, 10, 9) * 4
    out = SoftPool(kernel_size=3, stride=2)(x)
    assert (out <= F.max_pool2d(x, 3, 2) + 1e-5).all()
    assert (out >= F.avg_pool2d(x, 3, 2) - 1e-5).all()


def test_softpool_of_windows_far_below_the_map_maximum_is_not_nan() -> None:
    # a map-level maximum would make every window of the low half underflow to 0 / 0
    x = torch.full((1, 1, 4, 8), -200.0)
    x[..., 4:] = 200.0
    out = SoftPool(kernel_size=2)(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[..., :2], torch.full((1, 1, 2, 2), -200.0))


@FAST
@given(
    scale=st.floats(1e-3, 1e4),
    seed=st.integers(0, 2**16),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    ceil_mode=st.booleans(),
    size=st.integers(4, 9),
)
def test_softpool_is_finite_with_finite_gradients_for_large_activations(
    scale: float, seed: int, kernel: int, stride: int, ceil_mode: bool, size: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(2, 3, size, size + 1, generator=generator) * 2 - 1) * scale
    x.requires_grad_(True)
    pool = SoftPool(kernel_size=kernel, stride=stride, padding=kernel // 2, ceil_mode=ceil_mode)
    out = pool(x)
    assert torch.isfinite(out).all(), f"non-finite output at scale {scale}"
    assert out.abs().max() <= x.abs().max() + 1e-3 * scale  # a mean of window values
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), f"non-finite grad at {scale}"


def test_softpool_from_pools_is_approximate() -> None:
    for module in [nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(2), nn.MaxPool1d(2, 2)]:
        pool, transfer = SoftPool.from_pool(**pool_arguments(module))
        assert transfer == "approximate"
        x = torch.randn([1, 2, *[9, 8][: pool.dims]])
        assert pool(x).shape == module(x).shape
    with pytest.raises(ValueError, match="'same'"):
        SoftPool.from_pool("max", 2, 3, 2, "same")
    with pytest.raises(ValueError, match="half the effective kernel"):
        SoftPool(kernel_size=2, padding=2)


def test_softpool_config_round_trips_through_json() -> None:
    pool = SoftPool(
        dims=3, kernel_size=[3, 2, 2], stride=[2, 1, 2], padding=[1, 0, 1], ceil_mode=True
    )
    config = json.loads(json.dumps(pool.config()))
    rebuilt = SoftPool(**config)
    assert rebuilt.config() == pool.config() and not list(rebuilt.state_dict())
    x = torch.randn(1, 2, 5, 6, 7)
    assert torch.equal(rebuilt(x), pool(x))


def test_softpool_traces_and_scripts_with_dynamic_sizes() -> None:
    pool = SoftPool(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(pool, torch.randn(2, 3, 8, 8))
        scripted = torch.jit.script(pool)
    for shape in [(2, 3, 8, 8), (1, 3, 11, 6)]:
        x = torch.randn(shape)
        assert torch.allclose(traced(x), pool(x), atol=1e-6), shape
        assert torch.allclose(scripted(x), pool(x), atol=1e-6), shape


def test_softpool_exports_with_torch_export_dynamic_shapes() -> None:
    # ceil_mode is left out: PyTorch's own ceil_mode pools do not export with dynamic sizes
    pool = SoftPool(kernel_size=3, stride=2, padding=1)
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
    program = torch.export.export(pool, (torch.randn(2, 3, 10, 12),), dynamic_shapes={"x": dynamic})
    for shape in [(3, 3, 9, 13), (1, 3, 16, 7)]:
        x = torch.randn(shape)
        assert torch.allclose(program.module()(x), pool(x), atol=1e-6), shape


def test_softpool_exports_to_onnx_with_dynamic_axes() -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pool = SoftPool(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pool, (torch.randn(2, 3, 8, 8),), buffer, dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 12, 10), (1, 3, 9, 7)]:
        x = torch.randn(shape) * 50
        (out,) = session.run(None, {"x": x.numpy()})
        expected = pool(x)
        assert float((torch.from_numpy(out) - expected).norm() / expected.norm()) <= 1e-5, shape


def test_softpool_runs_off_the_cpu_with_the_cpu_shapes() -> None:
    pool = SoftPool(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    x = torch.randn(2, 3, 9, 10)
    assert pool(x.to("meta")).shape == pool(x).shape
