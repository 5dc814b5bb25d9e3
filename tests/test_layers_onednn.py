"""SPD-Conv's direct oneDNN route: equal to the module it stands in for, split so no weight slice
reaches glibc's mmap ceiling, and taken only where calling the module would just run its
forward in eager float32 CPU inference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from surgeon.layers import SpaceToDepthConv, onednn

FAST = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


@FAST
@given(
    out_channels=st.integers(1, 300),
    per_channel=st.integers(1, 5000),
    ceiling=st.integers(64, 1 << 16),
)
def test_slices_are_equal_minimal_and_below_the_ceiling(
    out_channels: int, per_channel: int, ceiling: int
) -> None:
    weight = torch.empty(out_channels, per_channel, 1, 1)
    size = onednn.slice_channels(weight, ceiling)
    row = per_channel * 4
    count = -(-out_channels // size)
    assert 1 <= size <= out_channels
    assert count * size - out_channels < count, f"unequal slices: {count} x {size}"
    if size > 1:  # a slice padded to oneDNN's 16-channel block stays below the ceiling
        assert (size + 16) * row <= ceiling, f"{size} channels of {row} B reach {ceiling}"
    fewer = -(-out_channels // (count - 1)) if count > 1 else None
    assert fewer is None or (fewer + 16) * row > ceiling, f"{count - 1} slices would do"


def test_resnet50_layer4_weights_split_in_two_below_32_mib() -> None:
    assert onednn.slice_channels(torch.empty(512, 2048, 3, 3)) == 256  # 36 MiB -> 2 x 18
    assert onednn.slice_channels(torch.empty(2048, 4096, 1, 1)) == 1024  # 32 MiB -> 2 x 16
    assert onednn.slice_channels(torch.empty(512, 1024, 1, 1)) == 512  # 2 MiB: whole


@FAST
@given(
    channels=st.tuples(st.integers(1, 12), st.integers(1, 40)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    ceiling=st.sampled_from([1 << 10, 1 << 12, onednn.MMAP_CEILING]),
    seed=st.integers(0, 2**16),
)
@needs_onednn
def test_route_equals_the_module_in_any_number_of_slices(
    channels: tuple[int, int],
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    bias: bool,
    ceiling: int,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    cin, cout = channels
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias).eval()
    x = torch.randn(2, cin, 7, 6, generator=generator)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(onednn, "MMAP_CEILING", ceiling)
        routed = onednn.conv2d(x, conv)
        expected = conv(x)
    assert routed is not None, "the route did not apply to a plain eager inference call"
    assert routed.shape == expected.shape and routed.is_contiguous()
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_route_serves_inference_mode_too() -> None:
    conv = nn.Conv2d(8, 4, 1).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.inference_mode():
        routed = onednn.conv2d(x, conv)
        expected = conv(x)
    assert routed is not None
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def _conv() -> nn.Conv2d:
    return nn.Conv2d(8, 4, 1).eval()


def _with_hook(conv: nn.Conv2d) -> nn.Conv2d:
    conv.register_forward_hook(lambda module, args, out: None)
    return conv


class _Custom(nn.Conv2d):
    pass


STEP_ASIDE: dict[str, tuple[Callable[[], nn.Conv2d], Callable[[Tensor], Tensor], str]] = {
    # name: (conv, input transform, context)
    "autograd records": (lambda: _conv().requires_grad_(True), lambda x: x, "grad"),
    "channels_last input": (
        _conv,
        lambda x: x.contiguous(memory_format=torch.channels_last),
        "no_grad",
    ),
    "float64": (lambda: _conv().double(), lambda x: x.double(), "no_grad"),
    "a forward hook": (lambda: _with_hook(_conv()), lambda x: x, "no_grad"),
    "a conv subclass": (lambda: _Custom(8, 4, 1).eval(), lambda x: x, "no_grad"),
    "grouped": (lambda: nn.Conv2d(8, 4, 1, groups=2).eval(), lambda x: x, "no_grad"),
    "'same' padding": (lambda: nn.Conv2d(8, 4, 3, padding="same").eval(), lambda x: x, "no_grad"),
    "autocast": (_conv, lambda x: x, "autocast"),
    "oneDNN switched off": (_conv, lambda x: x, "mkldnn off"),
    "FlopCounterMode": (_conv, lambda x: x, "flops"),
}


@pytest.mark.parametrize("case", list(STEP_ASIDE))
def test_route_steps_aside_where_the_module_must_run(case: str) -> None:
    make, transform, context = STEP_ASIDE[case]
    conv = make()
    x = transform(torch.randn(1, 8, 5, 5))
    if context == "grad":
        routed = onednn.conv2d(x, conv)
    elif context == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            routed = onednn.conv2d(x, conv)
    elif context == "mkldnn off":
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
            routed = onednn.conv2d(x, conv)
    elif context == "flops":
        with torch.no_grad(), FlopCounterMode(display=False):
            routed = onednn.conv2d(x, conv)
    else:
        with torch.no_grad():
            routed = onednn.conv2d(x, conv)
    assert routed is None, f"the oneDNN route ran with {case}"


def test_route_steps_aside_while_tracing() -> None:
    seen: list[Tensor | None] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = _conv()

        def forward(self, x: Tensor) -> Tensor:
            seen.append(onednn.conv2d(x, self.conv))
            return self.conv(x)

    with torch.no_grad():
        torch.jit.trace(Probe(), torch.randn(1, 8, 5, 5), check_trace=False)
    assert seen == [None]


def _spd_1x1(in_channels: int = 16, out_channels: int = 24) -> SpaceToDepthConv:
    # the inner convolution of an SPD-replaced 1x1 stride-2 conv: the route's main customer
    source = nn.Conv2d(in_channels, out_channels, 1, stride=2)
    return SpaceToDepthConv.from_conv(source)[0].eval()


@needs_onednn
def test_spd_conv_takes_the_route_in_eager_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _spd_1x1()
    x = torch.randn(2, 16, 10, 10)
    calls: list[bool] = []
    real = onednn.conv2d

    def spy(inputs: Tensor, conv: nn.Conv2d) -> Tensor | None:
        out = real(inputs, conv)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(onednn, "conv2d", spy)
    with torch.no_grad():
        routed = layer(x)
    assert calls == [True]
    reference = layer(x)  # autograd records: the module runs
    torch.testing.assert_close(routed, reference.detach(), rtol=1e-5, atol=1e-5)


def test_spd_conv_runs_its_inner_module_when_a_hook_watches_it() -> None:
    layer = _spd_1x1()
    seen: list[tuple[int, ...]] = []
    layer.conv.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        out = layer(torch.randn(1, 16, 10, 10))
    assert seen == [tuple(out.shape)], "a hook on SpaceToDepthConv.conv did not run"


def test_flop_counter_still_counts_the_inner_convolution() -> None:
    layer = _spd_1x1()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, 16, 10, 10))
    assert counter.get_total_flops() == 2 * (4 * 16) * 24 * 5 * 5
