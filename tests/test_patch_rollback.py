"""`patch` is all or nothing: any failure leaves the caller's model exactly as it was.

Exactly: the same module objects at the same paths, the same parameter and buffer tensors
(identity and values), the same training flag on every module. On success, the caller's
training flags come back too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import nn

from surgeon import rewrites
from surgeon.edits import ModelEditor
from surgeon.errors import PatchError
from surgeon.patch import patch
from surgeon.policy import Policy
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import Edit, SkipSite, action_schemas
from surgeon.schema import ActionSchema
from surgeon.sites import Site
from tests.tiny_models import tiny_resnet

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _Snapshot:
    """Everything about a model that a failed patch must leave untouched."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(name, module) for name, module in model.named_modules()]
        self.tensors = {
            k: (t, t.detach().clone()) for k, t in model.state_dict(keep_vars=True).items()
        }
        self.training = [(name, module.training) for name, module in model.named_modules()]
        self.geometry = {
            name: (getattr(m, "stride", None), getattr(m, "padding", None))
            for name, m in model.named_modules()
        }

    def check(self, model: nn.Module) -> None:
        now = [(name, module) for name, module in model.named_modules()]
        assert [n for n, _ in now] == [n for n, _ in self.modules], "module paths changed"
        moved = [n for (n, a), (_, b) in zip(now, self.modules, strict=True) if a is not b]
        assert not moved, f"modules replaced and not put back: {moved}"
        state = model.state_dict(keep_vars=True)
        assert state.keys() == self.tensors.keys(), "state-dict keys changed"
        for key, (tensor, values) in self.tensors.items():
            assert state[key] is tensor, f"{key} is another tensor object now"
            assert torch.equal(state[key].detach(), values), f"{key} has other values now"
        flags = [(name, module.training) for name, module in model.named_modules()]
        assert flags == self.training, "training flags changed"
        geometry = {
            name: (getattr(m, "stride", None), getattr(m, "padding", None))
            for name, m in model.named_modules()
        }
        assert geometry == self.geometry, "a layer's stride or padding changed"


def _mixed_mode_model() -> nn.Module:
    model = tiny_resnet()
    model.train()
    model.bn1.eval()  # a frozen norm inside a training model: its own flag must come back
    return model


class _Fails:
    """A test action that fails the way `how` says (after the edits before it were made)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.schema = ActionSchema(f"fail-{how}", {}, "test: fails")

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if self.how == "interrupt":
            raise KeyboardInterrupt
        if self.how == "half":  # edits, then skips: its own edits must be undone
            editor.set_attrs(site.module, stride=(1, 1))
            raise SkipSite("changed its mind")
        # "shape": a layer with other output channels, so verification fails
        editor.replace(site.module, nn.Conv2d(site.in_channels, 5, 1, stride=site.stride))
        return Edit(site.name, self.schema.name, "wrong", "random", (site.module,), site.module)


@pytest.fixture
def failing_actions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for how in ("interrupt", "half", "shape"):
        monkeypatch.setitem(rewrites._REGISTRY, f"fail-{how}", _Fails(how))
    yield


def _policy(action: str) -> Policy:
    """spd at the stem and the max pool, allconv at the head's functional max pool (which
    makes the head a GraphModule), and `action` at the block's conv1."""
    data = {
        "name": f"then-{action}",
        "description": "several sites edited, then one fails",
        "rules": [
            {"match": {"name": ["conv1", "maxpool"]}, "action": "spd"},
            {"match": {"name": "head:*"}, "action": "allconv"},
            {"match": {"name": "layer1.conv1"}, "action": action},
        ],
    }
    return policy_from_dict(data, action_schemas())


@pytest.mark.usefixtures("failing_actions")
def test_verification_failure_after_several_edits_leaves_the_model_as_it_was() -> None:
    model = _mixed_mode_model()
    before = _Snapshot(model)
    with pytest.raises(PatchError, match="the patched model fails in layer1"):
        patch(model, _policy("fail-shape"), X)
    before.check(model)


@pytest.mark.usefixtures("failing_actions")
def test_ctrl_c_during_the_rewrites_leaves_the_model_as_it_was() -> None:
    model = _mixed_mode_model()
    before = _Snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        patch(model, _policy("fail-interrupt"), X)
    before.check(model)


def test_ctrl_c_during_verification_leaves_the_model_as_it_was() -> None:
    model = _mixed_mode_model()
    before = _Snapshot(model)
    calls = {"n": 0}

    def interrupt_second_run(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first run is the analysis, the second the patched model's
            raise KeyboardInterrupt

    handle = model.fc.register_forward_hook(interrupt_second_run)
    try:
        with pytest.raises(KeyboardInterrupt):
            patch(model, "spd", X)
    finally:
        handle.remove()
    assert calls["n"] == 2, "the interrupt did not come during verification"
    before.check(model)


@pytest.mark.usefixtures("failing_actions")
def test_a_rewrite_that_skips_after_editing_has_its_own_edits_undone() -> None:
    model = _mixed_mode_model()
    patched, report = patch(model, _policy("fail-half"), X)
    row = next(r for r in report.rows if r.site == "layer1.conv1")
    assert row.status == "skipped" and row.note == "changed its mind"
    assert patched.layer1.conv1.stride == (2, 2), "the skipped site's own edit was kept"
    assert [
        (type(op).__name__, getattr(op, "path", getattr(op, "owner", ""))) for op in report.ops
    ] == [
        ("Replace", "conv1"),
        ("Replace", "maxpool"),
        ("ReplaceCall", "head"),
    ]


def test_success_restores_the_callers_training_flags() -> None:
    model = _mixed_mode_model()
    patched, _ = patch(model, "antialias", X)
    assert patched is model
    assert model.training and not model.bn1.training, "the caller's flags did not come back"
    new = [m for m in model.modules() if type(m).__name__ == "BlurPool"]
    assert new and all(m.training for m in new), "new layers do not follow the model's mode"
