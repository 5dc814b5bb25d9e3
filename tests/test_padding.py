"""A policy's `padding: circular`: every padded conv and pool pads circularly, through recorded
edits, and the layers it cannot change are kept with their reason; the policy loader checks
the field like every other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.edits import ModelEditor, SetAttrs, Wrap
from surgeon.errors import PolicyError
from surgeon.layers import StridePad
from surgeon.patch import patch
from surgeon.policy_loader import parse_policy, policy_from_dict
from surgeon.rewrites import action_schemas
from surgeon.rewrites.padding import circular_padding


def _circular(x: Tensor, pad: int) -> Tensor:
    return F.pad(x, (pad,) * 4, mode="circular")


class SamePad(nn.Conv2d):
    """A conv whose forward pads on its own (as timm's Conv2dSame does)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def _model() -> nn.Sequential:
    shared = nn.MaxPool2d(3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1),  # 0: circular
        nn.Conv2d(2, 2, 4, padding="same"),  # 1: circular, padded 1 left and 2 right
        nn.Conv2d(2, 2, 1),  # 2: no padding, nothing to change
        nn.MaxPool2d(3, 1, 1),  # 3: circular pad in front
        nn.AvgPool2d(3, 1, 1, count_include_pad=False),  # 4: circular pad in front
        nn.MaxPool2d(3, 2, 1, ceil_mode=True),  # 5: kept
        SamePad(2, 2, 3, padding=1),  # 6: kept
        nn.ConvTranspose2d(2, 2, 3, padding=1),  # 7: kept
        shared,  # 8 and 9: kept (one module, two paths)
        shared,
        StridePad([(0, 1), (0, 1)], "constant", float("-inf")),  # 10: circular
        nn.MaxPool2d(3, 1, 1, return_indices=True),  # 11: kept
    )


def test_circular_padding_changes_every_padded_layer_it_can_and_says_why_not() -> None:
    model = _model()
    editor = ModelEditor(model)
    changes = {c.layer: c for c in circular_padding(editor)}
    assert {k for k, c in changes.items() if c.changed} == {"0", "1", "3", "4", "10"}
    assert changes["0"].before == "zeros p1" and changes["0"].after == "circular p1"
    assert changes["3"].before == "-inf p1" and changes["4"].before == "uncounted p1"
    assert "ceil_mode" in changes["5"].reason
    assert "own forward" in changes["6"].reason
    assert "zeros only" in changes["7"].reason
    assert "2 paths" in changes["8"].reason
    assert "returns indices" in changes["11"].reason
    assert "2" not in changes  # nothing to pad
    assert isinstance(model[3], nn.Sequential) and isinstance(model[3][0], StridePad)
    assert model[3][1].padding == (0, 0)
    assert SetAttrs("3", {"padding": [0, 0]}) in editor.ops
    assert any(isinstance(op, Wrap) and op.path == "4" for op in editor.ops)


def test_circular_padding_computes_what_circular_padding_means() -> None:
    model = _model()
    originals = list(model)  # the layers themselves, before some are wrapped
    x = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(0))
    circular_padding(ModelEditor(model))
    conv, same = originals[0], originals[1]
    assert torch.allclose(model[0](x), F.conv2d(_circular(x, 1), conv.weight, conv.bias), atol=1e-6)
    same_ref = F.conv2d(F.pad(x, (1, 2, 1, 2), mode="circular"), same.weight, same.bias)
    assert torch.allclose(model[1](x), same_ref, atol=1e-6)
    assert torch.equal(model[3](x), F.max_pool2d(_circular(x, 1), 3, 1))
    # every window of a circularly padded map is full: the divisor is 9 everywhere
    assert torch.allclose(model[4](x), F.avg_pool2d(_circular(x, 1), 3, 1), atol=1e-6)
    assert torch.equal(model[10](x), F.pad(x, (0, 1, 0, 1), mode="circular"))


def test_circular_padding_is_undone_by_rollback() -> None:
    model = _model()
    before = [
        (type(m), getattr(m, "padding", None), getattr(m, "padding_mode", None)) for m in model
    ]
    editor = ModelEditor(model)
    circular_padding(editor)
    editor.rollback()
    after = [
        (type(m), getattr(m, "padding", None), getattr(m, "padding_mode", None)) for m in model
    ]
    assert after == before


def test_policy_padding_is_read_validated_and_round_trips() -> None:
    text = "name: p\ndescription: d\npadding: circular\nrules:\n  - match: {}\n    action: aps\n"
    policy = parse_policy(text, "p.yaml", action_schemas())
    assert policy.padding == "circular"
    assert policy.to_dict()["padding"] == "circular"
    assert policy_from_dict(policy.to_dict(), action_schemas()) == policy
    plain = policy_from_dict(
        {"name": "q", "description": "", "rules": [{"match": {}, "action": "aps"}]},
        action_schemas(),
    )
    assert plain.padding == "keep" and "padding" not in plain.to_dict()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("circle", "p.yaml:3: padding: 'circle' is not a padding (did you mean 'circular'?); "
         "allowed: keep, circular"),
        ("[circular]", "p.yaml:3: padding: expected one of keep, circular, got a list"),
    ],
)  # fmt: skip
def test_policy_padding_errors_name_the_file_line_and_field(value: str, message: str) -> None:
    text = f"name: p\ndescription: d\npadding: {value}\nrules:\n  - match: {{}}\n    action: aps\n"
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml", action_schemas())
    assert str(exc.value) == message


def test_a_map_smaller_than_its_padding_keeps_its_padding_at_patch_time() -> None:
    # PyTorch's circular padding wraps around at most once: the 5×5 conv after a global pool
    # (a 1×1 map, padded by 2) keeps its zeros, with the reason, and the patched model runs
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 5, padding=2)
    )
    policy = policy_from_dict(
        {
            "name": "circular",
            "description": "",
            "padding": "circular",
            "rules": [{"match": {}, "action": "keep"}],
        },
        action_schemas(),
    )
    patched, report = patch(model, policy, torch.randn(1, 3, 8, 8))
    changes = {c.layer: c for c in report.padding}
    assert changes["0"].after == "circular p1"
    assert changes["2"].after == "" and "smaller than its padding" in changes["2"].reason
    assert patched[2].padding_mode == "zeros"
