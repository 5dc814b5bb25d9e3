"""The layer registry: every registered type round-trips through JSON specs, and bad specs
fail with one line naming the type and the argument."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import surgeon.layers
from surgeon.fold import fold_space_to_depth
from surgeon.layers import (
    AdaptivePolyphaseSampling,
    AdaptiveResampling,
    AdaptiveUpsampling,
    BlurPool,
    FoldedBlurConv,
    HaarConv,
    LearnablePolyphaseSampling,
    LocalImportancePool,
    PolyphaseSampling,
    PoolPad,
    ResizeConv,
    SoftPool,
    SpaceToDepthConv,
    StridePad,
    SubPixelConv,
    build_module,
    layer_config,
    module_spec,
    register_layer,
    registered_layers,
)
from surgeon.layers.sfm import SaliencyOffsets


def _spd_conv(conv: nn.Module, **kwargs: Any) -> nn.Module:
    return SpaceToDepthConv.from_conv(conv, **kwargs)[0]


def _spd_pool(*args: Any, **kwargs: Any) -> nn.Module:
    return SpaceToDepthConv.from_pool(*args, **kwargs)[0]


def _folded(conv: nn.Module) -> nn.Module:
    return fold_space_to_depth(SpaceToDepthConv.from_conv(conv)[0])


def _evaluating(layer: nn.Module) -> nn.Module:
    """A layer in eval mode: LPS draws Gumbel noise in training."""
    return layer.eval()


def _sub_pixel(*args: Any) -> nn.Module:
    layer = SubPixelConv(*args)
    layer.transfer(torch.randn(args[0], args[1], *args[2]), torch.randn(args[1]))
    return layer


# (id, factory, input shape): one or more per registered type
SAMPLES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("spd conv phase-major", lambda: _spd_conv(nn.Conv2d(8, 6, 3, 2, 1)), (2, 8, 11, 9)),
    (
        "spd conv channel-major (grouped)",
        lambda: _spd_conv(nn.Conv2d(8, 8, 3, 2, 1, groups=4)),
        (2, 8, 10, 9),
    ),
    (
        "spd conv random init, larger kernel",
        lambda: _spd_conv(nn.Conv2d(8, 4, 3, 2, 1), kernel_size=3, init="random"),
        (1, 8, 9, 8),
    ),
    ("spd max pool ceil_mode", lambda: _spd_pool("max", 4, 2, 3, 2, 1, 1, True), (1, 4, 10, 9)),
    ("spd avg pool same", lambda: _spd_pool("avg", 4, 2, 3, 2, "same"), (1, 4, 9, 10)),
    ("spd conv 1-d", lambda: _spd_conv(nn.Conv1d(4, 6, 5, 2, 2)), (2, 4, 13)),
    ("spd conv 3-d", lambda: _spd_conv(nn.Conv3d(4, 6, 3, 2, 1)), (1, 4, 5, 6, 7)),
    ("folded spd", lambda: _folded(nn.Conv2d(8, 6, 3, 2, 1)), (2, 8, 11, 9)),
    ("folded spd 1-d grouped", lambda: _folded(nn.Conv1d(6, 6, 5, 2, 1, groups=3)), (1, 6, 12)),
    ("blur", lambda: BlurPool(4), (1, 4, 9, 8)),
    (
        "blur ceil_source",
        lambda: BlurPool(4, filter_size=3, pad_mode="zero", ceil_source=((3, 2), 1, (1, 1))),
        (1, 4, 9, 8),
    ),
    ("blur 1-d", lambda: BlurPool(3, dims=1, filter_size=5, stride=3), (2, 3, 17)),
    ("blur 3-d", lambda: BlurPool(2, dims=3, pad_mode="replicate"), (1, 2, 5, 6, 7)),
    ("blur separable", lambda: BlurPool(4, export_form="separable"), (1, 4, 9, 8)),
    (
        "blur constant padding",
        lambda: BlurPool(4, pad_mode="zero", export_form="conv"),
        (1, 4, 9, 8),
    ),
    (
        "folded blur + pointwise conv",
        lambda: FoldedBlurConv.from_pair(BlurPool(4), nn.Conv2d(4, 6, 1, groups=2)),
        (2, 4, 9, 8),
    ),
    (
        "folded blur 1-d, zero padding",
        lambda: FoldedBlurConv(3, 2, dims=1, filter_size=3, stride=3, pad_mode="zero", bias=False),
        (1, 3, 11),
    ),
    ("pool pad ceil_mode", lambda: PoolPad((3, 3), (2, 2), (1, 1), (1, 1), True), (1, 2, 8, 9)),
    ("pool pad same", lambda: PoolPad((3,), (2,), "same", (1,), False), (1, 2, 9)),
    (
        "stride pad -inf",
        lambda: StridePad(((0, 1), (1, 0)), "constant", -float("inf")),
        (1, 2, 5, 5),
    ),
    ("stride pad reflect", lambda: StridePad(((1, 2),), "reflect"), (1, 2, 6)),
    ("sub-pixel", lambda: _sub_pixel(4, 3, (4, 4), (2, 2), (1, 1), (1, 1), (0, 0)), (1, 4, 5, 6)),
    ("sub-pixel 1-d", lambda: _sub_pixel(2, 2, (3,), (3,), (0,), (2,), (1,)), (1, 2, 7)),
    ("resize conv", lambda: ResizeConv(4, 2, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)), (1, 4, 5, 4)),
    (
        "resize conv 3-d grouped",
        lambda: ResizeConv(4, 2, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (0, 0, 0), groups=2),
        (1, 4, 3, 3, 4),
    ),
    ("aps", lambda: AdaptivePolyphaseSampling(4, norm="l1"), (2, 4, 9, 8)),
    (
        "aps blurred, stride 3",
        lambda: AdaptivePolyphaseSampling(3, stride=3, filter_size=3, norm="linf"),
        (2, 3, 9, 10),
    ),
    ("lps", lambda: _evaluating(LearnablePolyphaseSampling(8, hidden_channels=2)), (2, 8, 9, 8)),
    ("haar from a k2 s2 conv", lambda: HaarConv.from_conv(nn.Conv2d(4, 6, 2, 2))[0], (1, 4, 8, 9)),
    (
        "haar from a k3 s2 conv",
        lambda: HaarConv.from_conv(nn.Conv2d(4, 6, 3, 2, 1))[0],
        (1, 4, 9, 9),
    ),
    (
        "lip ceil_mode",
        lambda: LocalImportancePool(4, kernel_size=3, stride=2, padding=1, ceil_mode=True),
        (1, 4, 9, 8),
    ),
    ("softpool", lambda: SoftPool(kernel_size=3, stride=2, padding=1), (1, 3, 9, 8)),
    ("sfm resampling", lambda: AdaptiveResampling(4, radius=1, dilations=(1, 2)), (1, 4, 9, 10)),
    ("msau upsampling", lambda: AdaptiveUpsampling(4, scale_factor=2.0), (1, 4, 5, 6)),
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), (1, 3, 9)),
    ("conv2d", lambda: nn.Conv2d(4, 4, 3, 2, 1, groups=2, bias=False), (1, 4, 9, 8)),
    ("conv3d", lambda: nn.Conv3d(2, 3, (1, 3, 3), (1, 2, 2), dilation=2), (1, 2, 5, 9, 9)),
    ("max pool 1-d", lambda: nn.MaxPool1d(3, 2, 1, ceil_mode=True), (1, 2, 10)),
    ("max pool 2-d", lambda: nn.MaxPool2d((3, 2), dilation=(1, 2)), (1, 2, 9, 10)),
    ("max pool 3-d", lambda: nn.MaxPool3d(2), (1, 2, 4, 4, 4)),
    ("avg pool 1-d", lambda: nn.AvgPool1d(3, 2, 1, count_include_pad=False), (1, 2, 9)),
    ("avg pool 2-d", lambda: nn.AvgPool2d(3, 1, 1, divisor_override=4), (1, 2, 6, 6)),
    ("avg pool 3-d", lambda: nn.AvgPool3d((1, 2, 2), ceil_mode=True), (1, 2, 3, 5, 5)),
    (
        "sequential",
        lambda: nn.Sequential(
            PoolPad((2, 2), (2, 2), "same", (1, 1), False), nn.Conv2d(3, 3, 2, 2, groups=3)
        ),
        (1, 3, 7, 8),
    ),
    ("identity", lambda: nn.Identity(), (1, 2, 3, 3)),
    ("pixel shuffle", lambda: nn.PixelShuffle(2), (1, 8, 3, 3)),
    ("pixel unshuffle", lambda: nn.PixelUnshuffle(2), (1, 2, 4, 6)),
    ("upsample", lambda: nn.Upsample(scale_factor=2), (1, 2, 3, 4)),
    (
        "upsample to a size",
        lambda: nn.Upsample(size=(5, 7), mode="bilinear", align_corners=True),
        (1, 2, 3, 4),
    ),
]


def _json(data: Any) -> Any:
    return json.loads(json.dumps(data, allow_nan=False))


def _same_state(original: nn.Module, rebuilt: nn.Module, label: str) -> None:
    expected = {k: tuple(v.shape) for k, v in original.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert got == expected, f"{label}: state dict keys/shapes {got} != {expected}"


def _same_forward(
    original: nn.Module, rebuilt: nn.Module, shape: tuple[int, ...], label: str
) -> None:
    rebuilt.load_state_dict(original.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(x), rebuilt(x)
    assert got.shape == expected.shape, f"{label}: {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.equal(got, expected), f"{label}: outputs differ by {(got - expected).abs().max()}"


@pytest.mark.parametrize(("label", "factory", "shape"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_registered_layers_round_trip_through_json_specs(
    label: str, factory: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    original = factory().eval()
    spec = module_spec(original)
    assert _json(spec) == spec, f"{label}: the spec is not plain JSON data: {spec}"
    rebuilt = build_module(_json(spec)).eval()
    assert type(rebuilt) is type(original)
    _same_state(original, rebuilt, label)
    _same_forward(original, rebuilt, shape, label)
    assert module_spec(rebuilt) == spec, f"{label}: the rebuilt module has another spec"


@pytest.mark.parametrize(
    ("label", "factory", "shape"),
    [s for s in SAMPLES if type(s[1]()).__module__.startswith("surgeon.")],
    ids=[s[0] for s in SAMPLES if type(s[1]()).__module__.startswith("surgeon.")],
)
def test_surgeon_layers_rebuild_from_their_config(
    label: str, factory: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    original = factory().eval()
    config: Any = original.config()
    assert _json(config) == config, f"{label}: config() is not plain JSON data: {config}"
    rebuilt = type(original)(**config).eval()
    _same_state(original, rebuilt, label)
    _same_forward(original, rebuilt, shape, label)


def test_every_registered_type_has_a_sample() -> None:
    sampled = {type(factory()) for _, factory, _ in SAMPLES}
    builtin = {
        name: cls
        for name, cls in registered_layers().items()
        if cls.__module__.startswith(("surgeon.", "torch.nn."))  # not a test's plugin layer
    }
    missing = sorted(name for name, cls in builtin.items() if cls not in sampled)
    assert not missing, f"registered types without a round-trip sample in SAMPLES: {missing}"


# module classes under surgeon/layers that are parts of registered layers, never placed alone
PARTS: dict[type[nn.Module], str] = {
    PolyphaseSampling: "the base class of AdaptivePolyphaseSampling and LearnablePolyphaseSampling",
    SaliencyOffsets: "built inside AdaptiveResampling and AdaptiveUpsampling",
}


def test_parts_are_only_bases_or_submodules_of_registered_layers() -> None:
    registered = set(registered_layers().values())
    inside = {type(m) for _, factory, _ in SAMPLES for m in factory().modules()}
    for part, why in PARTS.items():
        assert part not in registered, f"{part.__qualname__} is registered, not a part"
        assert any(issubclass(cls, part) for cls in registered) or part in inside, (
            f"{part.__qualname__} is listed as a part ({why}) but no registered layer uses it"
        )


def test_every_module_class_under_surgeon_layers_is_registered() -> None:
    registered = set(registered_layers().values()) | set(PARTS)
    found = set()
    for info in pkgutil.iter_modules(surgeon.layers.__path__, "surgeon.layers."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == module.__name__:
                found.add(cls)
    unregistered = sorted(cls.__qualname__ for cls in found - registered)
    assert found and not unregistered, f"layers not in the registry: {unregistered}"


def test_json_lists_become_tuples_where_the_constructor_takes_them() -> None:
    conv = build_module(
        {
            "type": "Conv2d",
            "args": {"in_channels": 2, "out_channels": 2, "kernel_size": [3, 1], "stride": [2, 1]},
        }
    )
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 1) and conv.stride == (2, 1)
    blur = build_module(
        {"type": "BlurPool", "args": {"channels": 2, "ceil_source": [[3, 3], [1, 1], [1, 1]]}}
    )
    assert isinstance(blur, BlurPool) and blur.source_kernel == (3, 3)
    pad = build_module({"type": "StridePad", "args": {"pad": [[0, 1]], "value": "-inf"}})
    assert isinstance(pad, StridePad) and pad.pad == ((0, 1),) and pad.value == -float("inf")


def test_layer_config_reads_torch_classes_constructor_arguments() -> None:
    assert layer_config(nn.Conv2d(3, 8, 3, 2, 1, bias=False)) == {
        "in_channels": 3,
        "out_channels": 8,
        "kernel_size": [3, 3],
        "stride": [2, 2],
        "padding": [1, 1],
        "dilation": [1, 1],
        "groups": 1,
        "bias": False,
        "padding_mode": "zeros",
    }
    with pytest.raises(TypeError, match="use module_spec"):
        layer_config(nn.Sequential())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "os.system", "args": {}}, r"unknown layer type 'os\.system'"),
        ({"type": "BlurPool", "args": {}}, r"^BlurPool: missing argument 'channels'$"),
        (
            {"type": "BlurPool", "args": {"channels": 2, "evil": 1}},
            r"^BlurPool: unexpected argument 'evil'$",
        ),
        (
            {"type": "BlurPool", "args": {"channels": "2"}},
            r"^BlurPool: argument 'channels' must be an integer, got '2'$",
        ),
        (
            {"type": "BlurPool", "args": {"channels": True}},
            r"^BlurPool: argument 'channels' must be an integer, got True$",
        ),
        (
            {"type": "StridePad", "args": {"pad": [[0, 1]], "value": "nan"}},
            r"^StridePad: argument 'value' must be a number or one of '-inf', 'inf'",
        ),
        (
            {
                "type": "SpaceToDepthConv",
                "args": {
                    "in_channels": 2,
                    "out_channels": 2,
                    "dims": 2,
                    "block": [2, 2],
                    "kernel_size": "3",
                    "op_kernel": 3,
                    "op_stride": 2,
                },
            },
            r"^SpaceToDepthConv: argument 'kernel_size' must be an integer or a list of",
        ),
        (
            {"type": "BlurPool", "args": {"channels": 2, "dims": 7}},
            r"^BlurPool: dims must be 1, 2 or 3, got 7$",
        ),
        (
            {
                "type": "Conv2d",
                "args": {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "groups": 2},
            },
            r"^Conv2d: in_channels must be divisible by groups$",
        ),
        (
            {
                "type": "Sequential",
                "children": [{"type": "Identity", "args": {}}, {"type": "BlurPool", "args": {}}],
            },
            r"^Sequential child 1: BlurPool: missing argument 'channels'$",
        ),
        ({"type": "Identity"}, r"^Identity: the spec has no 'args'$"),
        (
            {"type": "Identity", "args": {}, "module": "os"},
            r"^Identity: the spec has an unexpected key 'module'$",
        ),
        ("BlurPool", r"a layer spec is an object"),
    ],
)
def test_bad_specs_raise_one_line_naming_the_type_and_argument(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        build_module(spec)
    assert "\n" not in str(caught.value)


def test_module_spec_names_an_unregistered_class_and_its_path() -> None:
    model = nn.Sequential(nn.Identity(), nn.Sequential(BlurPool(2), nn.ReLU()))
    with pytest.raises(TypeError, match=r"^1\.1 is a torch\.nn\.modules\.activation\.ReLU, not a"):
        module_spec(model)


def test_module_spec_refuses_subclasses_of_registered_classes() -> None:
    class Conv2dWithAForward(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match=r"the root module is a .*Conv2dWithAForward"):
        module_spec(Conv2dWithAForward(2, 2, 1))


def test_module_spec_refuses_sequentials_with_named_children() -> None:
    from collections import OrderedDict

    with pytest.raises(TypeError, match="named children"):
        module_spec(nn.Sequential(OrderedDict(pad=nn.Identity())))


class _Shift(nn.Module):
    """A plugin's layer: adds a constant."""

    def __init__(self, amount: float, *, dims: int = 2) -> None:
        super().__init__()
        self.amount, self.dims = amount, dims

    def config(self) -> dict[str, Any]:
        return {"amount": self.amount, "dims": self.dims}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.amount


class _NoConfig(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()


class _Unrecordable(nn.Module):
    def __init__(self, items: dict[str, int]) -> None:
        super().__init__()

    def config(self) -> dict[str, Any]:
        return {"items": {}}


def test_register_layer_adds_a_plugin_layer() -> None:
    assert register_layer(_Shift, "TestShift") is _Shift
    register_layer(_Shift, "TestShift")  # the same registration again: nothing changes
    spec = module_spec(nn.Sequential(_Shift(0.5)))
    assert spec == {
        "type": "Sequential",
        "children": [{"type": "TestShift", "args": {"amount": 0.5, "dims": 2}}],
    }
    rebuilt = build_module(spec)
    assert torch.equal(rebuilt(torch.zeros(2)), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"^TestShift: argument 'amount' must be a number"):
        build_module({"type": "TestShift", "args": {"amount": [1]}})


def test_register_layer_refuses_taken_names_and_classes_without_config() -> None:
    with pytest.raises(ValueError, match="'BlurPool' is already registered to BlurPool"):
        register_layer(_Shift, "BlurPool")
    with pytest.raises(TypeError, match="no config"):
        register_layer(_NoConfig)
    with pytest.raises(TypeError, match="argument 'items' needs a type hint of JSON types"):
        register_layer(_Unrecordable)
    assert "BlurPool" in registered_layers() and registered_layers()["BlurPool"] is BlurPool
