"""BlurPool and binomial_filter: filter values, output sizes (ceil_mode sources included),
equality with pad-then-filter, tiny-map fallback, and deployment."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from surgeon.arithmetic import pool_output_size
from surgeon.layers import PAD_MODES, BlurPool, binomial_filter

FAST = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
LAYOUTS = {2: torch.channels_last, 3: torch.channels_last_3d}


def straightforward(blur: BlurPool, x: torch.Tensor) -> torch.Tensor:
    """The definition: pad every dim [(f-1)//2, what the output size needs], then a strided
    depthwise convolution; reflect falls back to replicate when it cannot reach."""
    f = blur.filter_size
    left = (f - 1) // 2
    pads = []
    for i, size in enumerate(x.shape[2:]):
        length = blur._length(size, i)
        pads.append((left, (length - 1) * blur.stride[i] + f - size - left))
    mode = blur.pad_mode
    if mode == "reflect" and any(
        lr[0] >= size or lr[1] >= size for lr, size in zip(pads, x.shape[2:], strict=True)
    ):
        mode = "replicate"
    for i, (_, right) in enumerate(pads):
        if right < 0:
            x = x.narrow(2 + i, 0, x.shape[2 + i] + right)
    flat = [p for lr in reversed(pads) for p in (lr[0], max(lr[1], 0))]
    x = F.pad(x, flat) if mode == "zero" else F.pad(x, flat, mode=mode)
    weight = (
        binomial_filter(f, blur.dims)
        .to(x.dtype)[None, None]
        .repeat(blur.channels, *[1] * (blur.dims + 1))
    )
    return CONVS[blur.dims](x, weight, stride=blur.stride, groups=blur.channels)


# --------------------------------------------------------------------------- the filter


def test_binomial_filter_rows_are_pascals_triangle() -> None:
    rows = [
        [1],
        [1, 1],
        [1, 2, 1],
        [1, 3, 3, 1],
        [1, 4, 6, 4, 1],
        [1, 5, 10, 10, 5, 1],
        [1, 6, 15, 20, 15, 6, 1],
    ]
    for size, row in enumerate(rows, start=1):
        expected = torch.tensor(row, dtype=torch.float32) / sum(row)
        assert torch.allclose(binomial_filter(size, 1), expected), size


def test_binomial_filter_is_the_normalised_outer_product() -> None:
    row = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(binomial_filter(4, 2), torch.outer(row, row) / 64)
    cube = binomial_filter(3, 3)
    assert cube.shape == (3, 3, 3)
    assert cube[1, 1, 1] == pytest.approx(8 / 64)
    for size in range(1, 8):
        assert binomial_filter(size, 2).sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(("size", "dims"), [(0, 2), (8, 2), (3, 0), (3, 4)])
def test_binomial_filter_rejects_unsupported_sizes(size: int, dims: int) -> None:
    with pytest.raises(ValueError):
        binomial_filter(size, dims)


# --------------------------------------------------------------------------- output sizes


@FAST
@given(
    dims=st.integers(1, 3),
    filter_size=st.integers(1, 7),
    stride=st.integers(2, 4),
    pad_mode=st.sampled_from(PAD_MODES),
    length=st.integers(1, 17),
)
def test_blurpool_output_length_is_ceil_of_length_over_stride(
    dims: int, filter_size: int, stride: int, pad_mode: str, length: int
) -> None:
    blur = BlurPool(2, dims=dims, filter_size=filter_size, stride=stride, pad_mode=pad_mode)
    sizes = [length, length + 1, length + 2][:dims]
    out = blur(torch.randn(1, 2, *sizes))
    assert tuple(out.shape[2:]) == tuple(-(-s // stride) for s in sizes)


@FAST
@given(
    kernel=st.integers(1, 5),
    stride=st.integers(2, 4),
    dilation=st.integers(1, 2),
    data=st.data(),
    height=st.integers(1, 24),
    op=st.sampled_from(["conv", "max_pool"]),
)
def test_ceil_of_stride_one_length_is_the_strided_op_length(
    kernel: int, stride: int, dilation: int, data: st.DataObject, height: int, op: str
) -> None:
    # the claim BlurPool's placement rests on: op(stride=s) == op(stride=1) then ceil(L / s)
    effective = dilation * (kernel - 1) + 1
    padding = data.draw(
        st.integers(0, kernel // 2 if op == "max_pool" else kernel), label="padding"
    )
    if height + 2 * padding < effective:
        return
    x = torch.randn(1, 2, height, height + 3)
    if op == "conv":
        strided: nn.Module = nn.Conv2d(2, 2, kernel, stride, padding, dilation)
        dense: nn.Module = nn.Conv2d(2, 2, kernel, 1, padding, dilation)
    else:
        strided = nn.MaxPool2d(kernel, stride, padding, dilation)
        dense = nn.MaxPool2d(kernel, 1, padding, dilation)
    blur = BlurPool(2, filter_size=4, stride=stride)
    assert blur(dense(x)).shape == strided(x).shape


@FAST
@given(
    kernel=st.integers(1, 5),
    stride=st.integers(2, 4),
    dilation=st.integers(1, 2),
    data=st.data(),
    height=st.integers(1, 24),
    filter_size=st.integers(1, 7),
    pad_mode=st.sampled_from(PAD_MODES),
)
def test_blurpool_with_ceil_source_matches_ceil_mode_pool_size(
    kernel: int,
    stride: int,
    dilation: int,
    data: st.DataObject,
    height: int,
    filter_size: int,
    pad_mode: str,
) -> None:
    effective = dilation * (kernel - 1) + 1
    padding = data.draw(st.integers(0, kernel // 2), label="padding")  # PyTorch's own limit
    if height + 2 * padding < effective:
        return
    x = torch.randn(1, 2, height, height + 1)
    strided = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=True)
    dense = nn.MaxPool2d(kernel, 1, padding, dilation)
    blur = BlurPool(
        2,
        filter_size=filter_size,
        stride=stride,
        pad_mode=pad_mode,
        ceil_source=(kernel, padding, dilation),
    )
    dense_out = dense(x)
    out = blur(dense_out)
    assert out.shape == strided(x).shape
    assert out.shape[2] == pool_output_size(
        height, kernel, stride, padding, dilation, ceil_mode=True
    )
    assert torch.allclose(out, straightforward(blur, dense_out), atol=1e-6)


# --------------------------------------------------------------------------- values


@settings(
    max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    dims=st.integers(1, 3),
    filter_size=st.integers(1, 7),
    stride=st.integers(2, 3),
    pad_mode=st.sampled_from(PAD_MODES),
    lengths=st.lists(st.integers(1, 19), min_size=3, max_size=3),
    channels_last=st.booleans(),
    ceil_source=st.sampled_from([None, (2, 0, 1), (3, 1, 1), (3, 1, 2)]),
)
def test_blurpool_equals_pad_then_depthwise_filter(
    dims: int,
    filter_size: int,
    stride: int,
    pad_mode: str,
    lengths: list[int],
    channels_last: bool,
    ceil_source: tuple[int, int, int] | None,
) -> None:
    sizes = [min(n, 9) if dims == 3 else n for n in lengths[:dims]]
    x = torch.randn(2, 3, *sizes, generator=torch.Generator().manual_seed(sum(sizes)))
    if channels_last and dims > 1:
        x = x.contiguous(memory_format=LAYOUTS[dims])
    blur = BlurPool(
        3,
        dims=dims,
        filter_size=filter_size,
        stride=stride,
        pad_mode=pad_mode,
        ceil_source=ceil_source,
    )
    expected = straightforward(blur, x)
    out = blur(x)  # small inputs: pad, then filter
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-6), f"{blur} on {tuple(x.shape)}"
    # the large-input path (zero-padded conv + border corrections), forced on small maps
    blur.border_min_numel = blur.border_min_size = 0
    blur.border_any_layout = True
    out = blur(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-6), f"{blur} on {tuple(x.shape)}, borders"


def test_blurpool_matches_zhang_filter_4_reflect_on_even_maps() -> None:
    # antialiased-cnns' layer: reflect pad (1, 2) per dim, 4x4 binomial, stride 2
    x = torch.randn(2, 4, 16, 12)
    weight = (torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64).repeat(
        4, 1, 1, 1
    )
    expected = F.conv2d(F.pad(x, (1, 2, 1, 2), mode="reflect"), weight, stride=2, groups=4)
    assert torch.allclose(BlurPool(4)(x), expected, atol=1e-6)


def test_blurpool_filter_size_one_is_plain_subsampling() -> None:
    x = torch.randn(1, 3, 9, 10)
    assert torch.equal(BlurPool(3, filter_size=1, stride=3)(x), x[:, :, ::3, ::3])


@pytest.mark.parametrize(("size", "filter_size"), [(1, 3), (1, 5), (2, 4), (2, 7), (3, 7)])
def test_blurpool_tiny_maps_fall_back_to_replicate_instead_of_failing(
    size: int, filter_size: int
) -> None:
    x = torch.randn(1, 2, size, size)
    reflect = BlurPool(2, filter_size=filter_size, pad_mode="reflect")
    out = reflect(x)
    assert out.shape[2:] == ((size + 1) // 2,) * 2
    left = (filter_size - 1) // 2
    right = ((size + 1) // 2 - 1) * 2 + filter_size - size - left
    if left >= size or right >= size:  # reflect cannot reach: replicate for this call
        replicate = BlurPool(2, filter_size=filter_size, pad_mode="replicate")
        assert torch.allclose(out, replicate(x))
    else:
        assert torch.allclose(out, straightforward(reflect, x))


def test_blurpool_reflect_on_two_by_two_maps_uses_only_the_padding_it_reads() -> None:
    # antialiased-cnns pads (1, 2) and fails on 2x2 maps; the second right row is never read
    x = torch.randn(1, 2, 2, 2)
    out = BlurPool(2, filter_size=4)(x)
    weight = (torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64).repeat(
        2, 1, 1, 1
    )
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, stride=2, groups=2)
    assert torch.allclose(out, expected)


def test_blurpool_has_no_parameters_and_keeps_its_filter_out_of_the_state_dict() -> None:
    blur = BlurPool(8, filter_size=5)
    assert list(blur.parameters()) == []
    assert blur.state_dict() == {}
    assert blur.filter.shape == (8, 1, 5, 5)
    assert "filter" in dict(blur.named_buffers())


def test_blurpool_filter_follows_module_and_input_dtype() -> None:
    blur = BlurPool(3).double()
    assert blur.filter.dtype == torch.float64
    out = BlurPool(3)(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("dims", [1, 3])
def test_blurpool_works_in_1d_and_3d(dims: int) -> None:
    blur = BlurPool(2, dims=dims, filter_size=3, stride=2)
    x = torch.randn(2, 2, *(7, 8, 9)[:dims])
    out = blur(x)
    assert out.shape[2:] == (4, 4, 5)[:dims]
    assert torch.allclose(out, straightforward(blur, x), atol=1e-6)


@pytest.mark.parametrize("threshold", [0, 1 << 20])
def test_blurpool_keeps_channels_last_layout(threshold: int) -> None:
    blur = BlurPool(8)  # threshold 0: the large-input path
    blur.border_min_numel = blur.border_min_size = threshold
    for size in (13, 12):
        x = torch.randn(2, 8, size, 12).contiguous(memory_format=torch.channels_last)
        assert blur(x).is_contiguous(memory_format=torch.channels_last), size


def test_blurpool_backpropagates_through_the_border_corrections() -> None:
    blur = BlurPool(1, filter_size=3).double()
    blur.border_min_numel = blur.border_min_size = 0
    blur.border_any_layout = True
    x = torch.randn(1, 1, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blur, (x,), fast_mode=True)


@pytest.mark.parametrize(
    ("layout", "corrected"),
    [(torch.channels_last, True), (torch.contiguous_format, False)],
)
def test_blurpool_corrects_borders_only_on_large_channels_last_inputs(
    monkeypatch: pytest.MonkeyPatch, layout: torch.memory_format, corrected: bool
) -> None:
    calls: list[int] = []
    original = BlurPool._add_border

    def spy(self: BlurPool, *args: object) -> None:
        calls.append(1)
        original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(BlurPool, "_add_border", spy)
    blur = BlurPool(64)
    x = torch.randn(1, 64, 128, 128).contiguous(memory_format=layout)  # 2^20 elements
    expected = straightforward(blur, x)
    assert torch.allclose(blur(x), expected, atol=1e-6)
    assert bool(calls) is corrected
    calls.clear()
    assert torch.allclose(blur(x[:, :, :64]), straightforward(blur, x[:, :, :64]), atol=1e-6)
    assert not calls  # half the elements: pad then filter


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pad_mode": "circular"}, "pad_mode"),
        ({"filter_size": 8}, "filter size"),
        ({"dims": 4}, "dims"),
        ({"stride": (2, 2, 2)}, "entries"),
    ],
)
def test_blurpool_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlurPool(3, **kwargs)


# --------------------------------------------------------------------------- deployment

# (2, 8, 3, 4) with filter 7 and (1, 1) with filter 3 or 4 need the replicate fallback
DEPLOY_SIZES = [(2, 8, 9, 11), (1, 8, 12, 13), (3, 8, 5, 6), (2, 8, 3, 4)]
TINY_SIZES = [(2, 8, 2, 3), (2, 8, 1, 1)]


def deploy_blurs() -> dict[str, BlurPool]:
    return {
        "reflect": BlurPool(8, filter_size=4),
        "replicate-3": BlurPool(8, filter_size=3, pad_mode="replicate"),
        "zero-5": BlurPool(8, filter_size=5, pad_mode="zero"),
        "ceil": BlurPool(8, filter_size=3, ceil_source=(3, 1, 1)),
        "reflect-7": BlurPool(8, filter_size=7),
        "reflect pad": BlurPool(8, filter_size=4, export_form="pad"),
        "reflect-7 separable": BlurPool(8, filter_size=7, export_form="separable"),
        "ceil pad": BlurPool(8, filter_size=3, ceil_source=(3, 1, 1), export_form="pad"),
        "replicate-3 separable": BlurPool(
            8, filter_size=3, pad_mode="replicate", export_form="separable"
        ),
        "zero-4 conv": BlurPool(8, filter_size=4, pad_mode="zero", export_form="conv"),
        "zero-5 conv": BlurPool(8, filter_size=5, pad_mode="zero", export_form="conv"),
    }


@pytest.mark.parametrize("name", list(deploy_blurs()))
def test_blurpool_scripted_matches_eager_including_tiny_maps(name: str) -> None:
    blur = deploy_blurs()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(blur)
    for shape in (DEPLOY_SIZES + TINY_SIZES) * 2:
        x = torch.randn(shape)
        assert torch.allclose(scripted(x), blur(x), atol=1e-6), (name, shape)


@pytest.mark.parametrize("name", list(deploy_blurs()))
def test_blurpool_trace_keeps_sizes_dynamic_including_tiny_maps(name: str) -> None:
    blur = deploy_blurs()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(blur, torch.randn(DEPLOY_SIZES[0]))
    for shape in DEPLOY_SIZES + TINY_SIZES:
        x = torch.randn(shape)
        assert torch.allclose(traced(x), blur(x), atol=1e-6), (name, shape)


@pytest.mark.parametrize("name", list(deploy_blurs()))
def test_blurpool_exports_with_dynamic_batch_and_spatial_dims(name: str) -> None:
    blur = deploy_blurs()[name]
    # an output length that may be 1 makes torch.export guard on it (a contiguity check in
    # torch's tensor metadata), so the exported range starts at 3: ceil(3 / 2) = 2
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2: torch.export.Dim("h", min=3, max=512), 3: torch.export.Dim("w", min=3, max=512)}
    program = torch.export.export(
        blur, (torch.randn(DEPLOY_SIZES[0]),), dynamic_shapes={"x": dynamic}
    )
    for shape in DEPLOY_SIZES:
        x = torch.randn(shape)
        assert torch.allclose(program.module()(x), blur(x), atol=1e-6), (name, shape)


@pytest.mark.parametrize("filter_size", [4, 7])
def test_blurpool_exports_to_onnx_with_dynamic_axes(filter_size: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    blur = BlurPool(8, filter_size=filter_size)
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter; the dynamo one needs onnxscript, not a dependency here
        torch.onnx.export(
            blur, (torch.randn(DEPLOY_SIZES[0]),), buffer, dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in DEPLOY_SIZES + TINY_SIZES:
        x = torch.randn(shape)
        (out,) = session.run(None, {"x": x.numpy()})
        assert torch.allclose(torch.from_numpy(out), blur(x), atol=1e-5), shape


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_blurpool_off_the_cpu_gives_the_cpu_shape(
    pad_mode: str, memory_format: torch.memory_format
) -> None:
    # GPUs run pad + convolution directly; the meta device runs that path without one
    blur = BlurPool(4, pad_mode=pad_mode, ceil_source=(3, 1, 1))
    x = torch.randn(2, 4, 13, 16).contiguous(memory_format=memory_format)
    expected = blur(x)
    assert blur.to("meta")(x.to("meta")).shape == expected.shape
