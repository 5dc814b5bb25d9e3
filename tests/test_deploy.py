"""Patched models behave as ordinary modules: channels_last, bfloat16 autocast, torch.compile and
DistributedDataParallel each run a forward and a backward pass on a patched resnet18."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.layers.blur import BlurPool
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.models import load_model
from surgeon.patch import patch

POLICIES = ["spd", "antialias"]
SIZE = 48


@pytest.fixture(scope="module")
def patched() -> dict[str, nn.Module]:
    """resnet18 patched with each policy at 48×48 (patched once per module), in train mode."""
    models = {}
    for policy in POLICIES:
        torch.manual_seed(0)
        model, report = patch(load_model("resnet18").model, policy, torch.randn(1, 3, SIZE, SIZE))
        assert report.patched >= 7
        models[policy] = model.train()
    return models


def _batch(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _loss(output: torch.Tensor) -> torch.Tensor:
    return output.float().logsumexp(dim=1).mean()


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and parameter gradients of one forward/backward pass."""
    model.zero_grad(set_to_none=True)
    output = model(x)
    _loss(output).backward()
    grads = {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
    }
    assert len(grads) == len(list(model.parameters())), "every parameter gets a gradient"
    return output.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-12)).item()


def _replacement_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SpaceToDepthConv, BlurPool))]


@pytest.mark.parametrize("policy", POLICIES)
def test_channels_last_gives_the_same_outputs_and_gradients(
    patched: dict[str, nn.Module], policy: str
) -> None:
    model = copy.deepcopy(patched[policy])
    expected, expected_grads = _step(model, _batch())
    model = model.to(memory_format=torch.channels_last)
    x = _batch().to(memory_format=torch.channels_last)
    output, grads = _step(model, x)
    assert _rel(expected, output) < 1e-4
    worst = max(_rel(expected_grads[k], grads[k]) for k in expected_grads)
    assert worst < 1e-3, f"channels_last gradients differ by {worst:.1e}"
    layer = _replacement_layers(model)[0]
    probe: list[torch.Tensor] = []
    layer.register_forward_hook(lambda m, a, out: probe.append(out))
    with torch.no_grad():
        model(x)
    assert probe[0].is_contiguous(memory_format=torch.channels_last), (
        f"{type(layer).__name__} turned a channels_last input into a contiguous output"
    )


@pytest.mark.parametrize("policy", POLICIES)
def test_bfloat16_autocast_runs_forward_and_backward(
    patched: dict[str, nn.Module], policy: str
) -> None:
    model = copy.deepcopy(patched[policy])
    reference, _ = _step(copy.deepcopy(model), _batch())
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(_batch())
    assert output.dtype == torch.bfloat16
    _loss(output).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradients under autocast"
    # bfloat16 keeps ~3 significant digits; through 18 layers the logits stay close
    cosine = nn.functional.cosine_similarity(reference.flatten(), output.float().flatten(), dim=0)
    assert cosine > 0.99, f"bfloat16 output drifted from float32 (cosine {cosine:.4f})"


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_torch_compile_runs_forward_and_backward(
    patched: dict[str, nn.Module], policy: str
) -> None:
    model = copy.deepcopy(patched[policy])
    expected, expected_grads = _step(copy.deepcopy(model), _batch())
    compiled = torch.compile(model)
    output, grads = _step(compiled, _batch())  # type: ignore[arg-type]
    assert _rel(expected, output) < 1e-4
    worst = max(_rel(expected_grads[k], grads[f"_orig_mod.{k}"]) for k in expected_grads)
    assert worst < 1e-3, f"compiled gradients differ by {worst:.1e}"


def _ddp_worker(rank: int, world: int, init_file: str, model: nn.Module, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ddp = DistributedDataParallel(model)
        _, grads = _step(ddp, _batch(seed=rank))
        torch.save(
            {k.removeprefix("module."): v for k, v in grads.items()}, Path(out_dir) / f"{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_distributed_data_parallel_averages_gradients_over_two_processes(
    patched: dict[str, nn.Module], policy: str, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    model = patched[policy]
    world = 2
    mp.spawn(
        _ddp_worker,
        args=(world, str(tmp_path / "rendezvous"), model, str(tmp_path)),
        nprocs=world,
        join=True,
    )
    per_rank = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    # Without DDP: each rank's batch on its own copy (BatchNorm statistics stay per process).
    local = [_step(copy.deepcopy(model), _batch(seed=r))[1] for r in range(world)]
    for name, grad in per_rank[0].items():
        torch.testing.assert_close(
            grad, per_rank[1][name], msg=f"{name}: ranks disagree after all-reduce"
        )
        average = (local[0][name] + local[1][name]) / world
        assert _rel(average, grad) < 1e-3, f"{name}: DDP gradient is not the average over ranks"
