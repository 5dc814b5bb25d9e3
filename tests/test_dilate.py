"""`dilate`: dilated encoders with a target output stride, equal to torchvision's own."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from surgeon.errors import PolicyError
from surgeon.models import example_inputs, load_model
from surgeon.patch import patch, resolve_policy
from surgeon.policy import Policy
from surgeon.report import render_patch
from surgeon.rewrites import action_schemas
from tests.conftest import rendered


def _dilate(output_stride: int) -> Policy:
    return resolve_policy("dilate").with_params(
        "dilate", {"output_stride": output_stride}, action_schemas()["dilate"]
    )


def _layer4(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    features: list[torch.Tensor] = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: features.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return features[0]


@pytest.mark.parametrize(
    ("output_stride", "replace"), [(8, [False, True, True]), (16, [False, False, True])]
)
def test_dilated_resnet50_equals_torchvisions_replace_stride_with_dilation(
    fresh_model: Callable[..., nn.Module], output_stride: int, replace: list[bool]
) -> None:
    model = fresh_model("resnet50")
    original = copy.deepcopy(model)
    reference = torchvision.models.resnet50(replace_stride_with_dilation=replace).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 48)  # 48 → 24 → 12 → 6 → 3 → 2: odd sizes on the way
    patched, report = patch(model, _dilate(output_stride), x)
    with torch.no_grad():
        got, want = patched(x), reference(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    for name, module in reference.named_modules():
        if isinstance(module, nn.Conv2d):
            mine = patched.get_submodule(name)
            assert (mine.stride, mine.dilation, mine.padding) == (
                module.stride,
                module.dilation,
                module.padding,
            ), name
    # features grow by the expected factor: 48 / 32 → 2 per side at output stride 32
    assert _layer4(original, x).shape[-2:] == (2, 2)
    assert _layer4(patched, x).shape[-2:] == (48 // output_stride,) * 2
    assert not report.keys_added and not report.keys_removed and not report.keys_renamed


def test_dilated_features_equal_the_originals_on_every_fth_position(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet18")
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 56, 56)
    patch(model, _dilate(8), x)
    dense, sparse = _layer4(model, x), _layer4(original, x)
    assert (dense.shape[-1], sparse.shape[-1]) == (7, 2)  # 56 / 8 and ceil(56 / 32)
    torch.testing.assert_close(dense[..., ::4, ::4], sparse, atol=1e-5, rtol=1e-5)


def test_dilate_rows_say_the_map_grows_on_purpose(
    fresh_model: Callable[..., nn.Module], console: object
) -> None:
    model = fresh_model("resnet18")
    _, report = patch(model, _dilate(16), torch.randn(1, 3, 64, 64))
    rows = {r.site: r for r in report.rows}
    kept = rows["layer3.0.conv1"]
    assert kept.status == "skipped"
    assert kept.note == "keeps its stride: its output stride 16 is within the target 16"
    row = rows["layer4.0.conv1"]
    assert row.status == "patched" and row.transfer == "kept"
    assert row.out_shape_before == (1, 512, 2, 2) and row.out_shape_after == (1, 512, 4, 4)
    assert "on purpose" in row.replacement and row.rel_diff is None
    assert report.output_rel_diff > 0  # the global pool now averages 4× more positions
    render_patch(report, console)  # type: ignore[arg-type]
    text = rendered(console)  # type: ignore[arg-type]
    assert "512×2×2⇒512×4×4" in text and "map 2× larger per side" in text


def test_dilate_pads_a_strided_pool_shortcut_so_the_residual_join_still_fits() -> None:
    class Down(nn.Module):  # a ResNet-D block: 2×2 average-pool shortcut, ceil_mode
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, 2, 1)
            self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
            self.proj = nn.Conv2d(8, 8, 1)
            self.after = nn.Conv2d(8, 8, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.after(self.conv(x) + self.proj(self.pool(x)))

    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Down(), nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(1, 3, 27, 27)
    patched, report = patch(model, _dilate(2), x)
    assert report.patched == 2
    assert isinstance(patched[1].pool, nn.Sequential), "an asymmetric pad keeps the pool 'same'"
    assert patched[1].after.dilation == (2, 2) and patched[1].after.padding == (2, 2)
    with torch.no_grad():
        assert patched(x).shape == (1, 8, 1, 1)


def test_deeplabv3_at_output_stride_8_doubles_the_aspp_rates_and_keeps_the_output_size() -> None:
    loaded = load_model("deeplabv3_mobilenet_v3_large")
    args = example_inputs(loaded.task, (3, 48, 48))
    model, report = patch(loaded.model, _dilate(8), args)
    (row,) = [r for r in report.rows if r.status == "patched"]
    assert row.site == "backbone.7.block.1.0" and row.out_shape_after == (1, 240, 6, 6)
    rates = [branch[0].dilation for branch in model.classifier[0].convs[1:4]]
    assert rates == [(24, 24), (48, 48), (72, 72)], "DeepLab doubles the rates at half the stride"
    with torch.no_grad():
        assert model(*args)["out"].shape == (1, 21, 48, 48)


def test_dilate_refuses_a_site_that_would_grow_a_fixed_upsampling_output() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.ConvTranspose2d(4, 3, 2, 2)
    ).eval()
    _, report = patch(model, _dilate(1), torch.randn(1, 3, 16, 16))
    (row,) = [r for r in report.rows if r.site == "0"]
    assert row.status == "skipped"
    assert "its size would change; choose a larger output_stride" in row.note


def test_output_stride_override_is_validated_and_needs_a_dilate_rule() -> None:
    policy = _dilate(16)
    assert [r.params["output_stride"] for r in policy.rules] == [16]
    assert policy.to_dict()["rules"][0]["params"] == {"output_stride": 16}
    with pytest.raises(PolicyError, match=r"dilate.output_stride: 0 is out of range"):
        _dilate(0)
    with pytest.raises(PolicyError, match="has no rule with action 'dilate'"):
        resolve_policy("spd").with_params("dilate", {"output_stride": 8})


@pytest.mark.slow
def test_deeplabv3_resnet50_at_output_stride_4_dilates_layer2_on() -> None:
    loaded = load_model("deeplabv3_resnet50")
    args = example_inputs(loaded.task, (3, 64, 64))
    model, report = patch(loaded.model, _dilate(4), args)
    assert [r.site for r in report.rows if r.status == "patched"] == [
        "backbone.layer2.0.conv2",
        "backbone.layer2.0.downsample.0",
    ]
    assert model.backbone.layer4[1].conv2.dilation == (8, 8)
    assert [b[0].dilation for b in model.classifier[0].convs[1:4]] == [(24, 24), (48, 48), (72, 72)]


def test_a_parallel_pool_that_reads_as_a_global_pool_is_dilated_with_its_branch() -> None:
    import timm

    # at 32 px layer4's 2×2 shortcut pool covers its whole 2×2 input: the scan calls it a
    # global pool, no downsampling rule sees it, and the main path alone would break the join
    model = timm.create_model("test_resnet").eval()
    x = torch.randn(1, 3, 32, 32)
    patched, report = patch(model, _dilate(8), x)
    rows = {r.site: r for r in report.rows}
    assert rows["layer4.0.downsample.0"].role == "global_pool"
    assert "layer4.0.downsample.0 (parallel, not a downsampling site here) also at stride 1" in (
        rows["layer4.0.conv1"].note
    )
    with torch.no_grad():
        assert patched(x).shape == (1, 1000)


def test_a_keep_rule_on_one_branch_fails_verification_with_a_clear_error(
    fresh_model: Callable[..., nn.Module],
) -> None:
    text = """
name: half
description: dilate the main path only
rules:
  - match: {name: "*downsample*"}
    action: keep
  - match: {}
    action: dilate
    params: {output_stride: 16}
"""
    from surgeon.errors import PatchError
    from surgeon.policy_loader import parse_policy

    policy = parse_policy(text, "half.yaml", action_schemas())
    with pytest.raises(PatchError) as info:
        patch(fresh_model("resnet18"), policy, torch.randn(1, 3, 64, 64))
    message = str(info.value)
    # names the block that broke and the branch the keep rule held back
    assert message.startswith("the patched model fails in layer4.0 (BasicBlock), where ")
    assert "layer4.0.downsample.0 (keep rule 1 wins over rule 2)" in message, message
    assert "must change every branch of a join alike" in message and "\n" not in message


class _TwoBranches(nn.Module):
    """An Inception-style reduction: a strided conv beside a functional max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.conv(x), F.max_pool2d(x, 3, stride=2, padding=1)], 1)
        return self.head(x).mean((2, 3))


def test_a_block_with_a_branch_dilate_cannot_change_keeps_its_strides() -> None:
    model = _TwoBranches().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    patched, report = patch(model, _dilate(2), x)
    rows = {r.site: r for r in report.rows}
    assert rows["conv"].status == "skipped"
    assert "the join at" in rows["conv"].note and "a functional call" in rows["conv"].note
    assert rows[":max_pool2d"].note == "functional call: its stride is not a module attribute"
    with torch.no_grad():
        assert torch.equal(patched(x), before)


def test_factorised_video_blocks_are_left_alone_not_broken() -> None:
    model = torchvision.models.video.r2plus1d_18().eval()
    x = torch.randn(1, 3, 8, 32, 32)
    patched, report = patch(model, _dilate(8), x)
    rows = {r.site: r for r in report.rows}
    assert rows["layer4.0.conv1.0.0"].note == "unequal strides (1, 2, 2) per dimension"
    assert "stride graph cannot follow" in rows["layer4.0.downsample.0"].note
    assert report.patched == 0
    with torch.no_grad():
        assert patched(x).shape == (1, 400)


class _BlockThenFlatten(nn.Module):
    """A strided residual block, then a head that flattens a map of a fixed size."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.main = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.main(x) + self.shortcut(x)
        return self.head(x.flatten(1))


def test_a_block_whose_shortcut_cannot_follow_is_left_alone_whole() -> None:
    model = _BlockThenFlatten().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    patched, report = patch(model, _dilate(2), x)
    rows = {r.site: r for r in report.rows}
    for name, other in (("main", "shortcut"), ("shortcut", "main")):
        assert rows[name].status == "skipped"
        assert f"its parallel branch {other} could not follow" in rows[name].note
    with torch.no_grad():
        assert torch.equal(patched(x), before)
