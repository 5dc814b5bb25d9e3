"""`antialias` at average pools: the box filter is replaced by the binomial one (Zhang 2019,
§3.3), not blurred again, with the pool's output size at every input size."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from surgeon.layers.blur import BlurPool
from surgeon.patch import patch


def _shapes_agree(original: nn.Module, patched: nn.Module, sizes: range) -> list[int]:
    """The input sizes at which the two models' outputs have different shapes."""
    wrong = []
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(1, 3, size, size + 1)
            if original(x).shape != patched(x).shape:
                wrong.append(size)
    return wrong


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2, 2),
        nn.AvgPool2d(3, 2),
        nn.AvgPool2d(3, 2, 1),
        nn.AvgPool2d(4, 2, 1),
        nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
        nn.AvgPool2d(3, 2, 1, ceil_mode=True),
        nn.AvgPool2d(3, 3),
        nn.AvgPool2d(1, 2),
    ],
    ids=["k2", "k3", "k3-p1", "k4-p1", "excluded", "ceil-k2", "ceil-k3-p1", "s3", "k1"],
)
def test_average_pool_becomes_one_blurpool_with_the_pools_output_size(pool: nn.Module) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), pool).eval()
    original = copy.deepcopy(model)
    patched, report = patch(model, "antialias", torch.randn(1, 3, 9, 9))
    (row,) = [r for r in report.rows if r.status == "patched"]
    assert row.transfer == "approximate", "the filter changes, so the function does"
    assert "replaced by the binomial one, not blurred again" in row.note
    assert not any(isinstance(m, nn.AvgPool2d) for m in patched.modules()), "no box filter left"
    assert sum(isinstance(m, BlurPool) for m in patched.modules()) == 1
    assert not _shapes_agree(original, patched, range(4, 14)), "output sizes differ"


def test_timm_same_average_pool_becomes_a_blurpool_alone() -> None:
    from timm.layers import create_pool2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), create_pool2d("avg", 3, stride=2, padding="same"))
    original = copy.deepcopy(model.eval())
    patched, report = patch(model, "antialias", torch.randn(1, 3, 9, 9))
    assert isinstance(patched[1], BlurPool), "TF 'SAME' and BlurPool both give ceil(i / s)"
    assert report.rows[0].transfer == "approximate"
    assert not _shapes_agree(original, patched, range(4, 14))


def test_densenet_transitions_are_blurred_once_at_odd_sizes(
    fresh_model: Callable[..., nn.Module],
) -> None:
    patched, report = patch(fresh_model("densenet121"), "antialias", torch.randn(1, 3, 45, 45))
    rows = {r.site: r for r in report.rows if r.site.endswith(".pool")}
    assert set(rows) == {f"features.transition{i}.pool" for i in (1, 2, 3)}
    for name, row in rows.items():
        assert row.replacement == "BlurPool(f4, s2) in place of the box filter", name
        assert row.transfer == "approximate" and row.out_shape_after == row.out_shape_before
        pool = patched.get_submodule(name)
        assert [type(m).__name__ for m in pool] == ["StridePad", "BlurPool"], name
    assert report.params_after == report.params_before
    sizes: dict[str, tuple[int, int]] = {}
    for name in rows:  # AvgPool2d(2, 2) halves every length, rounding down: so must the blur
        patched.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: sizes.__setitem__(
                name, (args[0].shape[-1], out.shape[-1])
            )
        )
    with torch.no_grad():
        patched(torch.randn(1, 3, 51, 51))
    assert all(out == size // 2 for size, out in sizes.values()) and len(sizes) == 3, sizes
