"""`allconv`: pooling becomes a strided convolution; average pooling is reproduced exactly where
PyTorch divides by the full window."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgeon.patch import patch
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import action_schemas


def _pooled(pool: nn.Module, dims: int = 2) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 4, 1)
    return nn.Sequential(conv, pool).eval()


def _run(model: nn.Module, x: torch.Tensor, policy: object = "allconv") -> tuple[str, float]:
    original = copy.deepcopy(model)
    patched, report = patch(model, policy, x)  # type: ignore[arg-type]
    (row,) = [r for r in report.rows if r.status == "patched"]
    with torch.no_grad():
        want, got = original(x), patched(x)
    assert got.shape == want.shape
    return row.transfer or "", ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize(
    ("pool", "exact_at"),
    [
        (nn.AvgPool2d(3, 2, 1), {8, 9}),
        (nn.AvgPool2d(2), {8, 9}),
        (nn.AvgPool2d(3, 2, 1, divisor_override=5), {8, 9}),
        # ceil_mode: the last window overhangs the padded input at 8, not at 9
        (nn.AvgPool2d(3, 2, 1, ceil_mode=True), {9}),
        (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), {8}),
        # border windows divide by the number of real elements
        (nn.AvgPool2d(3, 2, 1, count_include_pad=False), set()),
    ],
)
def test_average_pool_transfer_is_exact_exactly_where_the_window_is_full(
    pool: nn.Module, exact_at: set[int], size: int
) -> None:
    transfer, diff = _run(_pooled(pool), torch.randn(2, 3, size, size))
    if size in exact_at:
        assert transfer == "exact" and diff < 1e-6, f"{pool} at {size}: {diff}"
    else:
        assert transfer == "approximate" and diff > 1e-3, f"{pool} at {size}: {diff}"


@pytest.mark.parametrize(("pool", "dims"), [(nn.AvgPool1d(3, 2, 1), 1), (nn.AvgPool3d(2, 2), 3)])
def test_average_pool_transfer_is_exact_in_one_and_three_dimensions(
    pool: nn.Module, dims: int
) -> None:
    transfer, diff = _run(_pooled(pool, dims), torch.randn(1, 3, *([7] * dims)))
    assert transfer == "exact" and diff < 1e-6


def test_timm_same_padded_average_pool_is_exact_at_odd_sizes() -> None:
    from timm.layers import create_pool2d

    pool = create_pool2d("avg", 3, stride=2, padding="same")
    assert type(pool).__name__ == "AvgPool2dSame"
    transfer, diff = _run(_pooled(pool), torch.randn(1, 3, 11, 11))
    assert transfer == "exact" and diff < 1e-6


def test_max_pool_starts_from_the_average_and_is_reported_approximate() -> None:
    import torchvision

    model = torchvision.models.resnet18().eval()
    params = sum(p.numel() for p in model.parameters())
    patched, report = patch(model, "allconv", torch.randn(1, 3, 64, 64))
    (row,) = [r for r in report.rows if r.status == "patched"]
    assert row.site == "maxpool" and row.transfer == "approximate"
    assert row.replacement == "depthwise conv k3 s2 (average init)"
    conv = patched.maxpool
    assert isinstance(conv, nn.Conv2d) and conv.groups == 64 and conv.stride == (2, 2)
    assert torch.allclose(conv.weight, torch.full_like(conv.weight, 1 / 9))
    assert sum(p.numel() for p in patched.parameters()) == params + 64 * 9
    assert report.keys_added == ("maxpool.weight",)


def test_dense_channels_are_the_papers_form_and_still_exact_for_average_pooling() -> None:
    policy = policy_from_dict(
        {
            "name": "allconv-dense",
            "description": "",
            "rules": [{"match": {}, "action": "allconv", "params": {"channels": "dense"}}],
        },
        action_schemas(),
    )
    transfer, diff = _run(_pooled(nn.AvgPool2d(3, 2, 1)), torch.randn(1, 3, 9, 9), policy)
    assert transfer == "exact" and diff < 1e-6


def test_allconv_leaves_convolutions_and_adaptive_pools_alone_with_a_reason() -> None:
    policy = policy_from_dict(
        {
            "name": "all",
            "description": "",
            "rules": [{"match": {"role": "any"}, "action": "allconv"}],
        },
        action_schemas(),
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.AdaptiveAvgPool2d(1)).eval()
    _, report = patch(model, policy, torch.randn(1, 3, 8, 8))
    notes = {r.site: r.note for r in report.rows}
    assert (
        notes["0"] == "allconv replaces max and average pooling; this site is already a convolution"
    )
    assert notes["1"] == "allconv replaces max and average pooling; this site is adaptive avg pool"
