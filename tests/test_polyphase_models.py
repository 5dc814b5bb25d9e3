"""`aps` and `lps` on whole models: torchvision's ResNet-18 and two timm families (RegNet,
MobileNetV3), at random init and 64 px (2 × 32, their total stride).

- `aps-circular` (APS + circular padding) is exactly invariant to circular shifts at a size the
  total stride divides: 16 shifts covering every row offset modulo 16 give the same logits
  (slow: every row and every column shift of each model, and the full grid for ResNet-18);
- `aps` without circular padding, and `aps-circular` at a size 32 does not divide: the
  consistency is measured and recorded (`record_property`), not asserted (ResNet-18; the timm
  models are slow);
- `lps` equals the original model at init (≤ 1e-5 relative), shortcuts included, and in
  training the gradients reach every scoring network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import surgeon
from surgeon.layers import LearnablePolyphaseSampling
from surgeon.patch import PatchReport
from surgeon.policy_loader import policy_from_dict
from surgeon.rewrites import action_schemas

MODELS = ["resnet18", "timm:regnetx_002", "timm:mobilenetv3_small_050"]
SLOW = pytest.mark.slow
SIZE = 64
Patched = Callable[..., tuple[nn.Module, PatchReport]]


@pytest.fixture(scope="module")
def _cache() -> dict[tuple[str, str, int], tuple[nn.Module, PatchReport]]:
    return {}


@pytest.fixture
def patched(
    fresh_model: Callable[..., nn.Module],
    _cache: dict[tuple[str, str, int], tuple[nn.Module, PatchReport]],
) -> Patched:
    """`patched(name, policy, size)`: a private copy of the model patched once per module."""

    def make(name: str, policy: str, size: int = SIZE) -> tuple[nn.Module, PatchReport]:
        key = (name, policy, size)
        if key not in _cache:
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
            model, report = surgeon.patch(fresh_model(name), policy, x)
            _cache[key] = (model.eval(), report)
        model, report = _cache[key]
        return copy.deepcopy(model), report

    return make


def _image(size: int = SIZE) -> Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))


def _shifted(image: Tensor, shifts: list[tuple[int, int]]) -> Tensor:
    return torch.cat([torch.roll(image, s, dims=(-2, -1)) for s in shifts])


def _paired_shifts(size: int) -> list[tuple[int, int]]:
    # row shift d with column shift 7d + 3: every row and every column shift once (7 is coprime
    # to the size)
    return [(d, (7 * d + 3) % size) for d in range(size)]


def _assert_invariant(model: nn.Module, name: str, shifts: list[tuple[int, int]]) -> None:
    with torch.no_grad():
        logits = model(_shifted(_image(), [(0, 0), *shifts]))
    spread = (logits - logits[:1]).abs().max().item()
    scale = logits.abs().max().item()
    assert spread <= 1e-4 * scale, (
        f"{name}: logits move by {spread:.3g} of {scale:.3g} under shifts"
    )
    assert bool((logits.argmax(1) == logits[0].argmax()).all()), f"{name}: top-1 changed"


def _consistency(model: nn.Module, size: int, shifts: list[tuple[int, int]]) -> float:
    """The fraction of shifted copies of one seeded image whose top-1 is the unshifted one's."""
    with torch.no_grad():
        top1 = model(_shifted(_image(size), [(0, 0), *shifts])).argmax(1)
    return float((top1[1:] == top1[0]).float().mean())


@pytest.mark.parametrize("name", MODELS)
def test_aps_with_circular_padding_is_invariant_to_circular_shifts(
    patched: Patched, name: str
) -> None:
    model, report = patched(name, "aps-circular")
    assert report.skipped == 0 and all(c.changed for c in report.padding), name
    _assert_invariant(model, name, _paired_shifts(SIZE)[:16])


@SLOW
@pytest.mark.parametrize("name", MODELS)
def test_aps_with_circular_padding_is_invariant_to_every_row_and_column_shift(
    patched: Patched, name: str
) -> None:
    model, _ = patched(name, "aps-circular")
    _assert_invariant(model, name, _paired_shifts(SIZE))


@SLOW
def test_aps_resnet18_is_invariant_to_every_circular_shift(patched: Patched) -> None:
    model, _ = patched("resnet18", "aps-circular")
    image = _image()
    with torch.no_grad():
        reference = model(image)[0]
        for dy in range(SIZE):
            logits = model(_shifted(image, [(dy, dx) for dx in range(SIZE)]))
            spread = (logits - reference).abs().max().item()
            assert spread <= 1e-4 * reference.abs().max().item(), f"row shift {dy}: {spread:.3g}"


def test_circular_padding_alone_is_not_invariant(fresh_model: Callable[..., nn.Module]) -> None:
    # the control: circular padding without APS keeps strided subsampling at a fixed phase, so
    # the logits move under one-pixel shifts (the invariance tests can fail)
    policy = policy_from_dict(
        {
            "name": "circular",
            "description": "circular padding only",
            "padding": "circular",
            "rules": [{"match": {}, "action": "keep"}],
        },
        action_schemas(),
    )
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    model, report = surgeon.patch(fresh_model("resnet18"), policy, x)
    assert report.padding and all(c.changed for c in report.padding)
    with torch.no_grad():
        logits = model.eval()(_shifted(_image(), [(0, 0), (1, 0), (0, 1)]))
    assert (logits - logits[:1]).abs().max() > 1e-3 * logits.abs().max()


@pytest.mark.parametrize("name", [MODELS[0], *(pytest.param(n, marks=SLOW) for n in MODELS[1:])])
def test_consistency_without_circular_padding_or_at_other_sizes_is_measured(
    patched: Patched, name: str, record_property: Callable[[str, object], None]
) -> None:
    # exact invariance needs circular padding and a size the total stride divides: elsewhere
    # the consistency is a measurement (docs/designs.md), so it is recorded, not asserted
    shifts = _paired_shifts(SIZE)[:16]
    kept = _consistency(patched(name, "aps")[0], SIZE, shifts)
    odd = SIZE + 1
    other = _consistency(patched(name, "aps-circular", odd)[0], odd, shifts)
    record_property(f"{name} aps at {SIZE} px", kept)
    record_property(f"{name} aps-circular at {odd} px", other)
    assert 0.0 <= kept <= 1.0 and 0.0 <= other <= 1.0


@pytest.mark.parametrize("name", MODELS)
def test_lps_equals_the_original_model_at_init(
    fresh_model: Callable[..., nn.Module], patched: Patched, name: str
) -> None:
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = fresh_model(name)(x)
    model, report = patched(name, "lps")
    assert report.output_rel_diff <= 1e-5, report.output_rel_diff
    assert all(r.transfer == "exact" for r in report.rows if r.status == "patched")
    with torch.no_grad():
        got = model(x)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"{name}: LPS at init differs from the original by {error:.2e}"


def test_lps_in_training_sends_gradients_to_every_scoring_network(patched: Patched) -> None:
    model, _ = patched("resnet18", "lps")
    samplers = [m for m in model.modules() if isinstance(m, LearnablePolyphaseSampling)]
    scored = [m for m in samplers if m.role != "follower"]
    assert len(samplers) == 8 and len(scored) == 5  # three shortcuts follow their main path
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model(x).logsumexp(1).sum().backward()
    for sampler in scored:
        last = sampler.score[2].weight.grad
        assert last is not None and last.abs().sum() > 0, "no gradient reached a scoring network"
        assert sampler.phase_bias.grad is not None and sampler.phase_bias.grad.abs().sum() > 0
