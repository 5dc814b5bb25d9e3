"""`relocate` and placements: strides move along a path, joins are checked, illegal moves and
placements are refused with a one-line reason, and the legal placements are counted."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from surgeon.patch import patch
from surgeon.placements import PlacementSpace, placement_policy
from surgeon.policy import Policy
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import action_schemas

_V1 = [
    "conv1",
    "maxpool",
    "layer2.0.conv1",
    "layer2.0.downsample.0",
    "layer3.0.conv1",
    "layer3.0.downsample.0",
    "layer4.0.conv1",
    "layer4.0.downsample.0",
]


def _moves(*moves: tuple[str, dict[str, str]]) -> Policy:
    rules = [
        {"match": {"name": site}, "action": "relocate", "params": params} for site, params in moves
    ]
    return policy_from_dict({"name": "moves", "description": "", "rules": rules}, action_schemas())


def _strides(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: tuple(m.stride) if isinstance(m.stride, tuple) else (m.stride,)  # type: ignore[arg-type]
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and max(_tuple(m.stride)) > 1
    }


def _tuple(value: object) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)  # type: ignore[return-value]


def test_moving_resnet50_strides_to_conv1_gives_the_v1_block(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet50")
    x = torch.randn(1, 3, 32, 32)
    policy = _moves(*((f"layer{i}.0.conv2", {"to": f"layer{i}.0.conv1"}) for i in (2, 3, 4)))
    patched, report = patch(model, policy, x)
    assert report.patched == 3 and not report.skipped
    assert sorted(_strides(patched)) == sorted(_V1)
    row = next(r for r in report.rows if r.site == "layer2.0.conv2")
    assert row.replacement == "stride 2→1; layer2.0.conv1 takes it (stride 2)"
    assert row.out_shape_after == row.out_shape_before == (1, 128, 4, 4)
    with torch.no_grad():
        assert patched(x).shape == (1, 1000)
    assert not report.keys_added and not report.keys_removed


def test_a_move_that_breaks_a_residual_join_is_refused_and_nothing_changes(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet18")
    before = _strides(model)
    policy = _moves(("layer2.0.downsample.0", {"to": "layer2.0.conv2"}))
    patched, report = patch(model, policy, torch.randn(1, 3, 64, 64))
    (row,) = [r for r in report.rows if r.site == "layer2.0.downsample.0"]
    assert row.status == "skipped"
    assert row.note == (
        "moving its stride to layer2.0.conv2 is refused: the join at layer2.0 (add_2) would get "
        "maps at output strides 4 and 16"
    )
    assert _strides(patched) == before


def test_relocate_names_an_unknown_layer_and_needs_exactly_one_form(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet18")
    policy = _moves(
        ("layer2.0.conv1", {"to": "layer2.0.cnv2"}),
        ("layer3.0.conv1", {}),
        ("layer4.0.conv1", {"to": "layer4.0.conv2", "placement": "conv1"}),
    )
    _, report = patch(model, policy, torch.randn(1, 3, 64, 64))
    notes = {r.site: r.note for r in report.rows if r.status == "skipped"}
    assert notes["layer2.0.conv1"] == (
        "'layer2.0.cnv2' is not a convolution or pooling module called once here "
        "(did you mean 'layer2.0.conv2'?)"
    )
    assert notes["layer3.0.conv1"].startswith("relocate needs `to`")
    assert notes["layer4.0.conv1"].endswith("not both")


def test_a_placement_moves_strides_that_are_only_legal_together(
    fresh_model: Callable[..., nn.Module],
) -> None:
    # layer3's step moves into layer4's first block: its main path and shortcut both move,
    # which no single move can do
    model = fresh_model("resnet18")
    space = PlacementSpace.of(model, torch.randn(1, 3, 64, 64))
    chosen = ["conv1", "maxpool", "layer2.0.conv1", "layer2.0.downsample.0", "layer4.0.conv1"]
    assert [p.message for p in space.check(chosen)] == [
        "the join at layer4.0 (add_6) would get maps at output strides 8 and 16"
    ]
    legal = [
        *chosen[:4],
        "layer3.0.conv2",
        "layer3.0.downsample.0",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
    ]
    assert space.check(legal) == []
    patched, report = patch(model, placement_policy(legal), torch.randn(1, 3, 64, 64))
    assert sorted(_strides(patched)) == sorted(legal)
    rows = {r.site: r for r in report.rows}
    assert rows["layer3.0.conv1"].replacement == "stride 2→1; stride 2 at layer3.0.conv2"
    assert rows["layer4.0.conv1"].replacement == "stride 2→1; stride 2 at layer4.0.conv2"
    assert rows["conv1"].note == "listed in the placement: keeps its stride"


def test_an_illegal_placement_is_refused_at_every_site(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet18")
    before = _strides(model)
    patched, report = patch(
        model, placement_policy(["conv1", "layer2.0.conv1"]), torch.randn(1, 3, 64, 64)
    )
    notes = {r.note for r in report.rows if r.role == "downsample"}
    assert notes == {
        "placement refused: the join at layer2.0 (add_2) would get maps at output strides 2 and 4"
    }
    assert _strides(patched) == before


class _Tiny(nn.Module):
    """stem conv, a residual block with a 1×1 shortcut, then a plain conv and a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.a = nn.Conv2d(8, 8, 3, 1, 1)
        self.b = nn.Conv2d(8, 8, 3, 1, 1)
        self.short = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.b(self.a(y)) + self.short(y)
        return self.head(self.c(y))


def test_placements_are_counted_and_listed_along_the_graph() -> None:
    space = PlacementSpace.of(_Tiny().eval(), torch.randn(1, 3, 16, 16))
    assert [c.name for c in space.candidates] == ["stem", "a", "b", "short", "c"]
    assert space.current.layers == ("stem",) and space.current.steps == 1
    # slots in series: stem, the block (a or b, with short), c -> per step count 1 + 2 + 1
    assert space.counts() == {0: 1, 1: 4, 2: 5, 3: 2}
    two = list(space.placements(2))
    assert [p.layers for p in two] == [
        ("stem", "a", "short"),
        ("stem", "b", "short"),
        ("stem", "c"),
        ("a", "short", "c"),
        ("b", "short", "c"),
    ]
    assert all(space.check(p.layers) == [] for p in two) and two[0].output_stride == 4


def test_resnet18_placements_keep_the_count_and_each_one_patches(
    fresh_model: Callable[..., nn.Module],
) -> None:
    model = fresh_model("resnet18")
    x = torch.randn(1, 3, 64, 64)
    space = PlacementSpace.of(model, x)
    assert space.current.layers == tuple(_V1) and space.current.steps == 5
    # five step slots: stem conv, max pool, and layer2-4's first blocks (conv1 or conv2, with
    # the shortcut); layer1.0 has an identity shortcut, so it cannot downsample: 2·2·2 = 8
    listed = list(space.placements())
    assert len(listed) == space.count() == 8
    patched, _ = patch(model, placement_policy(listed[3]), x)
    assert sorted(_strides(patched)) == sorted(listed[3].layers)
    with torch.no_grad():
        assert patched(x).shape == (1, 1000)


@pytest.mark.parametrize("count", [4, 6])
def test_resnet18_placement_counts_for_other_numbers_of_steps(
    fresh_model: Callable[..., nn.Module], count: int
) -> None:
    space = PlacementSpace.of(fresh_model("resnet18"), torch.randn(1, 3, 64, 64))
    assert space.count(count) == {4: 28, 6: 0}[count]
