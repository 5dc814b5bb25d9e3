"""`fold` per backend: every exact form of a unit is checked, timed on the backend the model
will run on, and the fastest is kept; blur + pointwise pairs fold exactly for every padding
mode, and the interior-only fold is made only when asked for."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest
import torch
from torch import nn

from surgeon.checkpoint.manifest import FOLD_FORM
from surgeon.errors import PatchError, UsageError
from surgeon.fold import FoldedBlurConv, fold
from surgeon.layers import EXPORT_FORMS, PAD_MODES, BlurPool
from surgeon.layers.folded import FoldedSpaceToDepthConv
from surgeon.layers.spd import SpaceToDepthConv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _blurred(pad_mode: str = "reflect") -> nn.Sequential:
    """conv, ReLU, a BlurPool, and an anti-aliased 1x1 shortcut (BlurPool then a 1x1 conv)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        BlurPool(8, pad_mode=pad_mode),
        nn.Sequential(BlurPool(8, pad_mode=pad_mode), nn.Conv2d(8, 6, 1)),
    ).eval()


SIZES = [(2, 3, 16, 16), (1, 3, 13, 9), (2, 3, 3, 4), (1, 3, 1, 2)]


def _same_function(before: nn.Module, after: nn.Module, tolerance: float = 1e-5) -> None:
    generator = torch.Generator().manual_seed(1)
    for shape in SIZES:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            want, got = before(x), after(x)
        assert got.shape == want.shape, f"{shape}: {tuple(got.shape)} != {tuple(want.shape)}"
        assert _rel(want, got) <= tolerance, f"{shape}: relative difference {_rel(want, got):.1e}"


def test_onnxruntime_fold_times_every_blur_form_and_keeps_the_fastest() -> None:
    model = _blurred()
    reference = _blurred()
    x = torch.randn(1, 3, 16, 16)
    model, record = fold(model, x, backend="onnxruntime", min_seconds=0.001)
    assert record.backend == "onnxruntime" and record.choose == "fastest"
    kinds = {layer.name: layer.kind for layer in record.layers}
    assert kinds == {"2": "blur", "3.0": "blur", "3": "pair"}, kinds
    for layer in record.layers:
        if layer.kind == "blur":
            assert set(layer.timings) == {"gather", "pad", "separable"}, layer.timings
            fastest = min(layer.timings, key=layer.timings.__getitem__)
            assert layer.form == ("kept" if fastest == "gather" else fastest), layer
        else:
            assert set(layer.timings) == {"kept", "folded"}, layer.timings
    _same_function(reference, model)


def test_zero_padded_blurs_have_the_constant_padding_form() -> None:
    model, record = fold(
        _blurred("zero"), torch.randn(1, 3, 12, 12), backend="onnxruntime", min_seconds=0.001
    )
    blur = next(layer for layer in record.layers if layer.name == "2")
    assert set(blur.timings) == {"gather", "pad", "separable", "conv"}
    _same_function(_blurred("zero"), model)


def test_eager_fold_leaves_blurpools_to_their_eager_formulation() -> None:
    _, record = fold(_blurred(), torch.randn(1, 3, 16, 16), min_seconds=0.001)
    assert record.backend == "eager"
    assert [(layer.name, layer.kind) for layer in record.layers] == [("3", "pair")]


@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_blur_and_pointwise_conv_fold_exactly_for_every_padding_mode(pad_mode: str) -> None:
    model, record = fold(_blurred(pad_mode), torch.randn(1, 3, 16, 16), choose="folded")
    assert record.forms == {"3": "folded"}, "choose='folded' leaves BlurPool forms alone"
    folded = model[3]
    assert isinstance(folded, FoldedBlurConv) and folded.pad_mode == pad_mode
    assert folded.conv.kernel_size == (4, 4) and folded.conv.stride == (2, 2)
    _same_function(_blurred(pad_mode), model)


def test_the_interior_fold_is_made_only_when_asked_and_matches_away_from_the_borders() -> None:
    x = torch.randn(1, 3, 16, 16)
    _, exact = fold(_blurred(), x, choose="folded")
    assert exact.forms["3"] == "folded"
    with pytest.raises(PatchError, match="must be one of kept, folded, got 'squashed'"):
        fold(_blurred(), x, forms={"3": "squashed"})
    model, record = fold(_blurred(), x, choose="folded", interior_only=True)
    pair = next(layer for layer in record.layers if layer.name == "3")
    assert pair.form == "interior" and isinstance(model[3], FoldedBlurConv)
    assert model[3].pad_mode == "zero", "one zero-padded conv: no reflect padding left"
    assert pair.rel_diff > 1e-3, "the borders read zeros instead of reflected values"
    original = _blurred()
    mid = original[:3](torch.randn(2, 3, 40, 36))  # the pair's input: 20 x 18
    with torch.no_grad():
        want, got = original[3](mid), model[3](mid)
    # output i reads inputs 2i-1 .. 2i+2: outputs 1 .. 7 of both dims never read padding
    inner = (slice(None), slice(None), slice(1, 8), slice(1, 8))
    assert _rel(want[inner], got[inner]) <= 1e-5
    replayed, again = fold(_blurred(), x, forms=record.forms)
    assert again.forms == record.forms and isinstance(replayed[3], FoldedBlurConv)


def test_a_replay_changes_only_the_units_it_names() -> None:
    model, record = fold(_blurred(), torch.randn(1, 3, 8, 8), backend="inductor", forms={})
    assert record.folded == 0 and not record.ops
    assert isinstance(model[2], BlurPool) and model[2].export_form == "gather"


def test_unknown_backends_and_choices_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown fold backend 'tensorrt'; choose one of eager"):
        fold(_blurred(), torch.randn(1, 3, 8, 8), backend="tensorrt")
    with pytest.raises(UsageError, match="choose must be 'fastest' or 'folded'"):
        fold(_blurred(), torch.randn(1, 3, 8, 8), choose="slowest")  # type: ignore[arg-type]


def test_every_form_fold_makes_is_one_a_checkpoint_accepts() -> None:
    made = {"kept", "folded", "interior", *EXPORT_FORMS}
    assert set(get_args(FOLD_FORM)) == made


def test_a_failed_fold_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    import surgeon.fold as fold_module

    model = _blurred()
    before = [id(m) for m in model.modules()]
    original = fold_module._check
    calls = itertools.count()

    def failing(*args: object, **kwargs: object) -> tuple[float, float]:
        if next(calls) == 1:
            raise PatchError("injected")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fold_module, "_check", failing)
    forms = {"2": "pad", "3": "folded"}  # the blur is replaced, then the pair's check fails
    with pytest.raises(PatchError, match="injected"):
        fold(model, torch.randn(1, 3, 8, 8), backend="onnxruntime", forms=forms)
    assert [id(m) for m in model.modules()] == before
    assert model[2].export_form == "gather"


@pytest.mark.slow
def test_inductor_fold_compiles_each_form_and_keeps_the_fastest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
    x = torch.randn(2, 8, 16, 16)
    layer, _ = SpaceToDepthConv.from_conv(model[0])
    with torch.no_grad():
        layer.conv.weight.add_(0.05 * torch.randn_like(layer.conv.weight))
    model[0] = layer
    with torch.no_grad():
        want = model(x)
    model, record = fold(model, x, backend="inductor", min_seconds=0.001)
    (unit,) = record.layers
    assert set(unit.timings) == {"kept", "folded"}
    assert unit.form == min(unit.timings, key=unit.timings.__getitem__)
    kind = FoldedSpaceToDepthConv if unit.form == "folded" else SpaceToDepthConv
    assert isinstance(model[0], kind)
    with torch.no_grad():
        assert _rel(want, model(x)) <= 1e-5
