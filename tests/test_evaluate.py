"""Evaluation: shift consistency pins the invariances it claims, accuracy counts what it should,
and every number is reproducible from the seed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from surgeon.errors import UsageError
from surgeon.evaluate import (
    EvalOptions,
    EvalProgress,
    count_macs,
    default_max_shift,
    evaluate,
    evaluate_model,
    shift_consistency,
    synthetic_images,
)


class CircularNet(nn.Module):
    """Stride-1 convolutions with circular padding, then global pooling: every layer commutes
    with torch.roll, so the prediction cannot depend on a circular shift. Runs in float64 so
    summation order cannot flip a near-tie."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"),
            nn.ReLU(),
            nn.Conv2d(8, classes, 3, padding=1, padding_mode="circular"),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.double())


class PositionNet(nn.Module):
    """A linear read-out of every pixel: the prediction depends on where things are."""

    def __init__(self, size: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * size * size, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


class DominantChannel(nn.Module):
    """Class k = the colour channel with the largest mean: red 0, green 1, blue 2."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


FAST = EvalOptions(pairs=32, latency_runs=2, warmup=0)


def test_circular_net_is_exactly_circular_shift_consistent() -> None:
    torch.manual_seed(1)
    result = evaluate_model(CircularNet(), (3, 16, 16), FAST)
    assert result.consistency_circular == 1.0, "rolls changed a circularly equivariant net"
    assert result.pairs == 32 and result.max_shift == default_max_shift(16, 16)


def test_position_dependent_model_is_not_shift_consistent() -> None:
    torch.manual_seed(1)
    result = evaluate_model(PositionNet(), (3, 16, 16), FAST)
    assert result.consistency_circular < 0.9, result
    assert result.consistency_crop < 0.9, result
    assert result.softmax_change > 0.01, result


def test_constant_model_has_no_softmax_change() -> None:
    class Constant(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.zeros(x.shape[0], 4) + torch.arange(4.0)

    result = evaluate_model(Constant(), (3, 8, 8), FAST)
    assert (result.consistency_crop, result.consistency_circular) == (1.0, 1.0)
    assert result.softmax_change == 0.0


def test_results_are_deterministic_for_a_seed() -> None:
    torch.manual_seed(1)
    model = PositionNet()
    first = evaluate_model(model, (3, 16, 16), FAST).to_dict()
    second = evaluate_model(model, (3, 16, 16), FAST).to_dict()
    for record in (first, second):
        record.pop("latency_ms")
    assert first == second
    assert torch.equal(
        synthetic_images(4, (3, 8, 8), seed=3), synthetic_images(4, (3, 8, 8), seed=3)
    )


def test_synthetic_images_are_smooth_and_normalised() -> None:
    images = synthetic_images(8, (3, 32, 32), seed=0)
    assert images.shape == (8, 3, 32, 32)
    assert images.flatten(1).mean(1).abs().max() < 1e-5
    assert torch.allclose(images.flatten(1).std(1), torch.ones(8), atol=1e-4)
    step = (images[..., 1:] - images[..., :-1]).abs().mean()
    assert step < 0.3, f"neighbouring pixels differ by {step:.2f} std: not low-pass"


def test_shift_consistency_refuses_images_too_small_for_the_shift() -> None:
    with pytest.raises(UsageError, match="needs images of at least 20x20"):
        shift_consistency(PositionNet(), torch.zeros(2, 3, 18, 18), (16, 16), max_shift=4)


def test_macs_of_a_single_convolution() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (torch.zeros(1, 3, 8, 8),)) == 8 * 8 * 8 * 3 * 9


def _write_folder(root: Path) -> None:
    # (folder, colour of each image): 2 of 7 images sit in the wrong class folder
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    layout = {"0_red": [red, red, green], "1_green": [green, green], "2_blue": [blue, red]}
    for folder, colours in layout.items():
        (root / folder).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (20, 20), colour).save(root / folder / f"{i}.png")


def test_accuracy_on_an_image_folder_matches_the_hand_count(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    options = dataclasses.replace(FAST, data=tmp_path)
    result = evaluate_model(DominantChannel(), (3, 16, 16), options)
    assert result.accuracy_top1 == pytest.approx(5 / 7)
    assert result.accuracy_top5 == 1.0  # only 3 classes
    assert result.accuracy_images == 7
    assert result.consistency_data == str(tmp_path)
    assert result.pairs == 7  # consistency used the folder's images (fewer than `pairs`)
    assert result.consistency_crop == 1.0  # flat colours: every crop looks the same

    limited = evaluate_model(DominantChannel(), (3, 16, 16), dataclasses.replace(options, limit=3))
    assert limited.accuracy_images == 3


def test_accuracy_refuses_more_classes_than_outputs(tmp_path: Path) -> None:
    _write_folder(tmp_path)

    class TwoClasses(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.mean(dim=(2, 3))[:, :2]

    with pytest.raises(UsageError, match="has 3 class folders but the model has 2 outputs"):
        evaluate_model(TwoClasses(), (3, 16, 16), dataclasses.replace(FAST, data=tmp_path))


def test_evaluate_a_spec_reports_progress_in_stage_order() -> None:
    events: list[EvalProgress] = []
    options = EvalOptions(pairs=4, latency_runs=2, warmup=0, input_size=(3, 32, 32), threads=1)
    before = torch.get_num_threads()
    (result,) = evaluate(["resnet18"], options, progress=events.append)
    assert torch.get_num_threads() == before, "the thread setting leaked out of evaluate"
    assert result.spec == "torchvision:resnet18" and result.policy is None
    assert result.params == 11_689_512 and result.threads == 1
    assert result.input_size == (3, 32, 32) and result.latency_ms > 0
    stages = [e.stage for e in events]
    assert stages == sorted(stages, key=["load", "consistency", "latency"].index)
    for stage in ("load", "consistency", "latency"):
        last = [e for e in events if e.stage == stage][-1]
        assert last.completed == last.total, f"{stage} did not finish: {last}"
    assert result.to_dict()["input_size"] == [3, 32, 32]


def test_options_refuse_nonsense() -> None:
    with pytest.raises(UsageError, match="pairs"):
        EvalOptions(pairs=0)
    with pytest.raises(UsageError, match="channels x height x width"):
        EvalOptions(input_size=(224, 224))


def test_evaluate_a_checkpoint_directory_beside_its_source(tmp_path: Path) -> None:
    from surgeon.api import save
    from surgeon.models import example_inputs, load_model
    from surgeon.patch import patch, resolve_policy

    loaded = load_model("resnet18")
    loaded.input_size = (3, 32, 32)
    policy = resolve_policy("spd")
    patched, report = patch(
        loaded.model, policy, example_inputs(loaded.task, loaded.input_size), model_name="resnet18"
    )
    save(tmp_path / "ckpt", patched, loaded, report, policy.to_dict())

    options = EvalOptions(pairs=2, latency_runs=1, warmup=0)
    original, surgered = evaluate(["resnet18", tmp_path / "ckpt"], options)
    assert surgered.model == str(tmp_path / "ckpt") and surgered.policy == "spd"
    assert surgered.spec == "torchvision:resnet18"
    assert surgered.input_size == (3, 32, 32), "the checkpoint's input size was not used"
    assert surgered.params == report.params_after > original.params
