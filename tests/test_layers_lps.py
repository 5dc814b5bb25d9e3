"""LearnablePolyphaseSampling: exact at init against the strided layer it follows, training
(Gumbel-softmax, gradients reaching the score network), evaluation (argmax per sample, exact
circular-shift behaviour), leader/follower sharing, config round trip and deployment."""

from __future__ import annotations

import copy
import io
import itertools
import json
import warnings

import pytest
import torch
from torch import Tensor, nn

from surgeon.layers import LearnablePolyphaseSampling, pool_arguments, share_phase

LPS = LearnablePolyphaseSampling


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def randomised(lps: LPS, seed: int = 0) -> LPS:
    """The layer with every score weight drawn at random and no bias towards component 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lps.score.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        lps.phase_bias.zero_()
    return lps


def dense(conv: nn.Conv2d) -> nn.Conv2d:
    """`conv` at stride 1 with the same padding and weights."""
    copied = copy.deepcopy(conv)
    copied.stride = (1, 1)
    return copied


# --------------------------------------------------------------------------- exact at init


@pytest.mark.parametrize("stride", [2, 3, 4, (2, 3)])
def test_lps_after_the_stride_one_conv_equals_the_strided_conv_at_init(stride: object) -> None:
    for kernel, padding, groups in [(3, 1, 1), (1, 0, 1), (7, 3, 1), (3, 1, 4), (2, 0, 2)]:
        conv = nn.Conv2d(4, 8, kernel, stride, padding, groups=groups)  # type: ignore[arg-type]
        lps, transfer = LPS.from_conv(conv)
        assert transfer == "exact"
        lps.eval()
        for size in [(9, 10), (16, 13), (7, 7)]:
            x = torch.randn(2, 4, *size)
            expected = conv(x)
            got = lps(dense(conv)(x))
            assert got.shape == expected.shape, (kernel, stride, size)
            assert relative(got, expected) <= 1e-5, (kernel, padding, groups, stride, size)


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, 2, 1),
        nn.MaxPool2d(2, 2),
        nn.MaxPool2d(3, 3, 1, dilation=2),
        nn.AvgPool2d(3, 2, 1),
        nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.AvgPool2d(4, 4),
    ],
)
def test_lps_after_the_stride_one_pool_equals_the_strided_pool_at_init(pool: nn.Module) -> None:
    args = pool_arguments(pool)
    lps, transfer = LPS.from_pool(channels=3, **args)
    assert transfer == "exact"
    lps.eval()
    stride_one = copy.deepcopy(pool)
    stride_one.stride = 1  # type: ignore[assignment]
    for size in [(9, 10), (12, 12), (11, 7)]:
        x = torch.randn(2, 3, *size)
        expected = pool(x)
        got = lps(stride_one(x))
        assert got.shape == expected.shape, (pool, size)
        assert torch.equal(got, expected), (pool, size)


def test_lps_is_exact_through_a_norm_and_activation() -> None:
    # component 0 commutes with pointwise layers: LPS may go after BN + ReLU, as in the paper
    conv = nn.Conv2d(3, 5, 3, 2, 1)
    block = nn.Sequential(dense(conv), nn.BatchNorm2d(5), nn.ReLU()).eval()
    reference = nn.Sequential(conv, block[1], block[2]).eval()
    lps, _ = LPS.from_conv(conv)
    x = torch.randn(2, 3, 11, 12)
    assert relative(lps.eval()(block(x)), reference(x)) <= 1e-5


# --------------------------------------------------------------------------- training


def test_lps_training_at_init_stays_near_component_zero_and_trains_the_scores() -> None:
    lps = LPS(8, stride=2).train()
    x = torch.randn(4, 8, 10, 10)
    out = lps(x)
    assert relative(out, x[:, :, ::2, ::2]) < 0.05, "training at init strays far from component 0"
    out.square().sum().backward()
    last = lps.score[2]
    assert last.weight.grad is not None and torch.isfinite(last.weight.grad).all()
    assert last.weight.grad.abs().sum() > 0, "no gradient reaches the score network"
    assert lps.phase_bias.grad is not None and lps.phase_bias.grad.abs().sum() > 0
    # after one step the first conv is reached too
    with torch.no_grad():
        last.weight -= 0.1 * last.weight.grad
    lps.zero_grad()
    lps(x).square().sum().backward()
    first = lps.score[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_lps_straight_through_keeps_one_component_per_sample_in_training() -> None:
    lps = randomised(LPS(4, stride=2, straight_through=True)).train()
    x = torch.randn(6, 4, 8, 8)
    out = lps(x)
    parts = [x[:, :, r::2, c::2] for r in range(2) for c in range(2)]
    for n in range(6):
        assert any(torch.allclose(out[n], p[n]) for p in parts), f"sample {n} is a mixture"
    out.sum().backward()
    assert lps.score[2].weight.grad is not None and lps.score[2].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- evaluation


def test_lps_picks_per_sample_in_evaluation() -> None:
    lps = randomised(LPS(4, stride=2)).eval()
    x = torch.randn(8, 4, 6, 6)
    out = lps(x)
    parts = [x[:, :, r::2, c::2] for r in range(2) for c in range(2)]
    picked = [next(k for k, p in enumerate(parts) if torch.equal(out[n], p[n])) for n in range(8)]
    assert len(set(picked)) > 1, f"every sample took component {picked[0]}"


@pytest.mark.parametrize(("stride", "size"), [(2, 6), (3, 6)])
def test_lps_in_evaluation_circularly_shifts_its_output_with_the_input(
    stride: int, size: int
) -> None:
    lps = randomised(LPS(3, stride=stride), seed=1).eval().requires_grad_(False)
    x = torch.randn(2, 3, size, size)
    y = lps(x)
    for dy, dx in itertools.product(range(size), repeat=2):
        shifted = lps(x.roll((dy, dx), (2, 3)))
        for n in range(2):
            rolled = [
                y[n].roll((a, b), (1, 2)) for a in range(y.shape[2]) for b in range(y.shape[3])
            ]
            assert any(torch.allclose(shifted[n], r, atol=1e-6) for r in rolled), (dy, dx, n)


def test_lps_phase_bias_breaks_the_invariance_until_it_is_equal() -> None:
    # the documented cost of the exact start: component 0 wins whatever the content
    lps = LPS(3).eval()
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(lps(x.roll(1, 2)), x.roll(1, 2)[:, :, ::2, ::2])


# --------------------------------------------------------------------------- sharing


def test_lps_followers_take_the_leaders_index_and_weights() -> None:
    leader = randomised(LPS(4, role="leader"))
    follower = LPS(4, role="follower")
    assert list(follower.state_dict()) == [], "a follower has no score network"
    share_phase(leader, [follower])
    x = torch.randn(3, 4, 9, 8)
    for train in (False, True):
        leader.train(train)
        follower.train(train)
        torch.manual_seed(3)
        expected = leader(x)
        assert torch.equal(follower(x), expected), f"train={train}"


def test_lps_follower_gradients_reach_the_leaders_scores_in_training() -> None:
    leader, follower = LPS(4, role="leader").train(), LPS(4, role="follower").train()
    share_phase(leader, [follower])
    x = torch.randn(2, 4, 8, 8)
    leader(x)
    follower(torch.randn(2, 4, 8, 8)).square().sum().backward()
    assert leader.phase_bias.grad is not None and leader.phase_bias.grad.abs().sum() > 0


# --------------------------------------------------------------------------- construction


def test_lps_config_round_trips_through_json() -> None:
    layers = [
        LPS(16),
        LPS(4, dims=1, stride=3, hidden_channels=5, margin=3.0, tau=0.5, role="leader"),
        LPS(4, dims=3, stride=[2, 1, 2], filter_size=3, straight_through=True),
        LPS(8, role="follower"),
    ]
    for lps in layers:
        config = json.loads(json.dumps(lps.config()))
        rebuilt = type(lps)(**config)
        assert rebuilt.config() == lps.config()
        state = lps.state_dict()
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in state.items()
        }
        if lps.role == "follower":
            continue
        rebuilt.load_state_dict(randomised(lps).state_dict())
        x = torch.randn([2, lps.channels] + [6] * lps.dims)
        rebuilt.role = lps.role = "alone"
        assert torch.equal(rebuilt.eval()(x), lps.eval()(x))


def test_lps_constructors_report_their_transfer() -> None:
    assert LPS.from_conv(nn.Conv2d(3, 4, 3, 2, 1), filter_size=3)[1] == "approximate"
    assert LPS.from_conv(nn.Conv1d(3, 4, 3, 2, 1))[0].dims == 1
    assert LPS.from_pool("max", 3, 2, 3, 2, "same")[1] == "approximate"
    with pytest.raises(ValueError, match="ceil_mode"):
        LPS.from_pool("avg", 3, 2, 3, 2, 1, 1, True)
    with pytest.raises(ValueError, match="tau must be"):
        LPS(3, tau=0.0)


# --------------------------------------------------------------------------- deployment


def test_lps_traces_and_scripts_in_evaluation() -> None:
    lps = randomised(LPS(4, stride=(2, 3))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lps, torch.randn(2, 4, 8, 9))
        scripted = torch.jit.script(lps)
    for shape in [(2, 4, 8, 9), (3, 4, 11, 7)]:
        x = torch.randn(shape)
        assert torch.equal(traced(x), lps(x)), shape
        assert torch.equal(scripted(x), lps(x)), shape


def test_lps_exports_with_torch_export_dynamic_shapes() -> None:
    lps = randomised(LPS(4, stride=(2, 3))).eval()
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
    program = torch.export.export(lps, (torch.randn(2, 4, 10, 12),), dynamic_shapes={"x": dynamic})
    for shape in [(3, 4, 9, 13), (1, 4, 16, 7)]:
        x = torch.randn(shape)
        assert torch.equal(program.module()(x), lps(x)), shape


def test_lps_exports_to_onnx_with_dynamic_axes() -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    lps = randomised(LPS(4)).eval()
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            lps, (torch.randn(2, 4, 8, 8),), buffer, dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert {"ArgMax", "Gather"} <= ops, ops
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(3, 4, 12, 10), (1, 4, 9, 7)]:
        x = torch.randn(shape)
        (out,) = session.run(None, {"x": x.numpy()})
        assert relative(torch.from_numpy(out), lps(x)) <= 1e-5, shape


@pytest.mark.parametrize("train", [False, True])
def test_lps_runs_off_the_cpu_with_the_cpu_shapes(train: bool) -> None:
    # the meta device has no data: any host read or CPU-only index would fail here
    lps = LPS(4, stride=3).train(train)
    x = torch.randn(2, 4, 9, 10)
    assert lps.to("meta")(x.to("meta")).shape == LPS(4, stride=3).train(train)(x).shape
