"""`patch`: policies applied in place, exact transfers, paper placements, and the report."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from surgeon.layers.blur import BlurPool
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.models import load_model
from surgeon.patch import patch
from surgeon.report import patch_json, patch_markdown, render_patch
from surgeon.trace import counted_forward
from tests.conftest import rendered


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _exact_case(model: nn.Module, size: int) -> None:
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size)
    patched, report = patch(model, "spd", x)
    assert patched is model and type(patched) is type(original)
    with torch.no_grad():
        assert _rel(original(x), patched(x)) <= 1e-5
    assert report.patched >= 4
    assert all(r.transfer == "exact" for r in report.rows if r.status == "patched")
    assert report.output_rel_diff <= 1e-5


@pytest.mark.parametrize("size", [224, 193])
@pytest.mark.parametrize(
    "spec", ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "timm:tf_efficientnet_b0"]
)
def test_spd_reproduces_the_original_outputs(
    fresh_model: Callable[..., nn.Module], spec: str, size: int
) -> None:
    _exact_case(fresh_model(spec), size)


def test_spd_all_marks_resnet50_max_pool_approximate_and_the_rest_exact(
    fresh_model: Callable[..., nn.Module],
) -> None:
    _, report = patch(fresh_model("resnet50"), "spd-all", torch.randn(1, 3, 64, 64))
    transfers = {r.site: r.transfer for r in report.rows if r.status == "patched"}
    assert transfers.pop("maxpool") == "approximate"
    assert len(transfers) == 7 and set(transfers.values()) == {"exact"}


def test_spd_keeps_max_pools_and_says_which_rule_did(fresh_model: Callable[..., nn.Module]) -> None:
    _, report = patch(fresh_model("resnet50"), "spd", torch.randn(1, 3, 64, 64))
    rows = {r.site: r for r in report.rows}
    assert rows["maxpool"].status == "kept" and rows["maxpool"].rule == "1 (keep-max-pools)"
    patched = [r for r in report.rows if r.status == "patched"]
    assert len(patched) == 7 and {r.transfer for r in patched} == {"exact"}


def test_spd_replaces_modules_in_place_and_keeps_the_class_and_methods() -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=10)
    patched, report = patch(model, "spd", torch.randn(1, 3, 64, 64))
    assert patched is model and isinstance(model.conv1, SpaceToDepthConv)
    model.reset_classifier(5)
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[1] == 512
    assert "conv1.weight" in report.keys_removed and "conv1.conv.weight" in report.keys_added
    assert not report.keys_renamed


def test_antialias_on_resnet50_places_blur_as_the_paper_does(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet50")
    params = sum(p.numel() for p in model.parameters())
    patched, report = patch(model, "antialias", torch.randn(1, 3, 64, 64))
    assert sum(p.numel() for p in patched.parameters()) == params == 25_557_032
    # stem: conv keeps stride 2 (pool_only); max pool -> MaxPool(k3, s1) + BlurPool(s2)
    assert model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.Sequential)
    assert model.maxpool[0].stride == 1 and isinstance(model.maxpool[1], BlurPool)
    block = model.layer2[0]
    # Bottleneck: conv2 at stride 1, blur after its ReLU, before conv3 (the ReLU is shared)
    assert block.conv2.stride == (1, 1)
    assert isinstance(block.relu, nn.ReLU), "the shared ReLU must stay as it is"
    assert isinstance(block.conv3, nn.Sequential) and isinstance(block.conv3[0], BlurPool)
    # shortcut: BlurPool, then the 1x1 conv at stride 1
    down = block.downsample[0]
    assert isinstance(down, nn.Sequential) and isinstance(down[0], BlurPool)
    assert down[1].stride == (1, 1)
    assert report.patched == 7 and {r.transfer for r in report.rows if r.status == "patched"} == {
        "kept"
    }
    assert ("layer2.0.conv3.weight", "layer2.0.conv3.1.weight") in report.keys_renamed


def test_antialias_shared_relu_other_call_sites_are_untouched(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet50")
    original = copy.deepcopy(model)
    patch(model, "antialias", torch.randn(1, 3, 64, 64))
    block, ref = model.layer2[0], original.layer2[0]
    x = torch.randn(1, 256, 16, 16)
    with torch.no_grad():
        # the first call of the shared ReLU (after bn1) still feeds conv2 unblurred
        a = block.relu(block.bn1(block.conv1(x)))
        b = ref.relu(ref.bn1(ref.conv1(x)))
    assert torch.equal(a, b)


def test_antialias_on_mobilenet_v2_blurs_after_the_depthwise_relu6(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("mobilenet_v2")
    params = sum(p.numel() for p in model.parameters())
    keys = set(model.state_dict())
    _, report = patch(model, "antialias", torch.randn(1, 3, 64, 64))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.features[0][0].stride == (2, 2), "the stem conv is unchanged"
    dw = model.features[2].conv[1]
    assert dw[0].stride == (1, 1)
    assert isinstance(dw[2], nn.Sequential)
    assert isinstance(dw[2][0], nn.ReLU6) and isinstance(dw[2][1], BlurPool)
    assert set(model.state_dict()) == keys, "wrapping the ReLU6 keeps every key"
    assert report.patched == 4


def test_functional_sites_rewrite_only_their_owner_module() -> None:
    model = load_model("inception_v3", kwargs={"init_weights": False}).model
    patched, report = patch(model, "antialias", torch.randn(1, 3, 299, 299))
    assert patched is model, "the model keeps its class"
    assert isinstance(model.Mixed_6a, torch.fx.GraphModule)
    rows = {r.site: r for r in report.rows}
    assert rows["Mixed_6a:max_pool2d"].status == "patched"
    assert any("Mixed_6a is now a torch.fx.GraphModule" in n for n in report.notes)


def test_init_random_reinitialises_and_says_so(fresh_model: Callable[..., nn.Module]) -> None:
    from surgeon.policy_loader import policy_from_dict
    from surgeon.rewrites import action_schemas

    policy = policy_from_dict(
        {
            "name": "r",
            "description": "random init",
            "rules": [{"match": {"op": "conv"}, "action": "spd", "params": {"init": "random"}}],
        },
        action_schemas(),
    )
    _, report = patch(fresh_model("resnet18"), policy, torch.randn(1, 3, 64, 64))
    assert {r.transfer for r in report.rows if r.status == "patched"} == {"random"}


def test_report_renders_every_site_deterministically(
    fresh_model: Callable[..., nn.Module], console
) -> None:  # type: ignore[no-untyped-def]
    _, report = patch(fresh_model("resnet18"), "spd-all", torch.randn(1, 3, 64, 64))
    render_patch(report, console)
    text = rendered(console)
    for row in report.rows:
        assert row.site in text
    assert "SPD b2 + conv k3" in text and "approximate" in text
    assert "patched, 0 skipped" in text
    markdown = patch_markdown(report)
    assert markdown.count("\n| ") >= len(report.rows)
    assert '"patched": 8' in patch_json(report)


def test_strict_turns_unused_rules_into_errors(fresh_model: Callable[..., nn.Module]) -> None:
    from surgeon.errors import PolicyError
    from surgeon.policy_loader import policy_from_dict
    from surgeon.rewrites import action_schemas

    policy = policy_from_dict(
        {
            "name": "s",
            "description": "strict",
            "rules": [{"match": {"op": "lp_pool"}, "action": "spd"}],
        },
        action_schemas(),
    )
    _, report = patch(fresh_model("resnet18"), policy, torch.randn(1, 3, 32, 32))
    assert report.warnings and "matched no site" in report.warnings[0]
    # a built-in policy's rules cover every kind of model: unused ones are not news
    _, report = patch(fresh_model("mobilenet_v2"), "spd", torch.randn(1, 3, 32, 32))
    assert not report.warnings
    with pytest.raises(PolicyError, match="decided no site"):
        patch(fresh_model("resnet18"), policy, torch.randn(1, 3, 32, 32), strict=True)


def test_patch_runs_the_original_model_once_and_the_patched_model_once(
    fresh_model: Callable[..., nn.Module],
) -> None:
    # the analysis run doubles as the reference for verification and MAC counts
    model = fresh_model("resnet18")
    calls: list[str] = []
    model.register_forward_pre_hook(lambda m, a: calls.append(type(m.conv1).__name__))
    x = torch.randn(1, 3, 64, 64)
    original = copy.deepcopy(model)
    _, report = patch(model, "spd", x)
    assert calls == ["Conv2d", "SpaceToDepthConv"]
    # and it still compares against the original: the per-site and output checks are exact
    assert all(
        r.rel_diff is not None and r.rel_diff <= 1e-5 for r in report.rows if r.status == "patched"
    )
    with torch.no_grad():
        assert _rel(original(x), model(x)) <= 1e-5
    assert report.macs_before == counted_forward(original, (x,))[1][""] // 2 > 0
