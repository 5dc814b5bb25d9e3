"""torch.compile on patched models: a tiny network patched with `spd` and with `antialias`
compiles as one graph and gives the eager model's outputs and gradients.

The default suite compiles with the `aot_eager` backend (TorchDynamo's graph capture and
AOTAutograd's forward and backward graphs, run by eager kernels): it checks everything
`torch.compile` does to the replacement layers except Inductor's code generation, whose C++
compile (gcc) is too slow for the default suite even at this size. The same check with
Inductor, the default backend, is marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.patch import patch

POLICIES = ["spd", "antialias"]


def _tiny() -> nn.Module:
    """A strided conv stem, a max pool, an average pool and a strided conv: sites for both."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def _patched(policy: str) -> nn.Module:
    torch.manual_seed(0)
    model, report = patch(_tiny(), policy, torch.randn(1, 3, 32, 32))
    assert report.patched >= 2, f"{policy} patched {report.patched} sites of the tiny model"
    return model.train()


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(x)
    output.square().mean().backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters())), "every parameter gets a gradient"
    return output.detach(), grads


def _compiled_matches_eager(policy: str, backend: str) -> None:
    model = _patched(policy)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected, expected_grads = _step(model, x)
    model.load_state_dict(state)  # batch-norm running stats as before the eager step
    torch.compiler.reset()  # a fresh compile for each case
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    output, grads = _step(compiled, x)  # type: ignore[arg-type]
    assert torch.allclose(output, expected, rtol=1e-5, atol=1e-6), (
        f"{policy} compiled with {backend}: outputs differ from eager by "
        f"{(output - expected).abs().max().item():.2e}"
    )
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (
            f"{policy} compiled with {backend}: gradients differ from eager by "
            f"{(got - want).abs().max().item():.2e}"
        )


@pytest.mark.parametrize("policy", POLICIES)
def test_patched_model_compiles_as_one_graph_with_eager_outputs_and_gradients(
    policy: str,
) -> None:
    _compiled_matches_eager(policy, "aot_eager")


@pytest.mark.slow  # Inductor's C++ compile of every graph
@pytest.mark.parametrize("policy", POLICIES)
def test_patched_model_compiled_by_inductor_matches_eager(
    policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    _compiled_matches_eager(policy, "inductor")
