"""SFM's adaptive resampling (AdaptiveResampling) and upsampling (AdaptiveUpsampling): the
identity at init (grid_sample conventions), offsets that move samples towards salient positions,
gradients to the offset predictor, the upsampler equal to F.interpolate at init, config round
trip and deployment."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.layers import AdaptiveResampling, AdaptiveUpsampling
from surgeon.layers.sfm import SaliencyOffsets, identity_grid

ARS = AdaptiveResampling
MSAU = AdaptiveUpsampling


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def trained(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """The module with random predictor weights, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


# --------------------------------------------------------------------------- resampling


def test_identity_grid_is_grid_samples_pixel_centres() -> None:
    x = torch.randn(1, 2, 16, 32)
    ys, xs = identity_grid([16, 32], x)
    grid = torch.stack(torch.broadcast_tensors(xs, ys), -1)
    out = F.grid_sample(x, grid, "bilinear", "border", align_corners=False)
    assert torch.equal(out, x), "power-of-two sizes are exact bit for bit"


@pytest.mark.parametrize("size", [(7, 9), (16, 16), (31, 12), (97, 131), (255, 257)])
def test_resampling_is_the_identity_at_init(size: tuple[int, int]) -> None:
    ars = ARS(3)
    x = torch.randn(2, 3, *size)
    out = ars(x)
    assert out.shape == x.shape
    assert relative(out, x) <= 1e-5, size
    assert torch.equal(ars.offsets(x), torch.zeros(2, 2, *size)), "offsets must start at zero"


def test_resampling_is_the_identity_at_init_in_three_dims() -> None:
    ars = ARS(2, dims=3, dilations=[1, 2])
    x = torch.randn(1, 2, 5, 8, 7)
    assert relative(ars(x), x) <= 1e-5


def test_resampling_before_a_strided_conv_keeps_the_conv_exact_at_init() -> None:
    conv = nn.Conv2d(3, 6, 3, 2, 1)
    ars, transfer = ARS.from_conv(conv)
    assert transfer == "exact" and ars.channels == 3
    x = torch.randn(2, 3, 17, 20)
    assert relative(conv(ars(x)), conv(x)) <= 1e-5
    ars, transfer = ARS.from_pool("max", 4, 2, 3, 2, 1)
    assert transfer == "exact" and ars.channels == 4
    with pytest.raises(ValueError, match="does not downsample"):
        ARS.from_conv(nn.Conv2d(3, 6, 3, 1, 1))
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        ARS(3, dims=1)


def test_offsets_pull_samples_towards_a_salient_position() -> None:
    offsets = SaliencyOffsets(1, dims=2, radius=2, dilations=[1])
    offsets.predict = nn.Identity()  # the saliency logit is the input itself
    saliency = torch.zeros(1, 1, 11, 11)
    saliency[0, 0, 5, 5] = 3.0
    moved = offsets(saliency)[0]  # (2, 11, 11): rows, then columns
    assert moved[0, 3, 5] > 0 and moved[0, 7, 5] < 0, "rows above/below must move towards it"
    assert moved[1, 5, 3] > 0 and moved[1, 5, 7] < 0, "columns left/right must move towards it"
    assert moved[:, 5, 5].abs().max() < 1e-6, "the salient position itself stays"
    assert moved[:, 0, 0].abs().max() == 0, "positions out of its window do not move"
    assert moved.abs().max() <= 2.0, "offsets are convex combinations of the window taps"


def test_trained_resampling_moves_samples_and_trains_its_predictor() -> None:
    ars = ARS(3)
    x = torch.randn(2, 3, 12, 12)
    (ars(x) * torch.randn(2, 3, 12, 12)).sum().backward()
    last = ars.offsets.predict[2]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0, (
        "no gradient reaches the offset predictor at init"
    )
    trained(ars)
    assert relative(ars(x), x) > 1e-3, "a trained predictor should move samples"


# --------------------------------------------------------------------------- upsampling


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale_factor": 2},
        {"scale_factor": 2.5},
        {"scale_factor": [3, 2]},
        {"size": [15, 20]},
        {"scale_factor": 2, "align_corners": True},
        {"size": [15, 20], "align_corners": True},
    ],
)
def test_upsampling_equals_bilinear_interpolation_at_init(kwargs: dict[str, object]) -> None:
    up = MSAU(3, **kwargs)  # type: ignore[arg-type]
    reference = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    for size in [(7, 9), (8, 8)]:
        x = torch.randn(2, 3, *size)
        expected = F.interpolate(x, mode="bilinear", **reference)  # type: ignore[arg-type]
        got = up(x)
        assert got.shape == expected.shape, (kwargs, size)
        assert relative(got, expected) <= 1e-5, (kwargs, size)


def test_upsampling_takes_its_size_at_run_time() -> None:
    up = MSAU(3)
    x = torch.randn(1, 3, 7, 9)
    expected = F.interpolate(x, size=(14, 17), mode="bilinear")
    assert relative(up(x, [14, 17]), expected) <= 1e-5
    with pytest.raises(ValueError, match="needs size="):
        up(x)


def test_upsampling_equals_trilinear_interpolation_at_init_in_three_dims() -> None:
    up = MSAU(2, dims=3, scale_factor=2)
    x = torch.randn(1, 2, 4, 5, 3)
    assert relative(up(x), F.interpolate(x, scale_factor=2, mode="trilinear")) <= 1e-5


def test_upsampling_from_interpolate_reports_its_transfer() -> None:
    assert MSAU.from_interpolate(3, dims=2, scale_factor=2, mode="bilinear")[1] == "exact"
    assert MSAU.from_interpolate(3, dims=3, size=[4, 4, 4], mode="trilinear")[1] == "exact"
    assert MSAU.from_interpolate(3, dims=2, scale_factor=2, mode="nearest")[1] == "approximate"
    with pytest.raises(ValueError, match="not both"):
        MSAU(3, size=[4, 4], scale_factor=2)


def test_trained_upsampling_moves_samples_and_trains_its_predictor() -> None:
    up = MSAU(3, scale_factor=2)
    x = torch.randn(2, 3, 8, 8)
    (up(x) * torch.randn(2, 3, 16, 16)).sum().backward()
    last = up.offsets.predict[2]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    trained(up)
    assert relative(up(x), F.interpolate(x, scale_factor=2, mode="bilinear")) > 1e-3


# --------------------------------------------------------------------------- construction


def test_sfm_configs_round_trip_through_json() -> None:
    x2, x3 = torch.randn(1, 3, 5, 6), torch.randn(1, 2, 5, 6, 4)
    cases: list[tuple[nn.Module, tuple[object, ...]]] = [
        (ARS(3, radius=1, dilations=[1, 3]), (x2,)),
        (ARS(2, dims=3), (x3,)),
        (MSAU(3, size=[10, 12], align_corners=True), (x2,)),
        (MSAU(3, scale_factor=[2, 3], radius=2), (x2,)),
        (MSAU(3), (x2, [9, 11])),
    ]
    for layer, args in cases:
        config = json.loads(json.dumps(layer.config()))  # type: ignore[operator]
        rebuilt = type(layer)(**config)
        assert rebuilt.config() == layer.config()  # type: ignore[operator]
        rebuilt.load_state_dict(trained(layer).state_dict())
        assert torch.equal(rebuilt(*args), layer(*args)), type(layer).__name__


# --------------------------------------------------------------------------- deployment


@pytest.mark.parametrize("kind", ["resampling", "upsampling"])
def test_sfm_layers_trace_and_script_with_dynamic_sizes(kind: str) -> None:
    layer = trained(ARS(3) if kind == "resampling" else MSAU(3, scale_factor=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, torch.randn(2, 3, 8, 8))
        scripted = torch.jit.script(layer)
    for shape in [(2, 3, 8, 8), (1, 3, 11, 6)]:
        x = torch.randn(shape)
        assert torch.allclose(traced(x), layer(x), atol=1e-5), shape
        assert torch.allclose(scripted(x), layer(x), atol=1e-5), shape


@pytest.mark.parametrize("kind", ["resampling", "upsampling"])
def test_sfm_layers_export_with_torch_export_dynamic_shapes(kind: str) -> None:
    layer = trained(ARS(3) if kind == "resampling" else MSAU(3, scale_factor=2))
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
    program = torch.export.export(
        layer, (torch.randn(2, 3, 10, 12),), dynamic_shapes={"x": dynamic}
    )
    for shape in [(3, 3, 9, 13), (1, 3, 16, 7)]:
        x = torch.randn(shape)
        assert torch.allclose(program.module()(x), layer(x), atol=1e-5), (kind, shape)


@pytest.mark.parametrize("kind", ["resampling", "upsampling"])
def test_sfm_layers_export_to_onnx_with_grid_sample(kind: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    layer = trained(ARS(3) if kind == "resampling" else MSAU(3, scale_factor=2))
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer, (torch.randn(2, 3, 8, 8),), buffer, dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert "GridSample" in ops, ops
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 12, 10), (1, 3, 9, 7)]:
        x = torch.randn(shape)
        (out,) = session.run(None, {"x": x.numpy()})
        assert relative(torch.from_numpy(out), layer(x)) <= 1e-5, (kind, shape)


@pytest.mark.parametrize("kind", ["resampling", "upsampling"])
def test_sfm_layers_run_off_the_cpu_with_the_cpu_shapes(kind: str) -> None:
    def build() -> nn.Module:
        return ARS(3) if kind == "resampling" else MSAU(3, scale_factor=2)

    x = torch.randn(2, 3, 9, 10)
    assert build().to("meta")(x.to("meta")).shape == build()(x).shape
