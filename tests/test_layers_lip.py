"""LocalImportancePool: exactly nn.AvgPool at init for every padding, ceil_mode and
count_include_pad setting, a weighted mean once trained, bounded importance, transfer verdicts,
config round trip and deployment."""

from __future__ import annotations

import io
import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers import LocalImportancePool, pool_arguments

LIP = LocalImportancePool
AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def trained(lip: LIP, seed: int = 0) -> LIP:
    """The layer with random logit weights, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lip.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return lip


def test_lip_equals_average_pooling_at_init_for_every_configuration() -> None:
    cases = 0
    for k, s, p, ceil, cip in itertools.product(
        [1, 2, 3, 4, 5], [1, 2, 3, 4], [0, 1, 2], *[[False, True]] * 2
    ):
        if 2 * p > k:
            continue
        lip = LIP(3, kernel_size=k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=cip)
        pool = nn.AvgPool2d(k, s, p, ceil, cip)
        for size in [(5, 6), (7, 7), (8, 11)]:
            x = torch.randn(2, 3, *size)
            expected, got = pool(x), lip(x)
            assert got.shape == expected.shape, (k, s, p, ceil, cip, size)
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), (k, s, p, ceil, cip, size)
            cases += 1
    assert cases > 300


@pytest.mark.parametrize("dims", [1, 3])
def test_lip_equals_average_pooling_at_init_in_one_and_three_dims(dims: int) -> None:
    for ceil, cip in itertools.product([False, True], repeat=2):
        lip = LIP(
            2, dims=dims, kernel_size=3, stride=2, padding=1, ceil_mode=ceil, count_include_pad=cip
        )
        pool = AVG[dims](3, 2, 1, ceil, cip)
        x = torch.randn([2, 2, *[6, 5, 7][:dims]])
        assert torch.allclose(lip(x), pool(x), rtol=1e-6, atol=1e-7), (dims, ceil, cip)


def test_trained_lip_is_a_weighted_mean_within_each_window() -> None:
    lip = trained(LIP(4, kernel_size=3, stride=2, padding=1, count_include_pad=False))
    x = torch.randn(2, 4, 9, 10)
    out = lip(x)
    upper = F.max_pool2d(x, 3, 2, 1)
    lower = -F.max_pool2d(-x, 3, 2, 1)
    assert (out <= upper + 1e-6).all() and (out >= lower - 1e-6).all()
    assert not torch.allclose(out, F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))


def test_lip_importance_is_bounded_so_large_logits_cannot_overflow() -> None:
    lip = trained(LIP(2))
    with torch.no_grad():
        lip.logit[1].weight.fill_(1e6)
    out = lip(torch.randn(1, 2, 8, 8) * 1e3)
    assert torch.isfinite(out).all()


def test_gradients_reach_the_logit_network_at_init() -> None:
    lip = LIP(3)
    x = torch.randn(2, 3, 8, 8)
    (lip(x) * torch.randn(2, 3, 4, 4)).sum().backward()
    norm = lip.logit[1]
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_lip_from_pools_reports_its_transfer() -> None:
    lip, transfer = LIP.from_pool(
        channels=3, **pool_arguments(nn.AvgPool2d(3, 2, 1, ceil_mode=True))
    )
    assert transfer == "exact" and lip.ceil_mode and lip.count_include_pad
    lip, transfer = LIP.from_pool(channels=3, **pool_arguments(nn.MaxPool2d(3, 2, 1)))
    assert transfer == "approximate" and not lip.count_include_pad
    x = torch.randn(1, 3, 9, 9)
    assert torch.allclose(lip(x), F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))
    _, transfer = LIP.from_pool(channels=3, **pool_arguments(nn.AvgPool2d(2, divisor_override=3)))
    assert transfer == "approximate"
    lip, _ = LIP.from_pool("avg", 3, 2, 2, None)
    assert lip.stride == (2, 2)
    with pytest.raises(ValueError, match="without gaps"):
        LIP.from_pool(channels=3, **pool_arguments(nn.MaxPool2d(3, 2, 1, dilation=2)))
    with pytest.raises(ValueError, match="'same'"):
        LIP.from_pool("max", 3, 2, 3, 2, "same")
    with pytest.raises(ValueError, match="half the kernel"):
        LIP(3, kernel_size=2, padding=2)


def test_lip_config_round_trips_through_json() -> None:
    for lip in [
        LIP(8),
        LIP(4, dims=1, kernel_size=2, stride=2, padding=0, ceil_mode=True, logit_groups=4),
    ]:
        config = json.loads(json.dumps(lip.config()))
        rebuilt = LIP(**config)
        assert rebuilt.config() == lip.config()
        rebuilt.load_state_dict(trained(lip).state_dict())
        x = torch.randn([2, lip.channels] + [7] * lip.dims)
        assert torch.equal(rebuilt(x), lip(x))


def test_lip_traces_and_scripts_with_dynamic_sizes() -> None:
    lip = trained(LIP(3, ceil_mode=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lip, torch.randn(2, 3, 8, 8))
        scripted = torch.jit.script(lip)
    for shape in [(2, 3, 8, 8), (1, 3, 11, 6)]:
        x = torch.randn(shape)
        assert torch.allclose(traced(x), lip(x), atol=1e-6), shape
        assert torch.allclose(scripted(x), lip(x), atol=1e-6), shape


def test_lip_exports_with_torch_export_dynamic_shapes() -> None:
    # ceil_mode is left out: PyTorch's own ceil_mode pools do not export with dynamic sizes
    lip = trained(LIP(3))
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
    program = torch.export.export(lip, (torch.randn(2, 3, 10, 12),), dynamic_shapes={"x": dynamic})
    for shape in [(3, 3, 9, 13), (1, 3, 16, 7)]:
        x = torch.randn(shape)
        assert torch.allclose(program.module()(x), lip(x), atol=1e-6), shape


@pytest.mark.parametrize(("count_include_pad", "ceil_mode"), [(True, False), (False, True)])
def test_lip_exports_to_onnx_with_dynamic_axes(count_include_pad: bool, ceil_mode: bool) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    lip = trained(LIP(3, count_include_pad=count_include_pad, ceil_mode=ceil_mode))
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            lip, (torch.randn(2, 3, 8, 8),), buffer, dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 12, 10), (1, 3, 9, 7)]:
        x = torch.randn(shape)
        (out,) = session.run(None, {"x": x.numpy()})
        expected = lip(x).detach()
        assert float((torch.from_numpy(out) - expected).norm() / expected.norm()) <= 1e-5, shape


def test_lip_runs_off_the_cpu_with_the_cpu_shapes() -> None:
    x = torch.randn(2, 3, 9, 10)
    lip = LIP(3, ceil_mode=True)
    assert lip.to("meta")(x.to("meta")).shape == LIP(3, ceil_mode=True)(x).shape
