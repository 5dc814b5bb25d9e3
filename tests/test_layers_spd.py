"""SpaceToDepthConv and space_to_depth: exact permutation, exact weight transfer, output sizes,
and deployment (TorchScript, tracing, torch.export, ONNX)."""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from timm.layers import AvgPool2dSame, Conv2dSame
from timm.layers.pool2d_same import MaxPool2dSame
from torch import nn

from surgeon.arithmetic import pool_output_size, same_padding
from surgeon.layers import SpaceToDepthConv, pad_space_to_depth, pool_arguments, space_to_depth
from surgeon.layers.shapes import output_length, same_total

FAST = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
LAYOUTS = {2: torch.channels_last, 3: torch.channels_last_3d}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def original_output(op: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The op's output; an input size the op itself refuses is no example."""
    try:
        return op(x)
    except RuntimeError:
        reject()
        raise


def conv_type(dims: int) -> type[nn.Module]:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]


def maybe_channels_last(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=LAYOUTS[x.dim() - 2]) if channels_last and x.dim() > 3 else x


# --------------------------------------------------------------------------- space_to_depth


def explicit_space_to_depth(
    x: torch.Tensor, block: tuple[int, ...], order: str = "channel"
) -> torch.Tensor:
    """out[n, c * P + offset, *i] = x[n, c, *(i * block + phase)] (order "channel"), or
    out[n, offset * C + c, *i] (order "phase"), written as index arithmetic."""
    n, c = x.shape[:2]
    reduced = [size // b for size, b in zip(x.shape[2:], block, strict=True)]
    phases = list(itertools.product(*(range(b) for b in block)))
    out = x.new_empty((n, c * len(phases), *reduced))
    for offset, phase in enumerate(phases):
        index = tuple(slice(r, None, b) for r, b in zip(phase, block, strict=True))
        where = (
            slice(offset, None, len(phases))
            if order == "channel"
            else slice(offset * c, (offset + 1) * c)
        )
        out[:, where] = x[(slice(None), slice(None), *index)]
    return out


def test_space_to_depth_uses_pixel_unshuffle_channel_order() -> None:
    x = torch.randn(2, 5, 6, 8)
    assert torch.equal(space_to_depth(x, (2, 2)), F.pixel_unshuffle(x, 2))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(space_to_depth(x_cl, (2, 2)), F.pixel_unshuffle(x, 2))


@FAST
@given(
    dims=st.integers(1, 3),
    data=st.data(),
    channels=st.integers(1, 12),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int32]),
    order=st.sampled_from(["channel", "phase"]),
)
def test_space_to_depth_is_the_permutation_of_its_order(
    dims: int,
    data: st.DataObject,
    channels: int,
    channels_last: bool,
    dtype: torch.dtype,
    order: str,
) -> None:
    block = tuple(
        data.draw(st.lists(st.integers(1, 4), min_size=dims, max_size=dims), label="block")
    )
    reduced = data.draw(st.lists(st.integers(1, 4), min_size=dims, max_size=dims), label="reduced")
    x = torch.randint(
        -1000, 1000, (2, channels, *(r * b for r, b in zip(reduced, block, strict=True)))
    ).to(dtype)
    x = maybe_channels_last(x, channels_last)
    out = space_to_depth(x, block, order)
    assert torch.equal(out, explicit_space_to_depth(x, block, order)), (
        f"block {block} on {tuple(x.shape)} {dtype} {order}"
    )


def test_space_to_depth_output_layout_follows_input() -> None:
    x = torch.randn(2, 4, 8, 6)
    assert space_to_depth(x, (2, 2)).is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert space_to_depth(x_cl, (2, 2)).is_contiguous(memory_format=torch.channels_last)
    x_3d = torch.randn(1, 3, 4, 4, 6).contiguous(memory_format=torch.channels_last_3d)
    assert space_to_depth(x_3d, (2, 2, 3)).is_contiguous(memory_format=torch.channels_last_3d)


def test_space_to_depth_moves_bits_untouched_in_channels_last() -> None:
    # the channels-last fast path writes float pairs as complex numbers: NaN payloads,
    # signalling NaNs, infinities and denormals must come out bit for bit
    generator = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (2, 6, 4, 4), dtype=torch.int32, generator=generator)
    bits[0, 0, 0, :] = torch.tensor(
        [0x7F800001, 0x7FC00000, 0x7F800000, 0x00000001], dtype=torch.int32
    )
    x = bits.view(torch.float32).contiguous(memory_format=torch.channels_last)
    out = space_to_depth(x, (2, 2))
    expected = F.pixel_unshuffle(bits, 2)
    assert torch.equal(out.contiguous().view(torch.int32), expected)


def test_space_to_depth_backpropagates_in_both_layouts() -> None:
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 3, 4, 6).contiguous(memory_format=memory_format).requires_grad_()
        weights = torch.randn(1, 12, 2, 3)
        (space_to_depth(x, (2, 2)) * weights).sum().backward()
        assert x.grad is not None
        assert torch.equal(x.grad, F.pixel_shuffle(weights, 2).expand_as(x)), memory_format


def test_phase_major_is_slicing_and_cat_in_both_layouts() -> None:
    # SPD-Conv's reference is phase-major too (its phases in another order)
    x = torch.randn(2, 16, 6, 8)
    slices = [x[..., a::2, b::2] for a in range(2) for b in range(2)]
    for memory_format in (torch.contiguous_format, torch.channels_last):
        out = space_to_depth(x.contiguous(memory_format=memory_format), (2, 2), "phase")
        assert torch.equal(out, torch.cat(slices, 1)), memory_format
        assert out.is_contiguous(memory_format=memory_format)


def test_spd_conv_is_phase_major_for_dense_convs_and_channel_major_for_grouped() -> None:
    dense, _ = SpaceToDepthConv.from_conv(nn.Conv2d(16, 8, 3, 2, 1))
    depthwise, _ = SpaceToDepthConv.from_conv(nn.Conv2d(16, 16, 3, 2, 1, groups=16))
    pool, _ = SpaceToDepthConv.from_pool("avg", 16, 2, 3, 2, 1)
    assert dense.phase_major and not depthwise.phase_major and not pool.phase_major
    x = torch.randn(2, 16, 13, 10)
    conv = nn.Conv2d(16, 8, 3, 2, 1)
    spd, _ = SpaceToDepthConv.from_conv(conv)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        got = spd(x.contiguous(memory_format=memory_format))
        assert torch.allclose(got, conv(x), atol=1e-5, rtol=1e-5), memory_format
    with pytest.raises(ValueError, match="order='phase' needs groups=1"):
        SpaceToDepthConv(
            4, 4, dims=2, block=(2, 2), kernel_size=(2, 2), op_kernel=(3, 3),
            op_stride=(2, 2), groups=2, order="phase",
        )  # fmt: skip


def test_space_to_depth_rejects_sizes_not_divisible_by_block() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        space_to_depth(torch.randn(1, 2, 5, 4), (2, 2))
    with pytest.raises(ValueError, match="spatial dims"):
        space_to_depth(torch.randn(1, 2, 4, 4), (2,))


# --------------------------------------------------------------------------- shape arithmetic


def test_branch_free_output_length_matches_pool_output_size() -> None:
    # forward uses a comparison-free form of surgeon.arithmetic so exports stay symbolic
    for kernel, stride, dilation in itertools.product(range(1, 6), range(1, 5), range(1, 3)):
        effective = dilation * (kernel - 1) + 1
        for padding in range(effective // 2 + 1):
            for size in range(max(1, effective - 2 * padding), 40):
                for ceil_mode in (False, True):
                    expected = pool_output_size(size, kernel, stride, padding, dilation, ceil_mode)
                    got = output_length(size, kernel, stride, padding, dilation, ceil_mode)
                    assert got == expected, (size, kernel, stride, padding, dilation, ceil_mode)
        for size in range(1, 40):
            assert same_total(size, kernel, stride, dilation) == sum(
                same_padding(size, kernel, stride, dilation)
            )


# --------------------------------------------------------------------------- conv transfer


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    dims = draw(st.integers(1, 3), label="dims")
    max_kernel = 7 if dims < 3 else 3
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(dims))
    stride = tuple(draw(st.integers(2, 4)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, k)) for k in kernel)
    groups_kind = draw(st.sampled_from(["single", "depthwise", "two"]))
    channels = draw(st.sampled_from([2, 4, 6, 10]))  # 10: wide enough for the space-to-depth path
    groups = {"single": 1, "depthwise": channels, "two": 2}[groups_kind]
    out_channels = channels if groups_kind == "depthwise" else draw(st.sampled_from([2, 4, 8]))
    bias = draw(st.booleans())
    max_size = 19 if dims < 3 else 9
    sizes = []
    for k, p, d in zip(kernel, padding, dilation, strict=True):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        sizes.append(draw(st.integers(smallest, max(smallest, max_size)), label="size"))
    conv = conv_type(dims)(channels, out_channels, kernel, stride, padding, dilation, groups, bias)
    x = torch.randn(
        draw(st.integers(1, 2)),
        channels,
        *sizes,
        generator=torch.Generator().manual_seed(len(sizes)),
    )
    return conv, maybe_channels_last(x, draw(st.booleans(), label="channels_last"))


@settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(case=conv_cases())
def test_spd_transfer_is_exact_for_any_strided_conv(case: tuple[nn.Module, torch.Tensor]) -> None:
    conv, x = case
    spd, verdict = SpaceToDepthConv.from_conv(conv)
    assert verdict == "exact"
    expected = conv(x)
    out = spd(x)
    assert out.shape == expected.shape, f"{conv} on {tuple(x.shape)}"
    assert relative_error(out, expected) <= 1e-5, f"{conv} on {tuple(x.shape)}"


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(case=conv_cases(), seed=st.integers(0, 3))
def test_grouped_and_narrow_spd_conv_runs_as_one_strided_conv_with_the_same_results(
    case: tuple[nn.Module, torch.Tensor], seed: int
) -> None:
    # eager grouped and narrow layers take the strided form; scripting keeps space-to-depth
    conv, x = case
    spd, _ = SpaceToDepthConv.from_conv(conv)
    assume(spd.eager_strided)
    torch.manual_seed(seed)
    with torch.no_grad():  # dense weights, as after fine-tuning: no zero taps to hide behind
        spd.conv.weight.copy_(torch.randn_like(spd.conv.weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(spd)
    results = []
    for module in (spd, scripted):
        inp = x.clone().requires_grad_(True)
        out = module(inp)
        grad_w, grad_x = torch.autograd.grad((out * out.detach()).sum(), (spd.conv.weight, inp))
        results.append((out, grad_w, grad_x))
    (out, grad_w, grad_x), (ref, ref_w, ref_x) = results
    assert out.shape == ref.shape
    for got, expected in ((out, ref), (grad_w, ref_w), (grad_x, ref_x)):
        assert relative_error(got, expected) <= 1e-5, f"{conv} on {tuple(x.shape)}"


def test_spd_transfer_is_exact_for_odd_sizes() -> None:
    # ResNet's stem on an odd image: the reference SPD-Conv code crashes here, we pad
    conv = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    spd, verdict = SpaceToDepthConv.from_conv(conv)
    for size in (223, 225, 97):
        x = torch.randn(1, 3, size, size + 2)
        assert verdict == "exact"
        assert relative_error(spd(x), conv(x)) <= 1e-5, size


@FAST
@given(
    kernel=st.integers(1, 7),
    stride=st.integers(2, 4),
    dilation=st.integers(1, 3),
    height=st.integers(1, 19),
    width=st.integers(1, 19),
    channels_last=st.booleans(),
)
def test_spd_transfer_is_exact_for_timm_conv2d_same(
    kernel: int, stride: int, dilation: int, height: int, width: int, channels_last: bool
) -> None:
    conv = Conv2dSame(4, 6, kernel, stride, dilation=dilation)
    spd, verdict = SpaceToDepthConv.from_conv(conv)
    x = maybe_channels_last(torch.randn(2, 4, height, width), channels_last)
    expected = conv(x)
    assert verdict == "exact"
    assert spd(x).shape == expected.shape
    assert relative_error(spd(x), expected) <= 1e-5, (kernel, stride, dilation, height, width)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_spd_transfer_keeps_groups_for_grouped_and_depthwise_convs(groups: int) -> None:
    conv = nn.Conv2d(8, 8, 3, 2, 1, groups=groups)
    spd, _ = SpaceToDepthConv.from_conv(conv)
    assert spd.conv.groups == groups
    assert spd.conv.in_channels == 32
    x = torch.randn(2, 8, 11, 10)
    assert relative_error(spd(x), conv(x)) <= 1e-5


@pytest.mark.parametrize("kernel_size", [2, 3, 4, 5, (3, 2)])
def test_spd_larger_inner_kernel_still_transfers_exactly(
    kernel_size: int | tuple[int, int],
) -> None:
    conv = nn.Conv2d(3, 4, 3, 2, 1)  # exact inner size is 2
    spd, verdict = SpaceToDepthConv.from_conv(conv, kernel_size=kernel_size)
    x = torch.randn(1, 3, 13, 12)
    assert verdict == "exact"
    assert relative_error(spd(x), conv(x)) <= 1e-5, kernel_size


def test_spd_inner_kernel_too_small_for_exact_transfer_raises() -> None:
    with pytest.raises(ValueError, match=r"exact transfer needs \(3, 3\) taps"):
        SpaceToDepthConv.from_conv(nn.Conv2d(3, 4, 5, 2, 2), kernel_size=2)


@FAST
@given(kernel_size=st.integers(1, 5), height=st.integers(1, 19), width=st.integers(1, 19))
def test_spd_paper_form_with_random_init_keeps_output_size(
    kernel_size: int, height: int, width: int
) -> None:
    conv = nn.Conv2d(3, 5, 3, 2, 1)
    spd, verdict = SpaceToDepthConv.from_conv(conv, kernel_size=kernel_size, init="random")
    assert verdict == "random"
    assert not spd.keep_op_padding
    x = torch.randn(1, 3, height, width)
    assert spd(x).shape == conv(x).shape


def test_spd_paper_form_pads_even_inputs_symmetrically() -> None:
    # SPD then a 3x3 "same" conv: for even sizes the only padding is the conv's one block
    spd, _ = SpaceToDepthConv.from_conv(nn.Conv2d(3, 5, 3, 2, 1), kernel_size=3, init="random")
    x = torch.randn(1, 3, 8, 8)
    manual = spd.conv(F.pad(space_to_depth(x, (2, 2), order="phase"), (1, 1, 1, 1)))
    # a 3-channel input runs as one strided conv in eager mode: the same sums, reordered
    assert torch.allclose(spd(x), manual, atol=1e-6)


def test_spd_state_dict_is_conv_weight_and_bias() -> None:
    spd, _ = SpaceToDepthConv.from_conv(nn.Conv2d(3, 4, 3, 2, 1))
    assert list(spd.state_dict()) == ["conv.weight", "conv.bias"]
    assert tuple(spd.conv.weight.shape) == (4, 12, 2, 2)


def test_spd_copies_the_original_bias() -> None:
    conv = nn.Conv2d(3, 4, 3, 2, 1)
    spd, _ = SpaceToDepthConv.from_conv(conv)
    assert spd.conv.bias is not None and conv.bias is not None
    assert torch.equal(spd.conv.bias, conv.bias)


class StandardisedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean()) / self.weight.std()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (nn.Conv2d(3, 4, 3, 2, 1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(3, 4, 3, 1, 1), "stride must be > 1"),
        (StandardisedConv(3, 4, 3, 2, 1), "overrides Conv2d.forward"),
        (nn.ConvTranspose2d(3, 4, 3, 2), "not an nn.Conv1d/2d/3d"),
    ],
)
def test_spd_from_conv_refuses_what_it_cannot_transfer(conv: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpaceToDepthConv.from_conv(conv)


def test_spd_unknown_init_raises() -> None:
    with pytest.raises(ValueError, match="init must be one of"):
        SpaceToDepthConv.from_conv(nn.Conv2d(3, 4, 3, 2, 1), init="zeros")


# --------------------------------------------------------------------------- pooling


@st.composite
def pool_cases(
    draw: st.DrawFn, kind: str, linear_only: bool = False
) -> tuple[nn.Module, dict, torch.Tensor]:
    dims = draw(st.integers(1, 3), label="dims")
    kernel = draw(st.integers(1, 4 if dims == 3 else 5))
    stride = draw(st.integers(2, 4))
    dilation = draw(st.integers(1, 2)) if kind == "max" else 1
    effective = dilation * (kernel - 1) + 1
    padding = draw(st.integers(0, kernel // 2))  # PyTorch's own limit
    ceil_mode = False if linear_only else draw(st.booleans())
    count_include_pad = True if linear_only else draw(st.booleans())
    if kind == "max":
        pool: nn.Module = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dims - 1](
            kernel, stride, padding, dilation, ceil_mode=ceil_mode
        )
    else:
        pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](
            kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad
        )
    smallest = max(1, effective - 2 * padding)
    sizes = [draw(st.integers(smallest, smallest + (8 if dims == 3 else 16))) for _ in range(dims)]
    x = torch.randn(2, 3, *sizes, generator=torch.Generator().manual_seed(sum(sizes)))
    return pool, pool_arguments(pool), maybe_channels_last(x, draw(st.booleans()))


@FAST
@given(case=pool_cases("avg", linear_only=True))
def test_avg_pool_transfer_is_exact_where_it_is_linear(
    case: tuple[nn.Module, dict, torch.Tensor],
) -> None:
    pool, arguments, x = case
    expected = original_output(pool, x)
    spd, verdict = SpaceToDepthConv.from_pool(channels=3, **arguments)
    assert verdict == "exact"
    assert relative_error(spd(x), expected) <= 1e-5, f"{pool} on {tuple(x.shape)}"


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(3, 2, 1, ceil_mode=True),
        nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
    ],
)
def test_avg_pool_transfer_is_approximate_where_the_divisor_varies(pool: nn.Module) -> None:
    spd, verdict = SpaceToDepthConv.from_pool(channels=3, **pool_arguments(pool))
    assert verdict == "approximate"
    x = torch.rand(1, 3, 10, 9) + 1  # both sizes leave a ceil-mode window hanging over
    assert spd(x).shape == pool(x).shape
    assert relative_error(spd(x), pool(x)) > 1e-3  # the border windows really differ


def test_avg_pool_with_divisor_override_transfers_exactly() -> None:
    # sum / D for every window is a fixed linear map, ceil-mode overhangs included
    pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=5)
    spd, verdict = SpaceToDepthConv.from_pool(channels=3, **pool_arguments(pool))
    assert verdict == "exact"
    for size in (8, 9, 10):
        x = torch.randn(1, 3, size, size + 1)
        assert relative_error(spd(x), pool(x)) <= 1e-5, size


@FAST
@given(case=pool_cases("max"))
def test_max_pool_transfer_is_approximate_but_shape_correct(
    case: tuple[nn.Module, dict, torch.Tensor],
) -> None:
    pool, arguments, x = case
    expected = original_output(pool, x)
    spd, verdict = SpaceToDepthConv.from_pool(channels=3, **arguments)
    assert verdict == "approximate"
    assert spd(x).shape == expected.shape, f"{pool} on {tuple(x.shape)}"


def test_max_pool_transfer_starts_from_the_window_average() -> None:
    pool = nn.MaxPool2d(2, 2)
    spd, _ = SpaceToDepthConv.from_pool(channels=3, **pool_arguments(pool))
    x = torch.randn(1, 3, 6, 8)
    assert torch.allclose(spd(x), F.avg_pool2d(x, 2, 2), atol=1e-6)


@FAST
@given(case=pool_cases("avg"), init=st.sampled_from(["transfer", "random"]))
def test_pool_replacement_output_shape_matches_for_every_accepted_size(
    case: tuple[nn.Module, dict, torch.Tensor], init: str
) -> None:
    pool, arguments, x = case
    expected = original_output(pool, x)
    kernel_size = 3 if init == "random" else None
    spd, verdict = SpaceToDepthConv.from_pool(
        channels=3, **arguments, kernel_size=kernel_size, init=init
    )
    assert spd(x).shape == expected.shape, f"{pool} on {tuple(x.shape)}"
    if init == "random":
        assert verdict == "random"


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_timm_same_pools_keep_their_output_size(ceil_mode: bool) -> None:
    for pool in (
        MaxPool2dSame(3, 2, ceil_mode=ceil_mode),
        AvgPool2dSame(3, 2, ceil_mode=ceil_mode),
    ):
        arguments = pool_arguments(pool)
        assert arguments["padding"] == "same"
        spd, verdict = SpaceToDepthConv.from_pool(channels=3, **arguments)
        for size in range(3, 12):
            x = torch.randn(1, 3, size, size + 1)
            assert spd(x).shape == pool(x).shape, (pool, size)
            if isinstance(pool, AvgPool2dSame) and not ceil_mode:
                assert verdict == "exact"
                assert relative_error(spd(x), pool(x)) <= 1e-5, size


def test_functional_pool_arguments_default_stride_to_kernel() -> None:
    # as F.max_pool2d(x, 3) would be called at a functional site
    spd, _ = SpaceToDepthConv.from_pool("avg", 4, 2, kernel=3, stride=None)
    x = torch.randn(1, 4, 10, 11)
    assert relative_error(spd(x), F.avg_pool2d(x, 3)) <= 1e-5


def test_pool_arguments_reads_module_numbers() -> None:
    arguments = pool_arguments(nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert arguments == {
        "pool_kind": "max",
        "dims": 2,
        "kernel": (3, 3),
        "stride": (2, 2),
        "padding": (1, 1),
        "dilation": (1, 1),
        "ceil_mode": True,
    }
    arguments = pool_arguments(nn.AvgPool1d(4, 2, 2, count_include_pad=False))
    assert arguments["divisor_override"] is None
    assert arguments["count_include_pad"] is False


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        (nn.MaxPool2d(2, return_indices=True), "returns indices"),
        (nn.AdaptiveAvgPool2d(1), "not a max or average pooling"),
        (nn.LPPool2d(2, 2), "not a max or average pooling"),
    ],
)
def test_pool_arguments_refuses_unsupported_modules(pool: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pool_arguments(pool)


def test_from_pool_rejects_bad_numbers() -> None:
    with pytest.raises(ValueError, match="stride must be > 1"):
        SpaceToDepthConv.from_pool("max", 3, 2, kernel=3, stride=1)
    with pytest.raises(ValueError, match="more than half"):
        SpaceToDepthConv.from_pool("max", 3, 2, kernel=3, stride=2, padding=2)
    with pytest.raises(ValueError, match="pool_kind"):
        SpaceToDepthConv.from_pool("lp", 3, 2, kernel=3, stride=2)


# --------------------------------------------------------------------------- deployment

DEPLOY_CASES = {
    "conv": lambda: SpaceToDepthConv.from_conv(nn.Conv2d(3, 4, 3, 2, 1))[0],
    "tf-same": lambda: SpaceToDepthConv.from_conv(Conv2dSame(3, 4, 2, 3))[0],
    "ceil-pool": lambda: SpaceToDepthConv.from_pool(
        channels=3, **pool_arguments(nn.AvgPool2d(2, 3, 1, ceil_mode=True))
    )[0],
    "conv3d": lambda: SpaceToDepthConv.from_conv(nn.Conv3d(3, 4, 3, 2, 1))[0],
    "depthwise": lambda: SpaceToDepthConv.from_conv(nn.Conv2d(3, 3, 3, 2, 1, groups=3))[0],
}


def deploy_inputs(dims: int) -> list[torch.Tensor]:
    shapes = [(2, 3, 9, 11, 7), (1, 3, 12, 13, 8), (3, 3, 5, 6, 5), (2, 3, 16, 9, 10)]
    return [torch.randn(shape[: 2 + dims]) for shape in shapes]


@pytest.mark.parametrize("name", DEPLOY_CASES)
def test_spd_scripted_matches_eager_for_every_size(name: str) -> None:
    spd = DEPLOY_CASES[name]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(spd)
    # several calls: TorchScript's profiling executor optimises after the first runs
    for x in deploy_inputs(spd.dims) * 2:
        assert torch.allclose(scripted(x), spd(x), atol=1e-6), (name, tuple(x.shape))


@pytest.mark.parametrize("name", DEPLOY_CASES)
def test_spd_trace_keeps_spatial_sizes_dynamic(name: str) -> None:
    spd = DEPLOY_CASES[name]().eval()
    inputs = deploy_inputs(spd.dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(spd, inputs[0])
    for x in inputs:
        assert torch.allclose(traced(x), spd(x), atol=1e-6), (name, tuple(x.shape))


@pytest.mark.parametrize("name", DEPLOY_CASES)
def test_spd_exports_with_dynamic_batch_and_spatial_dims(name: str) -> None:
    spd = DEPLOY_CASES[name]().eval()
    inputs = deploy_inputs(spd.dims)
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2 + i: torch.export.Dim(f"size{i}", min=4, max=512) for i in range(spd.dims)}
    program = torch.export.export(spd, (inputs[0],), dynamic_shapes={"x": dynamic})
    for x in inputs:
        assert torch.allclose(program.module()(x), spd(x), atol=1e-6), (name, tuple(x.shape))


@pytest.mark.parametrize("name", DEPLOY_CASES)
def test_spd_exports_to_onnx_with_dynamic_axes(name: str) -> None:
    # tf-same and ceil-pool need negative (cropping) pads for some sizes
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    spd = DEPLOY_CASES[name]().eval()
    inputs = deploy_inputs(spd.dims)
    buffer = io.BytesIO()
    axes = {0: "batch", **{2 + i: f"size{i}" for i in range(spd.dims)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter; the dynamo one needs onnxscript, not a dependency here
        torch.onnx.export(
            spd, (inputs[0],), buffer, dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for x in inputs:
        (out,) = session.run(None, {"x": x.numpy()})
        assert torch.allclose(torch.from_numpy(out), spd(x), atol=1e-5), (name, tuple(x.shape))


@FAST
@given(
    dims=st.integers(1, 3),
    data=st.data(),
    channels=st.integers(1, 10),
    channels_last=st.booleans(),
    phase_major=st.booleans(),
)
def test_padded_space_to_depth_equals_pad_then_space_to_depth(
    dims: int, data: st.DataObject, channels: int, channels_last: bool, phase_major: bool
) -> None:
    # eager SPD-Conv pads and rearranges in one pass (one strided copy per phase into a zeroed
    # output): every left pad, and right ends that pad or crop, must give what F.pad +
    # space_to_depth give
    draw = data.draw
    block = [draw(st.integers(1, 3), label="block") for _ in range(dims)]
    size = [draw(st.integers(1, 9), label="size") for _ in range(dims)]
    lefts = [draw(st.integers(0, 3), label="left") for _ in range(dims)]
    reduced = [
        draw(st.integers(max(1, -(-left // b)), (s + left) // b + 2), label="blocks")
        for s, left, b in zip(size, lefts, block, strict=True)
    ]
    check_padded_space_to_depth(size, lefts, block, reduced, channels, channels_last, phase_major)


@pytest.mark.parametrize("phase_major", [True, False])
def test_padded_space_to_depth_when_a_phase_sees_only_padding(phase_major: bool) -> None:
    # left 3 with block 2 and 2 blocks: phase 0 starts at block 2, past the end
    check_padded_space_to_depth([4, 5], [3, 0], [2, 2], [2, 3], 3, False, phase_major)
    check_padded_space_to_depth([1, 5], [0, 0], [3, 2], [1, 3], 9, True, phase_major)


def check_padded_space_to_depth(
    size: list[int],
    lefts: list[int],
    block: list[int],
    reduced: list[int],
    channels: int,
    channels_last: bool,
    phase_major: bool,
) -> None:
    x = maybe_channels_last(torch.randn(2, channels, *size), channels_last).requires_grad_()
    pads: list[int] = []
    for s, left, b, r in zip(size, lefts, block, reduced, strict=True):
        pads = [left, b * r - s - left, *pads]
    order = "phase" if phase_major else "channel"
    expected = space_to_depth(F.pad(x, pads), tuple(block), order)
    got = pad_space_to_depth(x, pads, lefts, block, reduced, phase_major)
    assert torch.equal(got, expected)
    weights = torch.randn(expected.shape)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    if not got.requires_grad:  # every phase is padding: nothing of x reaches the output
        assert not grad_expected.any()
        return
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.equal(grad_got, grad_expected)


@pytest.mark.parametrize("order", ["phase", "channel"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_space_to_depth_off_the_cpu_gives_the_cpu_shape_and_layout(
    order: str, memory_format: torch.memory_format
) -> None:
    # GPUs take their own formulations (pixel_unshuffle, pad + view copy); the meta device
    # runs them without one, so their shapes and layouts are checked here
    x = torch.randn(2, 8, 12, 10).contiguous(memory_format=memory_format)
    expected = space_to_depth(x, (2, 2), order)
    got = space_to_depth(x.to("meta"), (2, 2), order)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=memory_format), f"{order}: layout not kept"
    layer = SpaceToDepthConv.from_conv(nn.Conv2d(8, 6, 3, 2, 1))[0].eval()
    odd = x[..., :11, :9]  # padded on both sides
    with torch.no_grad():
        expected = layer(odd)
        got = layer.to("meta")(odd.to("meta"))
    assert got.shape == expected.shape
