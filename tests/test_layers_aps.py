"""AdaptivePolyphaseSampling and the polyphase leader/follower link: the selection against a
slicing reference, output sizes, exact circular-shift behaviour, per-sample choice, shared
selections (deepcopy, pickling, state dicts), config round trip and deployment."""

from __future__ import annotations

import copy
import io
import itertools
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.errors import PatchError
from surgeon.layers import AdaptivePolyphaseSampling, binomial_filter, share_phase

APS = AdaptivePolyphaseSampling


def reference(x: Tensor, stride: tuple[int, int], norm: str, filter_size: int = 1) -> Tensor:
    """The paper's definition by slicing: circular blur, circular wrap, largest component."""
    if filter_size > 1:
        left, right = (filter_size - 1) // 2, filter_size // 2
        x = F.pad(x, [left, right, left, right], mode="circular")
        weight = binomial_filter(filter_size, 2)[None, None].repeat(x.shape[1], 1, 1, 1)
        x = F.conv2d(x, weight, groups=x.shape[1])
    h, w = x.shape[2:]
    rows = torch.arange(-(-h // stride[0]) * stride[0]) % h
    cols = torch.arange(-(-w // stride[1]) * stride[1]) % w
    x = x[:, :, rows][:, :, :, cols]
    parts = [
        x[:, :, i :: stride[0], j :: stride[1]] for i in range(stride[0]) for j in range(stride[1])
    ]
    order = {"l2": 2, "l1": 1, "linf": float("inf")}[norm]
    norms = torch.stack([p.flatten(1).norm(p=order, dim=1) for p in parts], 1)
    best = norms.argmax(1)
    return torch.stack([parts[int(best[n])][n] for n in range(x.shape[0])])


def rolls_of(y: Tensor) -> list[Tensor]:
    return [y.roll((a, b), (2, 3)) for a in range(y.shape[2]) for b in range(y.shape[3])]


# --------------------------------------------------------------------------- the selection


@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
@pytest.mark.parametrize("stride", [(2, 2), (3, 3), (4, 4), (2, 3)])
def test_aps_keeps_the_largest_norm_component_at_odd_and_even_sizes(
    norm: str, stride: tuple[int, int]
) -> None:
    aps = APS(3, stride=stride, norm=norm)
    for size in [(8, 12), (9, 13), (5, 7)]:
        x = torch.randn(4, 3, *size)
        assert torch.equal(aps(x), reference(x, stride, norm)), (size, stride, norm)


@pytest.mark.parametrize("filter_size", [2, 3, 4, 7])
def test_aps_with_blur_selects_from_the_circularly_blurred_map(filter_size: int) -> None:
    aps = APS(3, filter_size=filter_size)
    for size in [(8, 8), (9, 6), (2, 3)]:  # 2 x 3 maps: the circular pad wraps several times
        x = torch.randn(2, 3, *size)
        expected = reference(x, (2, 2), "l2", filter_size) if min(size) > 3 else None
        out = aps(x)
        assert out.shape == (2, 3, -(-size[0] // 2), -(-size[1] // 2)), size
        if expected is not None:
            assert torch.allclose(out, expected, atol=1e-6), (filter_size, size)


def test_aps_picks_per_sample() -> None:
    # sample n has one large value at offset (n // 2, n % 2): each picks its own component
    x = torch.randn(4, 2, 6, 6) * 0.01
    for n in range(4):
        x[n, 0, 2 + n // 2, 2 + n % 2] = 10.0
    out = APS(2)(x)
    for n in range(4):
        r, c = n // 2, n % 2
        assert torch.equal(out[n], x[n, :, r::2, c::2]), f"sample {n} did not keep component {n}"


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_aps_after_a_stride_one_conv_has_the_strided_conv_size(stride: int) -> None:
    for kernel, padding in [(3, 1), (1, 0), (7, 3), (2, 0)]:
        strided = nn.Conv2d(2, 3, kernel, stride, padding)
        dense = nn.Conv2d(2, 3, kernel, 1, padding)
        aps, _ = APS.from_conv(strided)
        for size in [(9, 10), (16, 13), (7, 7)]:
            x = torch.randn(1, 2, *size)
            assert aps(dense(x)).shape == strided(x).shape, (kernel, padding, stride, size)


@pytest.mark.parametrize("dims", [1, 3])
def test_aps_works_in_one_and_three_dims(dims: int) -> None:
    aps = APS(2, dims=dims, stride=2)
    x = torch.randn([3, 2] + [5] * dims)
    out = aps(x)
    assert out.shape == tuple([3, 2] + [3] * dims)
    wrapped = x
    for d in range(dims):
        wrapped = wrapped.index_select(2 + d, torch.arange(6) % 5)
    components = []
    for offset in itertools.product(range(2), repeat=dims):
        index = (slice(None), slice(None), *(slice(o, None, 2) for o in offset))
        components.append(wrapped[index])
    norms = torch.stack([c.flatten(1).norm(dim=1) for c in components], 1)
    for n in range(3):
        assert torch.equal(out[n], components[int(norms[n].argmax())][n]), (dims, n)


# --------------------------------------------------------------------------- shifts


@pytest.mark.parametrize(
    ("stride", "filter_size", "size"), [(2, 1, 8), (2, 3, 6), (3, 1, 9), (4, 2, 8)]
)
def test_aps_circular_shift_of_the_input_circularly_shifts_the_output(
    stride: int, filter_size: int, size: int
) -> None:
    # sizes the stride divides: every shift permutes the components, so each sample's output
    # is its original output rolled by some amount (its own: samples choose independently)
    aps = APS(3, stride=stride, filter_size=filter_size)
    x = torch.randn(2, 3, size, size)
    y = aps(x)
    for dy, dx in itertools.product(range(size), repeat=2):
        shifted = aps(x.roll((dy, dx), (2, 3)))
        for n in range(2):
            rolled = rolls_of(y[n : n + 1])
            assert any(torch.allclose(shifted[n : n + 1], r, atol=1e-6) for r in rolled), (
                f"shift {(dy, dx)}: sample {n}'s output is no circular shift of its original"
            )


def test_strided_subsampling_is_not_shift_invariant() -> None:
    # the control for the test above: component 0 alone fails for odd shifts
    x = torch.randn(1, 3, 8, 8)
    y = x[:, :, ::2, ::2]
    shifted = x.roll((1, 0), (2, 3))[:, :, ::2, ::2]
    assert not any(torch.allclose(shifted, r) for r in rolls_of(y))


# --------------------------------------------------------------------------- the link


class Block(nn.Module):
    """A residual block whose main path leads and whose shortcut follows."""

    def __init__(self, norm: str = "l2") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.main = APS(4, norm=norm, role="leader")
        self.skip = APS(3, role="follower")
        self.proj = nn.Conv2d(3, 4, 1)
        share_phase(self.main, [self.skip])

    def forward(self, x: Tensor) -> Tensor:
        return self.main(self.conv(x)) + self.proj(self.skip(x))


def test_follower_takes_its_leaders_component() -> None:
    leader, follower = APS(3, role="leader"), APS(5, role="follower")
    share_phase(leader, [follower])
    x, other = torch.randn(4, 3, 8, 9), torch.randn(4, 5, 8, 9)
    leader(x)
    taken = follower(other)
    wrap = torch.arange(10) % 9
    parts = [x[:, :, :, wrap][:, :, r::2, c::2] for r in range(2) for c in range(2)]
    best = torch.stack([p.flatten(1).norm(dim=1) for p in parts], 1).argmax(1)
    for n in range(4):
        r, c = divmod(int(best[n]), 2)
        assert torch.equal(taken[n], other[n][:, :, wrap][:, r::2, c::2]), f"sample {n}"


def test_several_followers_share_one_selection() -> None:
    leader = APS(3, role="leader")
    followers = [APS(3, role="follower") for _ in range(3)]
    share_phase(leader, followers)
    x = torch.randn(2, 3, 6, 6)
    out = leader(x)
    for follower in followers:
        assert torch.equal(follower(x), out)


def test_follower_without_a_fresh_selection_raises() -> None:
    leader, follower = APS(3, role="leader"), APS(3, role="follower")
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(PatchError, match="no leader: link it with share_phase"):
        follower(x)
    share_phase(leader, [follower])
    with pytest.raises(PatchError, match="the leader must run first"):
        follower(x)
    leader(x)
    follower(x)
    with pytest.raises(PatchError, match="the leader must run first"):
        follower(x)  # the selection of that forward was used up


def test_follower_refuses_a_batch_of_another_size() -> None:
    leader, follower = APS(3, role="leader"), APS(3, role="follower")
    share_phase(leader, [follower])
    leader(torch.randn(2, 3, 4, 4))
    with pytest.raises(PatchError, match="same batch"):
        follower(torch.randn(3, 3, 4, 4))


def test_link_is_no_submodule_and_leaves_state_dicts_alone() -> None:
    leader, follower = APS(3, role="leader"), APS(3, role="follower")
    model = nn.ModuleDict({"leader": leader, "follower": follower})
    modules, keys = len(list(model.modules())), list(model.state_dict())
    share_phase(leader, [follower])
    assert len(list(model.modules())) == modules
    assert list(model.state_dict()) == keys


def test_deepcopy_keeps_the_link_inside_the_copy() -> None:
    block = Block()
    clone = copy.deepcopy(block)
    assert clone.main._link is clone.skip._link
    assert clone.main._link is not block.main._link
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(clone(x), block(x))
    clone.main(clone.conv(x))  # the copy's leader publishes to the copy's followers only
    with pytest.raises(PatchError, match="the leader must run first"):
        block.skip(x)


def test_pickled_model_keeps_the_link_and_drops_pending_selections() -> None:
    block = Block()
    x = torch.randn(2, 3, 8, 8)
    block.main(block.conv(x))  # leaves a selection pending
    restored = pickle.loads(pickle.dumps(block))
    assert restored.main._link is restored.skip._link
    with pytest.raises(PatchError, match="the leader must run first"):
        restored.skip(x)
    assert torch.equal(restored(x), Block.forward(block, x))


def test_share_phase_refuses_wrong_roles_and_strides() -> None:
    with pytest.raises(ValueError, match="role='leader'"):
        share_phase(APS(3), [APS(3, role="follower")])
    with pytest.raises(ValueError, match="role='follower'"):
        share_phase(APS(3, role="leader"), [APS(3)])
    with pytest.raises(ValueError, match="same components"):
        share_phase(APS(3, role="leader"), [APS(3, stride=3, role="follower")])
    with pytest.raises(ValueError, match="at least one follower"):
        share_phase(APS(3, role="leader"), [])
    follower = APS(3, role="follower")
    with pytest.raises(ValueError, match="distinct"):
        share_phase(APS(3, role="leader"), [follower, follower])


# --------------------------------------------------------------------------- construction


def test_aps_config_round_trips_through_json() -> None:
    for aps in [
        APS(3),
        APS(5, dims=3, stride=[1, 2, 3], norm="linf", filter_size=4, role="leader"),
    ]:
        config = json.loads(json.dumps(aps.config()))
        rebuilt = type(aps)(**config)
        assert rebuilt.config() == aps.config()
        assert list(rebuilt.state_dict()) == list(aps.state_dict())
        x = torch.randn([2, aps.channels] + [7] * aps.dims)
        rebuilt.role = aps.role = "alone"  # compare the selections without a link
        assert torch.equal(rebuilt(x), aps(x))


def test_aps_from_conv_and_pool_take_the_stride_and_are_approximate() -> None:
    aps, transfer = APS.from_conv(nn.Conv2d(3, 8, 3, (2, 3), 1), norm="l1", role="leader")
    assert (aps.channels, aps.stride, aps.norm, aps.role, transfer) == (
        8, (2, 3), "l1", "leader", "approximate",
    )  # fmt: skip
    aps, transfer = APS.from_pool("max", 4, 2, 3, 2, 1)
    assert (aps.channels, aps.stride, transfer) == (4, (2, 2), "approximate")
    aps, _ = APS.from_pool("avg", 4, 1, 3, None)
    assert aps.stride == (3,)
    with pytest.raises(ValueError, match="ceil_mode"):
        APS.from_pool("max", 4, 2, 3, 2, 1, 1, True)
    with pytest.raises(ValueError, match="nothing to sample"):
        APS.from_conv(nn.Conv2d(3, 8, 3, 1, 1))
    with pytest.raises(ValueError, match=r"not an nn\.Conv"):
        APS.from_conv(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="norm must be"):
        APS(3, norm="l3")


# --------------------------------------------------------------------------- deployment


def test_aps_traces_with_dynamic_sizes_and_shared_selection() -> None:
    block = Block()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(block, torch.randn(2, 3, 8, 8))
    for shape in [(2, 3, 8, 8), (3, 3, 11, 6), (1, 3, 5, 9)]:
        x = torch.randn(shape)
        assert torch.allclose(traced(x), block(x), atol=1e-6), shape


def test_aps_scripts_alone() -> None:
    aps = APS(3, stride=(2, 3), filter_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(aps)
    for shape in [(2, 3, 8, 9), (1, 3, 7, 5)]:
        x = torch.randn(shape)
        assert torch.equal(scripted(x), aps(x)), shape


def test_linked_aps_is_refused_when_scripting_starts() -> None:
    # the link is a Python object: scripting stops at once (export then traces) instead of
    # giving a scripted model that cannot run
    with pytest.raises(RuntimeError, match=r"role 'leader' cannot be scripted.*trace the model"):
        torch.jit.script(Block())


def test_linked_aps_block_exports_with_torch_export_dynamic_shapes() -> None:
    block = Block()
    dynamic = {0: torch.export.Dim("batch", max=64)}
    dynamic |= {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
    program = torch.export.export(
        block, (torch.randn(2, 3, 10, 12),), dynamic_shapes={"x": dynamic}
    )
    for shape in [(3, 3, 9, 13), (1, 3, 16, 7)]:
        x = torch.randn(shape)
        assert torch.allclose(program.module()(x), block(x), atol=1e-6), shape


@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
def test_aps_block_exports_to_onnx_with_argmax_and_gather(norm: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    block = Block(norm)
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            block, (torch.randn(2, 3, 8, 8),), buffer, dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": axes, "y": axes}, opset_version=17,
        )  # fmt: skip
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert {"ArgMax", "Gather"} <= ops, ops
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 12, 10), (1, 3, 9, 7)]:
        x = torch.randn(shape)
        (out,) = session.run(None, {"x": x.numpy()})
        expected = block(x)
        error = (torch.from_numpy(out) - expected).norm() / expected.norm()
        assert error <= 1e-5, (shape, float(error))


def test_aps_runs_off_the_cpu_with_the_cpu_shapes() -> None:
    # the meta device has no data: any host read or CPU-only index would fail here
    block = Block()
    x = torch.randn(2, 3, 9, 10)
    assert block.to("meta")(x.to("meta")).shape == Block()(x).shape


def test_aps_selects_half_precision_maps_without_overflow() -> None:
    # squares of values above 256 overflow float16: the norms are taken in float32
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 300
    aps = APS(3)
    assert torch.equal(aps(x.half()).float(), aps(x.half().float()))
