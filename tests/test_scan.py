"""The walker finds every downsampling site, says how, and its arithmetic matches the forward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgeon.models import example_inputs, load_model
from surgeon.scan import scan
from surgeon.sites import expected_output_shape

RESNET50_SITES = [
    "conv1",
    "maxpool",
    "layer2.0.conv2",
    "layer2.0.downsample.0",
    "layer3.0.conv2",
    "layer3.0.downsample.0",
    "layer4.0.conv2",
    "layer4.0.downsample.0",
]


@pytest.mark.parametrize("size", [224, 225])
def test_resnet50_has_exactly_its_eight_downsampling_sites(
    fresh_model: Callable[..., nn.Module], size: int
) -> None:
    model = fresh_model("resnet50")
    result = scan(model, torch.randn(1, 3, size, size))
    assert [s.name for s in result.downsampling] == RESNET50_SITES
    assert [s.role for s in result.sites if s.name == "avgpool"] == ["global_pool"]
    for site in result.sites:
        assert expected_output_shape(site) == site.out_shape, site.name
    conv1, maxpool = result.sites[0], result.sites[1]
    half = (size + 1) // 2
    assert conv1.out_shape == (1, 64, half, half)
    assert maxpool.out_shape == (1, 64, (half + 1) // 2, (half + 1) // 2)
    assert [s.stage_in for s in result.downsampling] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert all(s.found_by == "fx" for s in result.sites)


def test_resnet50_neighbours_show_norm_activation_and_consumer(
    fresh_model: Callable[..., nn.Module],
) -> None:
    result = scan(fresh_model("resnet50"), torch.randn(1, 3, 64, 64))
    site = next(s for s in result.sites if s.name == "layer2.0.conv2")
    assert [(n.kind, n.target) for n in site.after] == [
        ("norm", "layer2.0.bn2"),
        ("act", "layer2.0.relu"),
        ("conv", "layer2.0.conv3"),
    ]
    assert site.after[1].shared, "torchvision's Bottleneck calls one ReLU three times"
    shortcut = next(s for s in result.sites if s.name == "layer2.0.downsample.0")
    assert [n.kind for n in shortcut.after] == ["norm", "add"]


def test_inception_v3_functional_max_pools_are_sites() -> None:
    model = load_model("inception_v3", kwargs={"init_weights": False}).model
    result = scan(model, torch.randn(1, 3, 299, 299))
    functional = [s for s in result.sites if s.functional]
    assert [s.name for s in functional] == ["Mixed_6a:max_pool2d", "Mixed_7a:max_pool2d_1"]
    assert all(s.op == "max_pool" and s.stride == (2, 2) for s in functional)
    for site in result.sites:
        assert expected_output_shape(site) == site.out_shape, site.name


def test_detection_model_backbone_sites_are_found_by_tracing_the_backbone() -> None:
    loaded = load_model("fasterrcnn_resnet50_fpn")
    result = scan(loaded.model, example_inputs(loaded.task, (3, 96, 96)))
    names = [s.name for s in result.downsampling]
    assert names[:8] == ["backbone.body." + n for n in RESNET50_SITES]
    assert "backbone.fpn.extra_blocks:max_pool2d" in names
    assert {s.found_by for s in result.downsampling} == {"fx (backbone)"}
    assert any(path == "" and method == "fx" for path, method, _ in result.failures)
    assert "fx (backbone)" in result.summary()


def test_vit_patch_embedding_is_listed_as_patchify_not_downsampling() -> None:
    model = load_model("timm:vit_tiny_patch16_224").model
    result = scan(model, torch.randn(1, 3, 224, 224))
    assert result.downsampling == ()
    (patch,) = [s for s in result.sites if s.role == "patchify"]
    assert patch.name == "patch_embed.proj" and patch.kernel == patch.stride == (16, 16)


class _Flow(nn.Module):
    """Fails fx (data-dependent branch) and torch.export: only hooks can see inside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.conv(x)


class _ShapeBranch(nn.Module):
    """Fails fx (branch on a shape) but torch.export handles it; has a functional pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = x + 1
        return F.max_pool2d(x, 2)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.flow = _Flow()
        self.branch = _ShapeBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[0])):  # fine for fx, but:
            if x.mean() > 100:  # data-dependent: the whole model does not trace
                break
        return self.branch(self.flow(self.stem(x)))


def test_fallback_chain_reports_the_method_per_region() -> None:
    result = scan(_Mixed().eval(), torch.randn(1, 3, 32, 32))
    found = {s.name: s.found_by for s in result.sites}
    assert found == {
        "stem.0": "fx (stem)",
        "flow.conv": "hooks (flow)",
        "branch:max_pool2d": "export (branch)",
    }
    methods = {(r.path, r.method) for r in result.regions}
    assert {("stem", "fx"), ("flow", "hooks"), ("branch", "export")} <= methods
    for site in result.sites:
        assert expected_output_shape(site) == site.out_shape, site.name


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        ("resnet18", 97),
        ("mobilenet_v3_small", 101),
        ("googlenet", 99),  # ceil_mode max pools
        ("timm:tf_efficientnet_b0", 123),  # TF "same" padding
        ("timm:convnext_atto", 96),  # patchify stem and downsample layers
        ("regnet_x_400mf", 75),
        ("densenet121", 67),  # average-pool transitions
    ],
)
def test_arithmetic_equals_the_forward_pass_at_odd_sizes(spec: str, size: int) -> None:
    loaded = load_model(spec, kwargs={"init_weights": False} if spec == "googlenet" else None)
    result = scan(loaded.model, torch.randn(1, 3, size, size))
    assert result.sites
    for site in result.sites:
        assert expected_output_shape(site) == site.out_shape, f"{spec} {site.name}"


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["conv", "max", "avg"]),
    dims=st.sampled_from([1, 2, 3]),
    kernel=st.integers(1, 5),
    stride=st.integers(2, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    ceil=st.booleans(),
    size=st.integers(9, 17),
)
def test_arithmetic_matches_for_random_layers(
    kind: str,
    dims: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    ceil: bool,
    size: int,
) -> None:
    padding = min(padding, kernel // 2)
    layer: nn.Module
    if kind == "conv":
        layer = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](2, 3, kernel, stride, padding, dilation)
    elif kind == "max":
        layer = [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d][dims - 1](
            kernel, stride, padding, dilation, ceil_mode=ceil
        )
    else:
        layer = [nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d][dims - 1](
            kernel, stride, padding, ceil_mode=ceil
        )
    model = nn.Sequential(layer)
    result = scan(model, torch.randn(1, 2, *([size] * dims)))
    for site in result.sites:
        assert expected_output_shape(site) == site.out_shape, site
