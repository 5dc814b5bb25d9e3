"""`fold`: SPD-Conv rewritten as one strided convolution, exactly, for every input size."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from surgeon.errors import PatchError
from surgeon.fold import FoldedSpaceToDepthConv, fold, fold_space_to_depth
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.models import load_model
from surgeon.patch import patch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _dense(layer: SpaceToDepthConv) -> SpaceToDepthConv:
    """Fill the zero taps of a transferred kernel, as fine-tuning would."""
    with torch.no_grad():
        layer.conv.weight.add_(0.05 * torch.randn_like(layer.conv.weight))
    return layer


CONV_CASES = [
    # (kernel, stride, padding, dilation, groups)
    (3, 2, 1, 1, 1),
    (7, 2, 3, 1, 1),
    (1, 2, 0, 1, 1),
    (4, 4, 0, 1, 1),
    (3, 2, 1, 1, 4),
    (5, 3, 2, 2, 2),
    (2, 2, 1, 1, 1),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "groups"), CONV_CASES)
def test_folded_spd_conv_equals_the_spd_layer_for_odd_and_even_sizes(
    kernel: int, stride: int, padding: int, dilation: int, groups: int
) -> None:
    conv = nn.Conv2d(4, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    layer = _dense(SpaceToDepthConv.from_conv(conv)[0])
    folded = fold_space_to_depth(layer)
    smallest = max(1, dilation * (kernel - 1) + 1 - 2 * padding)
    for height, width in itertools.product(range(smallest, smallest + 5), (smallest + 6, 17)):
        x = torch.randn(2, 4, height, width)
        with torch.no_grad():
            expected, eager, portable = layer(x), folded(x), folded._portable(x)
        assert eager.shape == expected.shape, f"{height}x{width}: {eager.shape} != {expected.shape}"
        assert _rel(expected, eager) < 1e-5, f"eager fold differs at {height}x{width}"
        assert _rel(expected, portable) < 1e-5, f"exported fold differs at {height}x{width}"


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("padding", [0, 1, "same"])
def test_folded_pool_spd_matches_for_ceil_mode_and_same_padding(
    padding: int | str, ceil_mode: bool
) -> None:
    layer, _ = SpaceToDepthConv.from_pool(
        "max", 3, 2, 3, 2, padding, ceil_mode=ceil_mode, kernel_size=3
    )
    folded = fold_space_to_depth(_dense(layer))
    for size in range(3, 12):
        x = torch.randn(1, 3, size, size + 1)
        with torch.no_grad():
            expected, got = layer(x), folded(x)
        assert got.shape == expected.shape and _rel(expected, got) < 1e-5, f"size {size}"


def test_folding_a_fresh_exact_transfer_gives_back_the_original_conv() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
    layer, transfer = SpaceToDepthConv.from_conv(conv)
    assert transfer == "exact"
    folded = fold_space_to_depth(layer)
    assert folded.conv.kernel_size == (3, 3) and folded.trim == (0, 0)
    torch.testing.assert_close(folded.conv.weight, conv.weight, rtol=0, atol=0)
    untrimmed = fold_space_to_depth(layer, trim=False)
    assert untrimmed.conv.kernel_size == (4, 4), "SPD b2 + k2 is a 4x4 stride-2 conv"


def test_folded_layers_script_and_trace_with_dynamic_sizes() -> None:
    layer = _dense(SpaceToDepthConv.from_conv(nn.Conv2d(3, 6, 3, stride=2, padding=1))[0])
    folded = fold_space_to_depth(layer)
    example, other = torch.randn(1, 3, 16, 16), torch.randn(2, 3, 13, 9)
    for compiled in (torch.jit.script(folded), torch.jit.trace(folded, (example,))):
        with torch.no_grad():
            assert _rel(layer(other), compiled(other)) < 1e-5


def test_fold_replaces_every_spd_layer_and_keeps_the_model_function() -> None:
    model = load_model("resnet18").model.eval()
    x = torch.randn(1, 3, 64, 64)
    model, _ = patch(model, "spd", x)
    for module in model.modules():
        if isinstance(module, SpaceToDepthConv):
            _dense(module)
    with torch.no_grad():
        before = model(torch.randn(2, 3, 71, 45, generator=torch.Generator().manual_seed(1)))
    model, record = fold(model, x, choose="folded")
    assert record.folded == len(record.layers) == 7
    assert not any(isinstance(m, SpaceToDepthConv) for m in model.modules())
    assert sum(isinstance(m, FoldedSpaceToDepthConv) for m in model.modules()) == 7
    with torch.no_grad():
        after = model(torch.randn(2, 3, 71, 45, generator=torch.Generator().manual_seed(1)))
    assert _rel(before, after) < 1e-5
    assert record.to_dict()["layers"][0]["input_shape"] == [1, 3, 64, 64]


def test_fastest_records_timings_and_a_replay_reproduces_the_forms() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1, stride=2)
    )
    x = torch.randn(1, 3, 32, 32)
    model, _ = patch(model, "spd", x)
    replica = patch(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1, stride=2)
        ),
        "spd",
        x,
    )[0]
    _, record = fold(model, x, min_seconds=0.001)
    assert record.choose == "fastest" and record.backend == "eager" and len(record.layers) == 2
    for layer in record.layers:
        assert set(layer.timings) == {"kept", "folded"}, layer
        assert layer.form == min(layer.timings, key=layer.timings.__getitem__), layer
    _, replayed = fold(replica, x, forms=record.forms)
    assert replayed.forms == record.forms and replayed.choose == "replayed"
    assert all(not layer.timings for layer in replayed.layers)


def test_fold_rejects_forms_for_layers_that_do_not_exist() -> None:
    model, _ = patch(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)), "spd", torch.randn(1, 3, 9, 9))
    with pytest.raises(PatchError, match="does not have: 7"):
        fold(model, torch.randn(1, 3, 9, 9), forms={"7": "folded"})
