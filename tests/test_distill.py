"""surgeon.distill: the distillation loss is zero exactly when the student reproduces the
teacher, has gradients otherwise, and copes with outputs that are not plain logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgeon.distill import (
    DistillLoss,
    FeatureTap,
    find_logits,
    kd_loss,
    matching_outputs,
    normalised_mse,
    top1_agreement,
)
from surgeon.errors import UsageError
from surgeon.patch import patch
from tests.heal_fixtures import SIZE, TinyNet


def test_loss_is_zero_with_zero_gradient_when_student_equals_teacher() -> None:
    logits = torch.randn(6, 5, requires_grad=True)
    features = torch.randn(6, 3, 4, 4, requires_grad=True)
    terms = DistillLoss(temperature=3.0, label_weight=0.0)(
        logits,
        logits.detach(),
        student_features={"f": features},
        teacher_features={"f": features.detach()},
    )
    assert terms.kd is not None and terms.features is not None
    value = float(terms.total.detach())
    assert abs(value) < 1e-6, f"loss {value} for identical outputs"
    terms.total.backward()
    assert logits.grad is not None and float(logits.grad.abs().max()) < 1e-6
    assert features.grad is not None and float(features.grad.abs().max()) < 1e-6


def test_loss_has_gradients_that_pull_the_student_towards_the_teacher() -> None:
    teacher = torch.randn(8, 5)
    student = torch.zeros(8, 5, requires_grad=True)
    loss = kd_loss(student, teacher, temperature=2.0)
    assert float(loss.detach()) > 0
    loss.backward()
    assert student.grad is not None
    with torch.no_grad():
        stepped = student - 1.0 * student.grad
    assert float(kd_loss(stepped, teacher, 2.0)) < float(loss), "a gradient step did not help"


def test_kd_term_is_scaled_by_temperature_squared() -> None:
    """Hinton's T²: at high T the softened KL shrinks as 1/T², so T²·KL settles to a limit."""
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    high = [float(kd_loss(s, t, temp)) for temp in (20.0, 40.0)]
    assert high[0] == pytest.approx(high[1], rel=0.05), high


def test_cross_entropy_is_added_with_labels() -> None:
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    terms = DistillLoss()(logits, logits, labels=labels)
    assert terms.ce is not None and float(terms.ce) > 0
    assert float(terms.total) == pytest.approx(float(terms.ce), abs=1e-6)


def test_feature_term_weighs_layers_of_different_scale_alike() -> None:
    t = torch.randn(2, 4, 8, 8)
    noise = 0.1 * torch.randn(2, 4, 8, 8)
    small = normalised_mse(t + noise, t)
    large = normalised_mse(1000 * (t + noise), 1000 * t)
    assert float(small) == pytest.approx(float(large), rel=1e-4)


def test_logits_are_found_inside_dicts_and_tuples() -> None:
    logits = torch.randn(2, 7)
    feature_map = torch.randn(2, 3, 4, 4)
    assert find_logits({"features": feature_map, "logits": logits}) is logits
    assert find_logits((feature_map, [torch.tensor([1, 2]), logits])) is logits
    assert find_logits({"out": feature_map}) is None


def test_outputs_without_logits_are_matched_by_normalised_mse() -> None:
    student = {"out": torch.randn(2, 3, 4, 4, requires_grad=True)}
    teacher = {"out": torch.randn(2, 3, 4, 4)}
    terms = DistillLoss()(student, teacher)
    assert terms.kd is None and terms.output is not None and float(terms.output) > 0
    terms.total.backward()
    assert student["out"].grad is not None
    with pytest.raises(UsageError, match="labels need class scores"):
        DistillLoss()(student, teacher, labels=torch.tensor([0, 1]))


def test_teacher_outputs_made_under_inference_mode_can_be_used() -> None:
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with torch.inference_mode():
        t_out = teacher(x)
    terms = DistillLoss()(student(x), t_out)
    terms.total.backward()
    assert student.weight.grad is not None


def test_agreement_counts_equal_top1() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.5, 0.0]])
    assert int(top1_agreement(s, t)) == 2  # type: ignore[arg-type]
    maps = {"out": torch.randn(3, 2, 2, 2)}
    assert top1_agreement(maps, maps) is None


def test_feature_tap_keeps_outputs_and_removes_its_hooks() -> None:
    model = TinyNet()
    with FeatureTap(model, ["1", "4"]) as tap:
        model(torch.randn(2, 3, SIZE, SIZE))
        assert set(tap.outputs) == {"1", "4"}
    assert not model[1]._forward_hooks, "the hook outlived the tap"
    with pytest.raises(UsageError, match="no module named 'nope'"):
        FeatureTap(model, ["nope"])


def test_features_move_to_where_patched_and_original_shapes_agree() -> None:
    """Anti-aliasing makes a strided conv stride 1 (its output grows) and blurs after the
    activation that follows; features are matched there, where the shapes agree again."""
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    student = TinyNet().eval()
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    student, report = patch(student, "antialias", x)
    sites = [r.site for r in report.rows if r.status == "patched"]
    assert sites == ["3", "4"], sites
    chosen = matching_outputs(student, teacher, sites, x)
    # the max pool keeps its output size (stride 1 + blur inside it); the conv's output
    # grows and comes back after the ReLU that now holds the blur
    assert chosen == ["3", "6"], chosen
