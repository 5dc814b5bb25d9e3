"""HaarConv and haar_transform: the orthonormal transform, exact transfer from stride-2
convolutions (kernel 2 in the paper's 1×1 form, any kernel with the exact inner size, grouped
ones included) and average pools, approximate starts, config round trip and deployment."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from torch import Tensor, nn

from surgeon.layers import HaarConv, haar_transform, pool_arguments, space_to_depth
from surgeon.layers.haar import haar_matrix


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------- the transform


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_haar_matrix_is_symmetric_and_orthogonal(dims: int) -> None:
    h = haar_matrix(dims)
    assert torch.allclose(h, h.T)
    assert torch.allclose(h @ h, torch.eye(2**dims, dtype=torch.float64))


def test_haar_transform_gives_the_four_subbands_per_channel() -> None:
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]
    c, d = x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    bands = torch.stack([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], 2) / 2
    assert torch.allclose(haar_transform(x), bands.flatten(1, 2))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_haar_transform_is_the_haar_matrix_on_space_to_depth_phases(dims: int) -> None:
    x = torch.randn([2, 3] + [4] * dims, dtype=torch.float64)
    phases = space_to_depth(x, (2,) * dims).unflatten(1, (3, 2**dims))
    expected = torch.einsum("bp,ncp...->ncb...", haar_matrix(dims), phases).flatten(1, 2)
    out = haar_transform(x)
    assert torch.allclose(out, expected)
    assert torch.allclose(out.norm(), x.norm()), "the transform is not orthonormal"


# --------------------------------------------------------------------------- from convolutions


CONVS = {
    "k2 (paper)": lambda: nn.Conv2d(4, 6, 2, 2),
    "k2 grouped": lambda: nn.Conv2d(4, 6, 2, 2, groups=2),
    "k2 depthwise": lambda: nn.Conv2d(4, 4, 2, 2, groups=4, bias=False),
    "k3 p1": lambda: nn.Conv2d(4, 6, 3, 2, 1),
    "k3 p1 grouped": lambda: nn.Conv2d(4, 8, 3, 2, 1, groups=4),
    "k7 p3": lambda: nn.Conv2d(3, 5, 7, 2, 3),
    "k1": lambda: nn.Conv2d(4, 6, 1, 2),
    "k3 dilation 2": lambda: nn.Conv2d(4, 4, 3, 2, 2, dilation=2),
    "k (3, 2) valid": lambda: nn.Conv2d(4, 6, (3, 2), 2, padding="valid"),
    "1d k2": lambda: nn.Conv1d(4, 6, 2, 2),
    "1d k5 p2": lambda: nn.Conv1d(4, 6, 5, 2, 2),
    "3d k2 grouped": lambda: nn.Conv3d(4, 6, 2, 2, groups=2),
    "3d k3 p1": lambda: nn.Conv3d(2, 3, 3, 2, 1),
}


def conv_inputs(conv: nn.Module) -> list[Tensor]:
    dims = conv.weight.dim() - 2  # type: ignore[union-attr]
    shapes = {1: [(9,), (16,), (11,)], 2: [(9, 10), (16, 13), (7, 7)], 3: [(5, 6, 7), (4, 5, 4)]}
    channels = conv.in_channels  # type: ignore[union-attr]
    return [torch.randn(2, channels, *s) for s in shapes[dims]]


@pytest.mark.parametrize("name", CONVS)
def test_haar_is_exact_from_stride_two_convs_at_odd_and_even_sizes(name: str) -> None:
    conv = CONVS[name]()
    haar, transfer = HaarConv.from_conv(conv)
    assert transfer == "exact", name
    assert haar.conv.groups == conv.groups  # type: ignore[union-attr]
    for x in conv_inputs(conv):
        expected = conv(x)
        got = haar(x)
        assert got.shape == expected.shape, (name, tuple(x.shape))
        assert relative(got, expected) <= 1e-5, (name, tuple(x.shape))


def test_haar_from_a_kernel_two_conv_is_the_papers_one_by_one_form() -> None:
    haar, _ = HaarConv.from_conv(nn.Conv2d(8, 16, 2, 2, groups=2))
    assert haar.conv.kernel_size == (1, 1)
    assert haar.conv.in_channels == 32 and haar.conv.groups == 2


@pytest.mark.parametrize("kernel_size", [3, 5, (4, 2)])
def test_haar_with_a_larger_inner_kernel_stays_exact(kernel_size: int | tuple[int, int]) -> None:
    conv = nn.Conv2d(4, 6, 3, 2, 1)
    haar, transfer = HaarConv.from_conv(conv, kernel_size=kernel_size)
    assert transfer == "exact"
    for x in conv_inputs(conv):
        assert relative(haar(x), conv(x)) <= 1e-5, (kernel_size, tuple(x.shape))


def test_haar_with_a_smaller_inner_kernel_is_approximate_and_keeps_the_centre_block() -> None:
    conv = nn.Conv2d(4, 6, 3, 2, 1, bias=False)
    haar, transfer = HaarConv.from_conv(conv, kernel_size=1)
    assert transfer == "approximate"
    # the kept block holds taps {0, 1}^2 of the 3x3 kernel: zero the others and it is exact
    trimmed = nn.Conv2d(4, 6, 3, 2, 1, bias=False)
    with torch.no_grad():
        trimmed.weight.zero_()
        trimmed.weight[:, :, :2, :2] = conv.weight[:, :, :2, :2]
    for x in conv_inputs(conv):
        assert relative(haar(x), trimmed(x)) <= 1e-5, tuple(x.shape)


def test_haar_random_init_keeps_the_geometry() -> None:
    conv = nn.Conv2d(4, 6, 3, 2, 1)
    haar, transfer = HaarConv.from_conv(conv, init="random")
    assert transfer == "random"
    x = torch.randn(1, 4, 9, 10)
    assert haar(x).shape == conv(x).shape


def test_haar_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(ValueError, match="stride-2"):
        HaarConv.from_conv(nn.Conv2d(4, 6, 3, 3, 1))
    with pytest.raises(ValueError, match="stride-2"):
        HaarConv.from_conv(nn.Conv2d(4, 6, 3, (2, 1), 1))
    with pytest.raises(ValueError, match="padding_mode"):
        HaarConv.from_conv(nn.Conv2d(4, 6, 3, 2, 1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="init must be"):
        HaarConv.from_conv(nn.Conv2d(4, 6, 2, 2), init="zeros")
    timm = pytest.importorskip("timm.layers")
    with pytest.raises(ValueError, match="overrides forward"):
        HaarConv.from_conv(timm.create_conv2d(4, 6, 3, stride=2, padding="same"))


# --------------------------------------------------------------------------- from pools


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        (nn.AvgPool2d(2, 2), "exact"),
        (nn.AvgPool2d(3, 2, 1), "exact"),
        (nn.AvgPool2d(4, 2, 1, divisor_override=3), "exact"),
        (nn.AvgPool1d(2, 2), "exact"),
        (nn.AvgPool2d(3, 2, 1, count_include_pad=False), "approximate"),
        (nn.MaxPool2d(2, 2), "approximate"),
        (nn.MaxPool2d(3, 2, 1), "approximate"),
    ],
)
def test_haar_from_pools_follows_the_averaging_kernel(pool: nn.Module, expected: str) -> None:
    args = pool_arguments(pool)
    haar, transfer = HaarConv.from_pool(channels=3, **args)
    assert transfer == expected
    assert haar.conv.groups == 3 and haar.conv.bias is None
    dims = args["dims"]
    for size in [(9, 10), (12, 7)]:
        x = torch.randn(2, 3, *size[:dims])
        out = haar(x)
        assert out.shape == pool(x).shape
        if expected == "exact":
            assert relative(out, pool(x)) <= 1e-5, (pool, size)


def test_haar_from_a_two_by_two_average_pool_is_half_the_ll_band() -> None:
    haar, _ = HaarConv.from_pool("avg", 2, 2, 2, 2)
    weight = haar.conv.weight.detach().reshape(2, 4)
    assert torch.allclose(weight, torch.tensor([[0.5, 0.0, 0.0, 0.0]] * 2), atol=1e-7)


def test_haar_from_pool_refuses_other_strides_and_ceil_mode() -> None:
    with pytest.raises(ValueError, match="stride-2"):
        HaarConv.from_pool("max", 3, 2, 3, 3)
    with pytest.raises(ValueError, match="ceil_mode"):
        HaarConv.from_pool("max", 3, 2, 3, 2, 0, 1, True)
    with pytest.raises(ValueError, match="ceil_mode and 'same'"):
        HaarConv.from_pool("avg", 3, 2, 2, 2, "same")


# --------------------------------------------------------------------------- construction


def test_haar_config_round_trips_through_json() -> None:
    for conv, kernel_size in [
        (nn.Conv2d(4, 8, 3, 2, 1, groups=2), 1),
        (nn.Conv3d(2, 3, 2, 2), None),
    ]:
        haar, _ = HaarConv.from_conv(conv, kernel_size=kernel_size)
        config = json.loads(json.dumps(haar.config()))
        rebuilt = HaarConv(**config)
        assert rebuilt.config() == haar.config()
        rebuilt.load_state_dict(haar.state_dict())
        x = conv_inputs(conv)[0]
        assert torch.equal(rebuilt(x), haar(x))


# --------------------------------------------------------------------------- deployment


def test_haar_traces_and_scripts_with_dynamic_sizes() -> None:
    haar, _ = HaarConv.from_conv(nn.Conv2d(4, 6, 3, 2, 1, groups=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(haar, torch.randn(2, 4, 10, 10))
        scripted = torch.jit.script(haar)
    for shape in [(2, 4, 10, 10), (3, 4, 9, 13)]:
        x = torch.randn(shape)
        assert torch.allclose(traced(x), haar(x), atol=1e-6), shape
        assert torch.allclose(scripted(x), haar(x), atol=1e-6), shape


def test_haar_exports_with_torch_export_dynamic_shapes() -> None:
    haar, _ = HaarConv.from_conv(nn.Conv2d(4, 6, 3, 2, 1, groups=2))
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
    program = torch.export.export(haar, (torch.randn(2, 4, 10, 12),), dynamic_shapes={"x": dynamic})
    for shape in [(3, 4, 9, 13), (1, 4, 16, 7)]:
        x = torch.randn(shape)
        assert torch.allclose(program.module()(x), haar(x), atol=1e-6), shape


@pytest.mark.parametrize("name", ["k2 (paper)", "k3 p1 grouped", "k7 p3"])
def test_haar_exports_to_onnx_with_dynamic_axes(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    conv = CONVS[name]()
    haar, _ = HaarConv.from_conv(conv)
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            haar, (conv_inputs(conv)[0],), buffer, dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for x in conv_inputs(conv)[1:]:
        (out,) = session.run(None, {"x": x.numpy()})
        assert relative(torch.from_numpy(out), conv(x)) <= 1e-5, (name, tuple(x.shape))


def test_haar_runs_off_the_cpu_with_the_cpu_shapes() -> None:
    # built from a conv on the meta device (no data), the layer lands there too
    conv = nn.Conv2d(4, 6, 3, 2, 1)
    x = torch.randn(2, 4, 9, 10)
    expected = conv(x).shape
    haar, _ = HaarConv.from_conv(conv.to("meta"))
    assert haar.conv.weight.device.type == "meta"
    assert haar(x.to("meta")).shape == expected
