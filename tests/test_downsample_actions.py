"""The `haar`, `lip`, `softpool` and `sfm` actions: exact where the maths allows (and the
report says so per site), on torchvision and timm models at odd sizes, through save/load bit
for bit, exported to ONNX and TorchScript, and all or nothing when a later site fails."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import surgeon
from surgeon import rewrites
from surgeon.edits import ModelEditor
from surgeon.errors import PatchError
from surgeon.export import export
from surgeon.layers.haar import HaarConv
from surgeon.layers.lip import LocalImportancePool
from surgeon.layers.msau import AdaptiveUpsampling
from surgeon.layers.sfm import AdaptiveResampling
from surgeon.layers.softpool import SoftPool
from surgeon.models import LoadedModel, load_model
from surgeon.patch import PatchReport, patch, resolve_policy
from surgeon.policy import Policy
from surgeon.policy_loader import policy_from_dict
from surgeon.report import patch_json, patch_markdown, render_patch
from surgeon.report_html import patch_html
from surgeon.rewrites import Edit, action_schemas
from surgeon.schema import ActionSchema
from surgeon.sites import Site

ACTIONS = ("haar", "lip", "softpool", "sfm")


def _policy(*rules: dict[str, Any]) -> Policy:
    data = {"name": "test", "description": "", "rules": list(rules)}
    return policy_from_dict(data, action_schemas())


def _relative(want: torch.Tensor, got: torch.Tensor) -> float:
    assert got.shape == want.shape, f"output shape {tuple(got.shape)} != {tuple(want.shape)}"
    return ((got - want).abs().max() / want.abs().max()).item()


def _patched(
    model: nn.Module, policy: Policy | str, x: torch.Tensor
) -> tuple[nn.Module, nn.Module, PatchReport]:
    original = copy.deepcopy(model).eval()
    patched, report = patch(model, policy, x)
    return original, patched.eval(), report


def _rows(report: PatchReport) -> dict[str, Any]:
    return {r.site: r for r in report.rows if r.status == "patched"}


# --------------------------------------------------------------------------------- haar


class _Strided(nn.Module):
    """Kernel-2 stride-2 convolutions: dense, grouped and depthwise, with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dense = nn.Conv2d(8, 16, 2, 2)
        self.grouped = nn.Conv2d(16, 32, 2, 2, groups=4, bias=False)
        self.depthwise = nn.Conv2d(32, 32, 2, 2, groups=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(F.relu(self.grouped(F.relu(self.dense(self.stem(x))))))


@pytest.mark.parametrize("kernel_size", [None, 1])
def test_haar_is_exact_from_kernel_2_stride_2_convolutions_including_grouped_ones(
    kernel_size: int | None,
) -> None:
    torch.manual_seed(0)
    params = {} if kernel_size is None else {"kernel_size": kernel_size}
    policy = _policy({"match": {"role": "any", "op": "conv"}, "action": "haar", "params": params})
    x = torch.randn(2, 3, 23, 19)  # odd sizes: the last row and column are never read
    original, patched, report = _patched(_Strided().eval(), policy, x)
    rows = _rows(report)
    assert set(rows) == {"dense", "grouped", "depthwise"}, rows
    for name, row in rows.items():
        assert row.transfer == "exact", f"{name}: {row.transfer} ({row.note})"
        assert row.rel_diff is not None and row.rel_diff <= 1e-5, f"{name}: {row.rel_diff}"
        layer = patched.get_submodule(name)
        assert isinstance(layer, HaarConv) and layer.conv.kernel_size == (1, 1)
    assert rows["grouped"].replacement == "Haar + conv k1 64→32 g4"
    assert patched.depthwise.conv.groups == 32
    with torch.no_grad():
        assert _relative(original(x), patched(x)) <= 1e-5
        other = torch.randn(1, 3, 16, 17)
        assert _relative(original(other), patched(other)) <= 1e-5, "exact at another size"


def test_haar_says_per_site_whether_its_transfer_is_exact_and_why(
    fresh_model: Callable[..., nn.Module],
) -> None:
    x = torch.randn(1, 3, 45, 45)
    _, _, exact = _patched(fresh_model("resnet18"), "haar", x)
    rows = {r.site: r for r in exact.rows}
    assert rows["maxpool"].status == "kept", "the built-in policy keeps max pools"
    assert rows["conv1"].replacement == "Haar + conv k4 12→64"
    assert all(r.transfer == "exact" for r in _rows(exact).values())
    assert exact.output_rel_diff <= 1e-5

    paper = _policy({"match": {"op": "conv"}, "action": "haar", "params": {"kernel_size": 1}})
    _, _, report = _patched(fresh_model("resnet18"), paper, x)
    rows = _rows(report)
    assert rows["layer2.0.downsample.0"].transfer == "exact"  # 1×1 stride-2: one tap
    assert rows["layer2.0.conv1"].transfer == "approximate"
    assert rows["layer2.0.conv1"].note == (
        "inner kernel 1 is smaller than 2, the size that reproduces k3 s2: it keeps the middle taps"
    )


def test_haar_takes_convnext_patchify_downsamplers_when_a_rule_asks_for_that_role(
    fresh_model: Callable[..., nn.Module],
) -> None:
    x = torch.randn(1, 3, 45, 45)
    original, patched, report = _patched(fresh_model("timm:test_convnext"), "haar", x)
    rows = {r.site: r for r in report.rows}
    assert rows["stem.0"].status == "not-a-site", "a stride-4 patchify stem is no haar site"
    done = _rows(report)
    assert done and all(name.endswith("downsample.1") for name in done), done
    assert all(
        r.transfer == "exact" and r.replacement.startswith("Haar + conv k1") for r in done.values()
    )
    with torch.no_grad():
        assert _relative(original(x), patched(x)) <= 1e-5


def test_haar_skips_what_it_cannot_transform_with_the_reason() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 5, 3, padding=2),
        nn.AvgPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(4, 4, 3, 2, padding=1, padding_mode="reflect"),
    ).eval()
    policy = _policy({"match": {}, "action": "haar"})
    _, report = patch(model, policy, torch.randn(1, 3, 33, 33))
    notes = {r.site: r.note for r in report.rows}
    assert report.patched == 0
    assert notes["0"].startswith("haar replaces stride-2 layers"), notes
    assert notes["1"].startswith("pooling with ceil_mode: its last window has no 2×2 block")
    assert "padding_mode='reflect'" in notes["2"]


# --------------------------------------------------------------------------------- lip


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2, 2),
        nn.AvgPool2d(3, 2, 1),
        nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.AvgPool2d(3, 2, 1, ceil_mode=True),
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
    ],
    ids=["k2", "padded", "padding-excluded", "ceil", "ceil-excluded"],
)
def test_lip_is_exact_from_average_pools_at_init(pool: nn.Module, size: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), pool).eval()
    x = torch.randn(2, 3, size, size)
    original, patched, report = _patched(model, "lip", x)
    (row,) = _rows(report).values()
    assert row.transfer == "exact", row.note
    assert isinstance(patched[1], LocalImportancePool)
    with torch.no_grad():
        assert _relative(original(x), patched(x)) <= 1e-5, f"{pool} at {size}"


def test_lip_from_a_max_pool_is_approximate_and_its_logit_can_be_depthwise(
    fresh_model: Callable[..., nn.Module],
) -> None:
    policy = _policy(
        {"match": {"op": "max_pool"}, "action": "lip", "params": {"logit": "depthwise"}}
    )
    _, patched, report = _patched(fresh_model("resnet18"), policy, torch.randn(1, 3, 45, 45))
    row = _rows(report)["maxpool"]
    assert row.transfer == "approximate" and row.note.startswith("max pooling has no linear")
    assert row.replacement == "LIP k3 s2 (depthwise logit)"
    assert row.params_after == 64 * 9 + 2 * 64, "depthwise 3×3 logit conv and its norm"
    assert patched.maxpool.logit[0].groups == 64


# --------------------------------------------------------------------------------- softpool


def test_softpool_replaces_pools_over_the_same_windows_and_is_approximate() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(1, 2)
    ).eval()
    x = torch.randn(2, 3, 11, 11)
    original, patched, report = _patched(model, "softpool", x)
    rows = _rows(report)
    assert rows["1"].transfer == "approximate" and rows["1"].rel_diff > 1e-3
    assert rows["2"].transfer == "exact", "one element per window: the element itself"
    assert isinstance(patched[1], SoftPool) and patched[1].ceil_mode
    assert report.params_after == report.params_before, "SoftPool has no parameters"
    with torch.no_grad():
        assert patched(x).shape == original(x).shape


# --------------------------------------------------------------------------------- sfm


def test_sfm_is_exact_at_init_on_resnet18(fresh_model: Callable[..., nn.Module]) -> None:
    x = torch.randn(1, 3, 45, 45)
    original, patched, report = _patched(fresh_model("resnet18"), "sfm", x)
    rows = _rows(report)
    assert len(rows) == 8, "every strided conv and the max pool"
    for name, row in rows.items():
        assert row.transfer == "exact" and row.rel_diff is not None and row.rel_diff <= 1e-5, name
        assert isinstance(patched.get_submodule(name)[0], AdaptiveResampling)
    assert rows["maxpool"].replacement == "ARS (radius 2) → MaxPool2d"
    assert ("conv1.weight", "conv1.1.weight") in report.keys_renamed
    with torch.no_grad():
        assert _relative(original(x), patched(x)) <= 1e-5


def test_sfm_is_exact_at_init_on_a_segmentation_model_and_follows_its_input_size(
    fresh_model: Callable[..., nn.Module],
) -> None:
    x = torch.randn(1, 3, 45, 45)
    original, patched, report = _patched(fresh_model("fcn_resnet50"), "sfm", x)
    upsample = _rows(report)[":interpolate"]
    assert upsample.transfer == "exact" and upsample.replacement.startswith("MSAU bilinear")
    assert isinstance(patched.interpolate_sfm, AdaptiveUpsampling)
    assert all(r.transfer == "exact" for r in _rows(report).values())
    assert report.output_rel_diff <= 1e-5
    with torch.no_grad():
        other = torch.randn(2, 3, 37, 52)  # the upsampling reads the input's size at run time
        assert _relative(original(other)["out"], patched(other)["out"]) <= 1e-5


class _Decoder(nn.Module):
    """Upsampling three ways: a module, a scale factor, and the input's size read at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, 4, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(y, scale_factor=2, mode="nearest")


def test_sfm_upsamples_modules_scale_factors_and_run_time_sizes() -> None:
    policy = _policy({"match": {"role": "upsample"}, "action": "sfm"})
    x = torch.randn(1, 3, 15, 17)
    original, patched, report = _patched(_Decoder().eval(), policy, x)
    rows = _rows(report)
    assert rows["up"].transfer == "exact" and rows[":interpolate"].transfer == "exact"
    assert rows[":interpolate_1"].transfer == "approximate"
    assert rows[":interpolate_1"].note == "nearest interpolation: starts as bilinear"
    assert patched.up.align_corners and patched.up.scale_factor == [2.0, 2.0]
    t = torch.randn(1, 3, 21, 10)
    with torch.no_grad():  # what the patched model starts as: bilinear where it was nearest
        y = F.interpolate(original.up(original.down(t)), size=t.shape[-2:], mode="bilinear")
        want = F.interpolate(y, scale_factor=2, mode="bilinear")
        assert _relative(want, patched(t)) <= 1e-5


def test_sfm_keeps_a_constant_upsampling_size_in_the_layer() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv2d(3, 4, 3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(self.down(x), size=(20, 24), mode="bilinear")

    policy = _policy({"match": {"role": "upsample"}, "action": "sfm"})
    x = torch.randn(1, 3, 9, 11)
    original, patched, report = _patched(Fixed().eval(), policy, x)
    assert _rows(report)[":interpolate"].transfer == "exact"
    assert patched.interpolate_sfm.size == [20, 24]
    assert all(not n.kwargs for n in patched.graph.nodes if n.op == "call_module")
    with torch.no_grad():
        other = torch.randn(2, 3, 14, 13)
        assert _relative(original(other), patched(other)) <= 1e-5


def test_sfm_leaves_broadcasts_and_transposed_convolutions_alone() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.up = nn.ConvTranspose2d(3, 3, 2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            glob = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear")
            return self.up(x + glob)

    policy = _policy({"match": {"role": "upsample"}, "action": "sfm"})
    _, report = patch(Head().eval(), policy, torch.randn(1, 3, 9, 9))
    notes = {r.site: r.note for r in report.rows if r.status == "skipped"}
    assert notes == {
        ":interpolate": "a 1×1 map: the interpolation is a broadcast, nothing to resample",
        "up": "sfm's adaptive upsampling replaces interpolation; this site is conv transpose",
    }


class _Pyramid(nn.Module):
    """Takes a dict of maps, as torchvision's FeaturePyramidNetwork does: it traces inside its
    parent's graph, not on its own."""

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        names = list(feats.keys())
        fine = feats[names[0]]
        return fine + F.interpolate(feats[names[-1]], size=fine.shape[-2:], mode="bilinear")


class _Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.c2 = nn.Conv2d(4, 4, 3, 2, 1)
        self.fpn = _Pyramid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        return self.fpn({"a": a, "b": self.c2(a)})


def test_a_call_whose_owner_does_not_trace_alone_is_skipped_and_the_rest_patched() -> None:
    x = torch.randn(1, 3, 17, 17)
    original, patched, report = _patched(_Detector().eval(), "sfm", x)
    rows = {r.site: r for r in report.rows}
    assert rows["fpn:interpolate"].status == "skipped"
    assert rows["fpn:interpolate"].note == "fpn does not trace with torch.fx (TraceError)"
    assert rows["c1"].status == rows["c2"].status == "patched"
    with torch.no_grad():
        assert _relative(original(x), patched(x)) <= 1e-5


# ------------------------------------------------------------------- models, checkpoints


@pytest.fixture(scope="module")
def sources() -> dict[str, LoadedModel]:
    """Source models as `load_model` builds them, once per module (tests patch copies)."""
    return {name: load_model(name, seed=0) for name in ("resnet18", "timm:test_resnet")}


@pytest.mark.parametrize(
    ("name", "policy"),
    [*(("resnet18", action) for action in ACTIONS), ("timm:test_resnet", "mixed")],
)
def test_every_action_runs_at_an_odd_size_and_round_trips_bit_for_bit(
    name: str, policy: str, sources: dict[str, LoadedModel], tmp_path: Path
) -> None:
    """Each built-in policy on torchvision's resnet18; all four actions at once on a timm
    ResNet-D (its max pool, ceil_mode average pools and strided convs)."""
    source = sources[name]
    loaded = replace(source, model=copy.deepcopy(source.model), input_size=(3, 45, 45))
    x = torch.randn(2, 3, 45, 45, generator=torch.Generator().manual_seed(1))
    chosen = _policy(*MIXED) if policy == "mixed" else resolve_policy(policy)
    model, report = patch(loaded.model, chosen, x[:1], seed=3)
    actions = {r.action for r in report.rows if r.status == "patched"}
    assert actions == (set(ACTIONS) if policy == "mixed" else {policy}), report.rows
    directory = surgeon.save(tmp_path / "ckpt", model, loaded, report, chosen, seed=3)
    back = surgeon.load(directory)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), back(x)), f"{policy} on {name}: the reload differs"
    assert back.state_dict().keys() == model.state_dict().keys()


def test_a_run_time_upsampling_size_survives_save_load_and_export(
    tmp_path: Path,
) -> None:
    loaded = load_model("tests.test_downsample_actions:segmenter", seed=0)
    loaded.input_size = (3, 21, 21)
    model, report = patch(loaded.model, "sfm", torch.randn(1, 3, 21, 21))
    directory = surgeon.save(tmp_path / "ckpt", model, loaded, report, "sfm")
    manifest = json.loads((directory / "surgery.json").read_text())
    (call,) = [e for e in manifest["history"][0]["edits"] if e["op"] == "replace_call"]
    assert call["keywords"] == ["size"] and call["module"]["type"] == "AdaptiveUpsampling"
    trust = ["tests.test_downsample_actions:segmenter"]
    back = surgeon.load(directory, trust_import=trust)
    x = torch.randn(2, 3, 30, 27)
    with torch.no_grad():
        out = back(x)
        assert out.shape == (2, 5, 30, 27) and torch.equal(model.eval()(x), out)
    result = export(directory, "onnx", trust_import=trust)  # what `surgeon export DIR` runs
    assert [c.input_shape for c in result.checks] == [(1, 3, 21, 21), (2, 3, 15, 15)]
    assert all(c.rel_diff <= 1e-4 for c in result.checks), result.checks


class _Segmenter(nn.Module):
    """A strided encoder and a decoder that upsamples to the input's size in its own forward,
    as torchvision's segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 5, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.encoder(x), size=x.shape[-2:], mode="bilinear")


def segmenter() -> nn.Module:
    """The `_Segmenter` test model (a factory `load_model` can name)."""
    return _Segmenter()


MIXED = [
    {"match": {"op": "max_pool"}, "action": "lip"},
    {"match": {"op": "avg_pool"}, "action": "softpool"},  # ceil_mode pools in timm's ResNet-D
    {"match": {"name": "layer2.*"}, "action": "haar"},
    {"match": {"op": "conv"}, "action": "sfm"},
]


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_each_action_exports_and_matches_eager_pytorch_at_two_sizes(
    format: str, fresh_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    x = torch.randn(1, 3, 45, 45)
    model, report = patch(fresh_model("timm:test_resnet"), _policy(*MIXED), x)
    assert {r.action for r in report.rows if r.status == "patched"} == set(ACTIONS)
    segment, _ = patch(segmenter().eval(), "sfm", torch.randn(1, 3, 21, 21))
    for name, exported, example in (("resnet", model, x), ("segmenter", segment, x[..., :21, :21])):
        result = export(exported, format, tmp_path / f"{name}.{format}", example_input=example)
        assert len(result.checks) == 2, result.checks
        assert all(c.rel_diff <= 1e-4 for c in result.checks), (name, result.checks)


# --------------------------------------------------------------------------------- reports


def test_report_rows_carry_the_action_transfer_and_reason_in_every_format(
    fresh_model: Callable[..., nn.Module],
) -> None:
    _, report = patch(fresh_model("timm:test_resnet"), _policy(*MIXED), torch.randn(1, 3, 45, 45))
    console = Console(width=200, file=io.StringIO(), color_system=None)
    render_patch(report, console)
    table = console.file.getvalue()  # type: ignore[attr-defined]
    for text in ("LIP k3 s2 (dense logit)", "SoftPool k2 s2", "Haar + conv k2", "ARS (radius 2)"):
        assert text in table, text
        assert text in patch_markdown(report) and text in patch_html(report), text
    rows = json.loads(patch_json(report))["rows"]
    by_site = {r["site"]: r for r in rows}
    assert by_site["maxpool"]["action"] == "lip" and by_site["maxpool"]["transfer"] == "approximate"
    assert by_site["maxpool"]["note"].startswith("max pooling has no linear equivalent")
    assert by_site["layer2.0.conv1"]["transfer"] == "exact"


# --------------------------------------------------------------------------------- rollback


class _Fails:
    """A test action whose layer fails verification (it has other output channels)."""

    schema = ActionSchema("fail-late", {}, "test: a later site fails")

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        editor.replace(site.module, nn.Conv2d(site.in_channels, 5, 1, stride=site.stride))
        return Edit(site.name, "fail-late", "wrong", "random", (site.module,), site.module)


@pytest.fixture
def failing_action(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(rewrites._REGISTRY, "fail-late", _Fails())
    yield


@pytest.mark.usefixtures("failing_action")
def test_a_late_failure_leaves_the_model_untouched_after_all_four_actions(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("timm:test_resnet")
    modules = dict(model.named_modules())
    state = {k: (t, t.detach().clone()) for k, t in model.state_dict(keep_vars=True).items()}
    policy = _policy(
        *MIXED[:3], {"match": {"name": "layer4.0.conv1"}, "action": "fail-late"}, MIXED[3]
    )
    with pytest.raises(PatchError):
        patch(model, policy, torch.randn(1, 3, 45, 45))
    assert dict(model.named_modules()) == modules, "a module was replaced and not put back"
    after = model.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    for key, (tensor, values) in state.items():
        assert after[key] is tensor and torch.equal(tensor.detach(), values), key
