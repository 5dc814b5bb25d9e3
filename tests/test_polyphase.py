"""`aps` and `lps` on small models: placement, shared components at joins, strides 3 and 4,
per-sample selection, the `Link` edit, checkpoints, rollback, export and the CLI.

The whole-model claims (invariance of torchvision and timm models, LPS exact at init) are in
tests/test_polyphase_models.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import surgeon
from surgeon.checkpoint import read_checkpoint
from surgeon.edits import EditError, Link, ModelEditor, op_from_dict, op_to_dict, perform
from surgeon.errors import CheckpointError, PatchError
from surgeon.export import export
from surgeon.layers import AdaptivePolyphaseSampling, LearnablePolyphaseSampling
from surgeon.models import load_model
from surgeon.patch import PatchReport
from surgeon.policy import Policy
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import action_schemas
from surgeon.rewrites import polyphase as polyphase_rewrite
from tests.clirun import run_cli

TINY = "tests.tiny_models:tiny_resnet"
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Strides(nn.Module):
    """A stride-3 conv, a stride-4 max pool, and a residual block at stride 3 (total 36)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 5, 3, 2)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(5, 4, 2)
        self.conv1 = nn.Conv2d(6, 8, 3, 3, 1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.shortcut = nn.Conv2d(6, 8, 1, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.stem(x)))
        y = self.conv2(self.relu(self.bn(self.conv1(x)))) + self.shortcut(x)
        return self.fc(y.mean((2, 3)))


class ParallelPool(nn.Module):
    """A strided conv and a functional max pool side by side, added: the call must follow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 2, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x) + F.max_pool2d(x, 3, 2, 1)
        return self.fc(y.mean((2, 3)))


class HeadFolded(nn.Module):
    """MViT's shape: the main path pools with the samples folded with two heads (batch x 2), the
    skip path pools the batch; the two meet at an add."""

    def __init__(self) -> None:
        super().__init__()
        self.pool_q = nn.Conv2d(2, 2, 3, 2, 1)
        self.pool_skip = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q = self.pool_q(x.reshape(n * 2, c // 2, h, w))
        y = q.reshape(n, c, q.shape[2], q.shape[3]) + self.pool_skip(x)
        return self.fc(y.mean((2, 3)))


def _policy(action: str, padding: str = "keep", **params: object) -> Policy:
    data = {
        "name": f"test-{action}",
        "description": "every downsampling site",
        "padding": padding,
        "rules": [{"match": {}, "action": action, "params": params}],
    }
    return policy_from_dict(data, action_schemas())


def _samplers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (AdaptivePolyphaseSampling, LearnablePolyphaseSampling)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _linked(model: nn.Module, leader: str, follower: str) -> bool:
    a, b = model.get_submodule(leader), model.get_submodule(follower)
    return a.role == "leader" and b.role == "follower" and a._link is b._link is not None


# --------------------------------------------------------------------------- placement


def test_aps_places_samplers_as_the_paper_and_links_the_shortcut() -> None:
    model, report = surgeon.patch(load_model(TINY, seed=0).model, _policy("aps"), X)
    rows = {r.site: r for r in report.rows if r.status == "patched"}
    assert set(rows) == {
        "conv1",
        "maxpool",
        "layer1.conv1",
        "layer1.downsample.0",
        "head:max_pool2d",
    }
    assert rows["conv1"].replacement == "conv s1 → ReLU → APS(s2)"  # the unshared ReLU
    assert rows["layer1.conv1"].replacement == "conv s1 → ReLU → APS(s2) → Conv2d"  # shared
    assert rows["layer1.downsample.0"].replacement == "APS(s2) → conv s1"  # pointwise: first
    assert rows["maxpool"].replacement == "MaxPool2d(k3, s1) + APS(s2)"
    assert all(r.transfer == "approximate" for r in rows.values())
    assert "taken by layer1.downsample.0" in rows["layer1.conv1"].note
    assert "takes the component of layer1.conv1" in rows["layer1.downsample.0"].note
    assert _linked(model, "layer1.conv2.0", "layer1.downsample.0.0")
    assert model.layer1.conv1.stride == (1, 1) and model.conv1.stride == (1, 1)
    links = [op for op in report.ops if isinstance(op, Link)]
    assert links == [Link("layer1.conv2.0", ("layer1.downsample.0.0",))]
    # the relu keeps its keys; the consumer and the shortcut conv are wrapped
    assert ("layer1.conv2.weight", "layer1.conv2.1.weight") in report.keys_renamed


def test_a_functional_pool_beside_a_strided_conv_follows_it() -> None:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    model, report = surgeon.patch(ParallelPool(), _policy("aps"), x)
    assert report.patched == 2
    follower = next(p for p, m in _samplers(model).items() if m.role == "follower")
    assert _linked(model, "conv.1", follower)
    # the link names the module the call replacement put in, so it comes after it
    kinds = [type(op).__name__ for op in report.ops]
    assert kinds.index("Link") > kinds.index("ReplaceCall")
    model.eval()(x)


def test_a_join_with_a_layer_left_strided_is_reported() -> None:
    data = {
        "name": "main-path-only",
        "description": "aps on the main path, the shortcut kept",
        "rules": [
            {"match": {"name": "layer1.downsample.0"}, "action": "keep"},
            {"match": {}, "action": "aps"},
        ],
    }
    policy = policy_from_dict(data, action_schemas())
    model, report = surgeon.patch(load_model(TINY, seed=0).model, policy, X)
    row = next(r for r in report.rows if r.site == "layer1.conv1")
    assert "also takes layer1.downsample.0, which does not share this component" in row.note
    assert model.layer1.conv2[0].role == "alone"


@pytest.mark.parametrize("action", ["aps", "lps"])
def test_samplers_whose_batches_differ_select_alone_and_the_join_is_reported(action: str) -> None:
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    model, report = surgeon.patch(HeadFolded(), _policy(action), x)
    assert report.patched == 2
    assert {m.role for m in _samplers(model).values()} == {"alone"}
    assert not any(isinstance(op, Link) for op in report.ops)
    row = next(r for r in report.rows if r.site == "pool_q")
    assert "also takes pool_skip, whose input batch is 3 against 6 here" in row.note
    model.eval()(torch.randn(5, 4, 12, 12))  # any batch: no selection is shared


def test_a_group_norm_keeps_the_sampler_before_it_so_lps_stays_exact() -> None:
    # a group norm's statistics span the map: taking a component after it is not the same
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3, 2, 1)
    ).eval()
    x = torch.randn(2, 3, 17, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    patched, report = surgeon.patch(model, _policy("lps"), x[:1])
    assert report.rows[0].replacement == "conv s1 → LPS(s2)"
    with torch.no_grad():
        assert torch.allclose(patched.eval()(x), expected, atol=1e-5)


def test_a_ceil_mode_pool_is_skipped_with_the_reason() -> None:
    model = load_model(TINY, seed=0).model
    model.maxpool.ceil_mode = True
    _, report = surgeon.patch(model, _policy("aps"), X)
    row = next(r for r in report.rows if r.site == "maxpool")
    assert row.status == "skipped" and "ceil_mode" in row.note


# --------------------------------------------------------------------------- strides, batches


def test_stride_three_and_four_sites_are_invariant_with_circular_padding() -> None:
    size = 72  # 2 × 36, the total stride
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    model, report = surgeon.patch(Strides(), _policy("aps", "circular"), x)
    strides = {r.site: r.replacement for r in report.rows if r.status == "patched"}
    assert strides["stem"].endswith("APS(s3)") and strides["pool"].endswith("APS(s4)")
    assert _linked(model, "relu.1", "shortcut.0")
    shifts = [(d, (5 * d + 1) % size) for d in range(size)]  # every row and column shift
    with torch.no_grad():
        out = model.eval()(torch.cat([torch.roll(x, s, dims=(2, 3)) for s in [(0, 0), *shifts]]))
    assert (out - out[:1]).abs().max() <= 1e-5 * out.abs().max()


def test_lps_is_exact_at_stride_three_and_four() -> None:
    model = Strides().eval()
    x = torch.randn(2, 3, 40, 41, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    patched, report = surgeon.patch(model, _policy("lps"), x[:1])
    assert report.patched == 4 and report.output_rel_diff <= 1e-5
    with torch.no_grad():
        got = patched.eval()(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("action", ["aps", "lps"])
def test_batched_inputs_pick_per_sample(action: str) -> None:
    # a one-row circular shift moves every component to another index, so the two samples
    # need different components: one choice per batch would change one of them
    x = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(2))
    params = {"margin": 0.0} if action == "lps" else {}
    model, _ = surgeon.patch(Strides(), _policy(action, "circular", **params), x)
    model.eval()
    batch = torch.cat([x, torch.roll(x, 1, dims=2), torch.randn_like(x)])
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(sample[None]) for sample in batch])
    assert torch.allclose(together, alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the Link edit


def test_link_round_trips_as_data_and_undoes_to_the_previous_links() -> None:
    model = nn.ModuleDict(
        {
            "a": AdaptivePolyphaseSampling(3, role="leader"),
            "b": AdaptivePolyphaseSampling(3, role="follower"),
        }
    )
    op = op_from_dict(json.loads(json.dumps(op_to_dict(Link("a", ("b",))))))
    assert op == Link("a", ("b",))
    _, undo = perform(model, op)
    assert model["a"]._link is model["b"]._link is not None
    undo()
    assert model["a"]._link is None and model["b"]._link is None


def test_link_refuses_layers_that_cannot_be_linked() -> None:
    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 3, 1),
            "alone": AdaptivePolyphaseSampling(3),
            "follower": AdaptivePolyphaseSampling(3, role="follower"),
        }
    )
    with pytest.raises(EditError, match=r"Conv2d at 'conv' is not .* with a link") as exc:
        perform(model, Link("conv", ("follower",)))
    assert exc.value.field == "leader"
    with pytest.raises(EditError, match="role='leader'") as exc:
        perform(model, Link("alone", ("follower",)))
    assert exc.value.field == "followers"
    with pytest.raises(EditError, match="no module 'nope'"):
        perform(model, Link("alone", ("nope",)))


def test_set_attrs_switches_a_conv_to_circular_padding_and_back() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))
    editor = ModelEditor(model)
    editor.set_attrs("0", padding_mode="circular")
    x = torch.randn(1, 2, 5, 5)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), model[0].weight, model[0].bias)
    assert torch.allclose(model(x), expected, atol=1e-6)
    editor.rollback()
    assert model[0].padding_mode == "zeros"
    with pytest.raises(EditError, match="padding_mode 'wrap'"):
        editor.set_attrs("0", padding_mode="wrap")
    with pytest.raises(EditError, match="no 'padding_mode'"):
        ModelEditor(nn.Sequential(nn.MaxPool2d(2))).set_attrs("0", padding_mode="circular")


# --------------------------------------------------------------------------- patch, verify, undo


def test_a_follower_that_runs_before_its_leader_fails_verification_and_rolls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the leader must be whichever runs first: reverse the order and verification must catch it
    real = polyphase_rewrite._Graphs.position
    monkeypatch.setattr(
        polyphase_rewrite._Graphs,
        "position",
        lambda self, site, node, offset: -real(self, site, node, offset),
    )
    model = load_model(TINY, seed=0).model
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    geometry = {
        n: (getattr(m, "stride", None), getattr(m, "padding_mode", None))
        for n, m in modules.items()
    }
    with pytest.raises(PatchError, match=r"fails in layer1\.conv2\.0 .*leader must run first"):
        surgeon.patch(model, _policy("aps", "circular"), X)
    assert dict(model.named_modules()) == modules, "modules were not put back"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {
        n: (getattr(m, "stride", None), getattr(m, "padding_mode", None))
        for n, m in model.named_modules()
    } == geometry
    assert not _samplers(model)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("policy", ["aps-circular", "lps"])
def test_checkpoint_round_trip_relinks_and_gives_identical_outputs(
    tmp_path: Path, policy: str
) -> None:
    loaded = load_model(TINY, seed=0)
    loaded.input_size = (3, 32, 32)
    model, report = surgeon.patch(loaded.model, policy, X)
    surgeon.save(tmp_path / "ckpt", model, loaded, report, policy)
    rebuilt = surgeon.load(tmp_path / "ckpt", trust_import=[TINY])
    assert _linked(rebuilt, "layer1.conv2.0", "layer1.downsample.0.0"), "the link was not restored"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    manifest, _ = read_checkpoint(tmp_path / "ckpt")
    entry = manifest["history"][0]
    assert {
        "op": "link",
        "leader": "layer1.conv2.0",
        "followers": ["layer1.downsample.0.0"],
    } in entry["edits"]
    if policy == "aps-circular":
        assert entry["policy"]["padding"] == "circular"
        assert entry["summary"]["padding"] and rebuilt.conv1.padding_mode == "circular"


def test_a_checkpoint_whose_link_names_no_sampler_is_refused(tmp_path: Path) -> None:
    loaded = load_model(TINY, seed=0)
    loaded.input_size = (3, 32, 32)
    model, report = surgeon.patch(loaded.model, "aps", X)
    surgeon.save(tmp_path / "ckpt", model, loaded, report, "aps")
    path = tmp_path / "ckpt" / "surgery.json"
    manifest = json.loads(path.read_text())
    edits = manifest["history"][0]["edits"]
    index = next(i for i, e in enumerate(edits) if e["op"] == "link")
    edits[index]["leader"] = "layer1.conv1"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"edits\[{index}\]\.leader'.*Conv2d"):
        surgeon.load(tmp_path / "ckpt", trust_import=[TINY])


# --------------------------------------------------------------------------- export, CLI


@pytest.mark.parametrize("policy", ["aps-circular", "lps"])
def test_export_traces_linked_samplers_and_checks_two_sizes(tmp_path: Path, policy: str) -> None:
    pytest.importorskip("onnxruntime")
    model, _ = surgeon.patch(load_model(TINY, seed=0).model, policy, X)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = export(model, "torchscript", tmp_path / "m.pt", example_input=X)
        onnx = export(model, "onnx", tmp_path / "m.onnx", example_input=X)
    assert script.method == "trace" and "trace the model instead" in script.notes[0]
    for result in (script, onnx):
        assert len(result.checks) == 2 and all(c.rel_diff <= 1e-4 for c in result.checks)


def test_cli_patches_loads_and_evaluates_an_aps_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "policies")
    assert code == 0 and all(f"{name} " in out for name in ("aps", "aps-circular", "lps"))
    ckpt = str(tmp_path / "r18")
    code, out, err = run_cli(
        capsys, "patch", "resnet18", "--policy", "aps-circular", "--input-size", "3x32x32",
        "--out", ckpt,
    )  # fmt: skip
    assert code == 0, err
    assert "padding: circular at 18 of 18 padded layers" in out
    code, out, err = run_cli(capsys, "load", ckpt)
    assert code == 0 and "forward pass ok" in out, err
    code, out, err = run_cli(capsys, "eval", ckpt, "--pairs", "8", "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    assert result["consistency_circular"] == 1.0, result


def _report() -> PatchReport:
    model = load_model(TINY, seed=0).model
    model.maxpool.ceil_mode = True  # aps skips it, and it keeps its padding
    _, report = surgeon.patch(model, "aps-circular", X)
    return report


def test_reports_say_which_layers_changed_padding(console: object) -> None:
    from surgeon.report import patch_json, patch_markdown, render_patch
    from surgeon.report_html import patch_html
    from tests.conftest import rendered

    report = _report()
    render_patch(report, console)  # type: ignore[arg-type]
    text = rendered(console)  # type: ignore[arg-type]
    assert "padding: circular at 3 of 4 padded layers" in text
    assert "circular: conv1 (zeros p1), layer1.conv1 (zeros p1), layer1.conv2.1 (zeros p1)" in text
    assert "kept: maxpool (-inf p1): ceil_mode: its last window overhangs the map" in text
    markdown = patch_markdown(report)
    assert "## Padding" in markdown and "| conv1 | Conv2d | zeros p1 | circular p1 |" in markdown
    assert "| maxpool | MaxPool2d | -inf p1 | kept: ceil_mode" in markdown
    data = json.loads(patch_json(report))
    assert {
        "layer": "conv1",
        "op": "Conv2d",
        "before": "zeros p1",
        "after": "circular p1",
        "reason": "",
    } in data["padding"]
    assert "<h2>Padding</h2>" in patch_html(report)
