"""Site records: every operation that changes spatial resolution, where it is, and its arithmetic.

`find_sites(analysis)` turns the graphs of an Analysis into Site records; the rest of the
pipeline (policy, rewrites, report) works on Sites and never on the graphs directly.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.flop_counter import conv_flop_count

from surgeon.arithmetic import (
    conv_output_size,
    pool_output_size,
    same_padding,
    transposed_output_size,
)
from surgeon.trace import Analysis, Region

__all__ = [
    "UPSAMPLE_OPS",
    "Neighbour",
    "Op",
    "Resampling",
    "Role",
    "Site",
    "expected_output_shape",
    "find_sites",
    "resampling",
]

Op = Literal[
    "conv",
    "max_pool",
    "avg_pool",
    "lp_pool",
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "conv_transpose",
    "interpolate",
    "pixel_shuffle",
]
Role = Literal["downsample", "patchify", "global_pool", "adaptive_pool", "upsample"]
UPSAMPLE_OPS: tuple[Op, ...] = ("conv_transpose", "interpolate", "pixel_shuffle")
NeighbourKind = Literal["norm", "act", "conv", "pool", "dropout", "add", "other"]


@dataclass(frozen=True)
class Neighbour:
    """A node next to a site in the analysis graph (a module call or a function call)."""

    node: str  # fx node name (unique within its region)
    target: str  # model-level qualified module path for module calls, function name otherwise
    type_name: str  # e.g. "BatchNorm2d", "ReLU", "relu", "add"
    kind: NeighbourKind
    is_module: bool
    shared: bool  # the module object is called at more than one place
    has_params: bool


@dataclass(frozen=True)
class Site:
    """One strided convolution or pooling operation found in a model.

    `name` is the qualified module path for module sites (`path#k` for the k-th extra call of a
    shared module); functional sites are named `owner:node` (the module whose forward makes the
    call, and the call's node name). `stage_in`/`stage_out` are the cumulative strides before and
    after the site. `after` is the single-consumer chain that follows the site (norm, activation)
    ending at the first other node; `before` is the node that feeds it. Rewrites use them to place
    layers (anti-aliasing blurs after the activation, as in Zhang 2019).

    Upsampling sites (role `upsample`: transposed convolutions, `interpolate`/`nn.Upsample` with a
    scale > 1, pixel shuffle) keep their step in `stride` (the transposed conv's stride, the
    rounded scale factor) and the exact factor in `scale`; `stage_out` is `stage_in` divided by it.

    `receptive_field` and `jump` are per spatial dimension, in pixels of the traced region's input,
    for one output position of the site, computed along the graph (Dumoulin & Visin):
    r_out = r_in + (k-1)·d·j_in and j_out = j_in·s for convolutions and pools; an upsampling site
    divides the jump by its factor (a transposed conv is a conv on the zero-inserted input:
    j_out = j_in/s, r_out = r_in + (k-1)·d·j_out). Joins take the largest receptive field. They are
    empty for sites seen only through hooks.
    """

    name: str
    op: Op
    role: Role
    dims: int
    type_name: str
    functional: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    ceil_mode: bool
    in_channels: int
    out_channels: int
    bias: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stage_in: int
    stage_out: int
    macs: int
    params: int
    found_by: str
    module: str = ""  # qualified path of the module to edit ("" for functional sites)
    calls: int = 1
    before: tuple[Neighbour, ...] = field(default_factory=tuple)
    after: tuple[Neighbour, ...] = field(default_factory=tuple)
    padding_mode: str = "zeros"
    count_include_pad: bool = True
    divisor_override: int | None = None
    norm_type: float | None = None
    output_padding: tuple[int, ...] = ()  # transposed convolutions
    scale: tuple[float, ...] = ()  # upsampling factor per dimension (upsample sites)
    mode: str = ""  # interpolation mode (interpolate sites)
    output_size: tuple[int, ...] = ()  # an interpolate call's fixed `size`, when it gives one
    receptive_field: tuple[float, ...] = ()
    jump: tuple[float, ...] = ()

    @property
    def is_upsampling(self) -> bool:
        """True for transposed convolutions, interpolation and pixel shuffle."""
        return self.op in UPSAMPLE_OPS

    @property
    def is_depthwise(self) -> bool:
        """True for a convolution with one group per input channel."""
        return self.op == "conv" and self.groups > 1 and self.groups == self.in_channels

    @property
    def max_stride(self) -> int:
        return max(self.stride) if self.stride else 1

    @property
    def max_kernel(self) -> int:
        return max(self.kernel) if self.kernel else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return asdict(self)


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        values = tuple(int(v) for v in value)
        return values * dims if len(values) == 1 else values
    return (int(value),) * dims


def expected_output_shape(site: Site) -> tuple[int, ...]:
    """The output shape the convolution arithmetic predicts from the site's parameters."""
    spatial_in = site.in_shape[-site.dims :]
    if site.op.startswith("adaptive"):
        return site.out_shape  # adaptive pools choose their own windows
    if site.op in ("interpolate", "pixel_shuffle"):
        if site.output_size:
            sizes = list(site.output_size)
        else:  # PyTorch: floor(size · scale), computed in double precision
            sizes = [math.floor(n * f) for n, f in zip(spatial_in, site.scale, strict=True)]
        return (*site.in_shape[: -site.dims - 1], site.out_channels, *sizes)
    out: list[int] = []
    for i, size in enumerate(spatial_in):
        k, s, d = site.kernel[i], site.stride[i], site.dilation[i]
        if site.op == "conv_transpose":
            assert not isinstance(site.padding, str)
            out.append(
                transposed_output_size(size, k, s, site.padding[i], d, site.output_padding[i])
            )
        elif site.padding == "same":
            lo, hi = same_padding(size, k, s, d)
            padded = size + lo + hi
            out.append(conv_output_size(padded, k, s, 0, d))
        elif site.op == "conv":
            assert not isinstance(site.padding, str)
            out.append(conv_output_size(size, k, s, site.padding[i], d))
        else:
            assert not isinstance(site.padding, str)
            out.append(pool_output_size(size, k, s, site.padding[i], d, site.ceil_mode))
    channels = site.out_channels
    return (*site.in_shape[: -site.dims - 1], channels, *out)


# ---------------------------------------------------------------------------------------------
# Normalising module and function calls into site parameters
# ---------------------------------------------------------------------------------------------

_SAME_PAD_TYPES = ("Conv2dSame", "StdConv2dSame", "MaxPool2dSame", "AvgPool2dSame")

# Argument names of the functional forms (torch.nn.functional and the aten overloads agree).
_ARGS: dict[str, tuple[str, ...]] = {
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool": (
        "input",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "ceil_mode",
        "return_indices",
    ),
    "avg_pool": (
        "input",
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    ),
    "lp_pool": ("input", "norm_type", "kernel_size", "stride", "ceil_mode"),
    "adaptive_avg_pool": ("input", "output_size"),
    "adaptive_max_pool": ("input", "output_size", "return_indices"),
    "conv_transpose": (
        "input",
        "weight",
        "bias",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "dilation",
    ),
    "interpolate": (
        "input",
        "size",
        "scale_factor",
        "mode",
        "align_corners",
        "recompute_scale_factor",
        "antialias",
    ),
    "pixel_shuffle": ("input", "upscale_factor"),
}


def _function_ops() -> dict[Any, tuple[str, int]]:
    table: dict[Any, tuple[str, int]] = {}
    for d in (1, 2, 3):
        for fn in (getattr(F, f"conv{d}d"), getattr(torch, f"conv{d}d")):
            table[fn] = ("conv", d)
        for name in (f"max_pool{d}d", f"max_pool{d}d_with_indices"):
            table[getattr(F, name)] = ("max_pool", d)
        if hasattr(torch, f"max_pool{d}d"):
            table[getattr(torch, f"max_pool{d}d")] = ("max_pool", d)
        table[getattr(F, f"avg_pool{d}d")] = ("avg_pool", d)
        if hasattr(F, f"lp_pool{d}d"):
            table[getattr(F, f"lp_pool{d}d")] = ("lp_pool", d)
        table[getattr(F, f"adaptive_avg_pool{d}d")] = ("adaptive_avg_pool", d)
        table[getattr(F, f"adaptive_max_pool{d}d")] = ("adaptive_max_pool", d)
        table[getattr(F, f"conv_transpose{d}d")] = ("conv_transpose", d)
    table[torch.avg_pool1d] = ("avg_pool", 1)
    # dims 0: taken from the input's rank when the site is made
    table[F.interpolate] = ("interpolate", 0)
    table[F.upsample] = ("interpolate", 0)
    table[F.pixel_shuffle] = ("pixel_shuffle", 2)
    return table


_FUNCTION_OPS = _function_ops()


def _aten_op(target: Any) -> tuple[str, int] | None:
    """Map an aten overload from a torch.export graph to (op, dims)."""
    name = getattr(target, "_opname", "")
    for op, prefix in (
        ("conv", "conv"),
        ("max_pool", "max_pool"),
        ("avg_pool", "avg_pool"),
        ("adaptive_avg_pool", "adaptive_avg_pool"),
        ("adaptive_max_pool", "adaptive_max_pool"),
    ):
        for d in (1, 2, 3):
            if name in (f"{prefix}{d}d", f"{prefix}{d}d_with_indices", f"_{prefix}{d}d"):
                return op, d
    return None


@dataclass
class _Call:
    """One downsampling call, normalised from a module, a function or an aten op."""

    op: Op
    dims: int
    type_name: str
    functional: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    ceil_mode: bool = False
    in_channels: int = 0
    out_channels: int = 0
    bias: bool = False
    weight_shape: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    count_include_pad: bool = True
    divisor_override: int | None = None
    norm_type: float | None = None
    params: int = 0
    output_padding: tuple[int, ...] = ()
    scale: tuple[float, ...] = ()
    mode: str = ""
    size: Any = None  # interpolate's `size` argument, resolved against the input rank later


def _module_call(module: nn.Module) -> _Call | None:
    type_name = type(module).__name__
    same = type_name in _SAME_PAD_TYPES
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        dims = len(module.kernel_size)
        stride = _tuple(module.stride, dims)
        return _Call(
            "conv_transpose",
            dims,
            type_name,
            False,
            _tuple(module.kernel_size, dims),
            stride,
            _tuple(module.padding, dims),
            _tuple(module.dilation, dims),
            groups=module.groups,
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            bias=module.bias is not None,
            weight_shape=tuple(module.weight.shape),
            padding_mode=module.padding_mode,
            params=sum(p.numel() for p in module.parameters()),
            output_padding=_tuple(module.output_padding, dims),
            scale=tuple(float(s) for s in stride),
        )
    if isinstance(module, nn.Upsample):
        return _resize_call(type_name, False, module.size, module.scale_factor, str(module.mode))
    if isinstance(module, nn.PixelShuffle):
        return _shuffle_call(type_name, False, module.upscale_factor)
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        padding: tuple[int, ...] | str = (
            "same"
            if same
            else module.padding
            if isinstance(module.padding, str)
            else _tuple(module.padding, dims)
        )
        return _Call(
            "conv",
            dims,
            type_name,
            False,
            _tuple(module.kernel_size, dims),
            _tuple(module.stride, dims),
            padding,
            _tuple(module.dilation, dims),
            groups=module.groups,
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            bias=module.bias is not None,
            weight_shape=tuple(module.weight.shape),
            padding_mode=module.padding_mode,
            params=sum(p.numel() for p in module.parameters()),
        )
    pools: tuple[tuple[type[nn.Module], Op], ...] = (
        (nn.modules.pooling._MaxPoolNd, "max_pool"),
        (nn.modules.pooling._AvgPoolNd, "avg_pool"),
        (nn.modules.pooling._LPPoolNd, "lp_pool"),
        (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive_avg_pool"),
        (nn.modules.pooling._AdaptiveMaxPoolNd, "adaptive_max_pool"),
    )
    for base, op in pools:
        if isinstance(module, base):
            dims = int(type_name[-2]) if type_name[-2:-1].isdigit() else 2
            if op.startswith("adaptive"):
                return _Call(op, dims, type_name, False, (), (), (0,) * dims, (1,) * dims)
            attrs = vars(module)
            kernel = _tuple(attrs["kernel_size"], dims)
            stride = _tuple(attrs.get("stride") or attrs["kernel_size"], dims)
            pad: tuple[int, ...] | str = "same" if same else _tuple(attrs.get("padding", 0), dims)
            return _Call(
                op,
                dims,
                type_name,
                False,
                kernel,
                stride,
                pad,
                _tuple(attrs.get("dilation", 1), dims),
                ceil_mode=bool(attrs.get("ceil_mode", False)),
                count_include_pad=bool(attrs.get("count_include_pad", True)),
                divisor_override=attrs.get("divisor_override"),
                norm_type=attrs.get("norm_type"),
            )
    return None


def _resize_call(
    type_name: str, functional: bool, size: Any, scale_factor: Any, mode: str
) -> _Call:
    """An interpolation call; its dims and factors are settled by `_settle` from the shapes."""
    scale: tuple[float, ...] = ()
    if isinstance(scale_factor, (list, tuple)):
        scale = tuple(float(f) for f in scale_factor)
    elif scale_factor is not None:
        scale = (float(scale_factor),)
    return _Call(
        "interpolate", 0, type_name, functional, (), (), (), (), scale=scale, mode=mode, size=size
    )


def _shuffle_call(type_name: str, functional: bool, factor: int) -> _Call:
    r = int(factor)
    return _Call(
        "pixel_shuffle", 2, type_name, functional, (1, 1), (r, r), (0, 0), (1, 1), scale=(r, r)
    )


def _settle(call: _Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Call:
    """Fill in what an upsampling call only shows with shapes: its dims, factors, channels."""
    if call.op == "pixel_shuffle" and len(in_shape) >= 3:
        r = call.stride[0]
        return replace(call, in_channels=in_shape[-3], out_channels=in_shape[-3] // (r * r))
    if call.op != "interpolate" or len(in_shape) < 3:
        return call
    dims = len(in_shape) - 2
    spatial_in, spatial_out = in_shape[2:], out_shape[2:] if len(out_shape) == len(in_shape) else ()
    size = _concrete_size(call.size, dims)
    if size is None and not call.scale and spatial_out:
        size = tuple(spatial_out)  # a size we could not read: the forward pass tells it
    scale = (
        tuple(call.scale * dims if len(call.scale) == 1 else call.scale)
        if call.scale
        else tuple(o / i if i else 1.0 for o, i in zip(size or (), spatial_in, strict=False))
    )
    return replace(
        call,
        dims=dims,
        kernel=(1,) * dims,
        stride=tuple(max(1, round(f)) for f in scale),
        padding=(0,) * dims,
        dilation=(1,) * dims,
        in_channels=in_shape[1],
        out_channels=in_shape[1],
        scale=scale,
        size=size or (),
    )


def _concrete_size(size: Any, dims: int) -> tuple[int, ...] | None:
    if size is None:
        return None
    if isinstance(size, fx.Node):
        value = size.meta.get("val")
        return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else None
    if isinstance(size, int):
        return (size,) * dims
    if isinstance(size, (list, tuple)) and all(isinstance(v, int) for v in size):
        return tuple(size)
    return None  # built from the shape of another tensor at run time


@dataclass(frozen=True)
class Resampling:
    """How one fx node changes spatial resolution, read from the call itself (not from shapes).

    `stride` is the step of a conv/pool, `scale` the factor of an upsampler; `size` is
    interpolate's `size` argument (an fx node, a constant, or None); `module` is True for a
    module call.
    """

    op: Op
    stride: tuple[int, ...]
    scale: tuple[float, ...]
    size: Any
    module: bool


def resampling(node: fx.Node, root: nn.Module) -> Resampling | None:
    """What `node` of a graph traced from `root` does to resolution, if it is a conv, pool or
    upsampling call (of any stride); None for every other node."""
    call: _Call | None = None
    if node.op == "call_module":
        call = _module_call(root.get_submodule(str(node.target)))
    elif node.op == "call_function":
        spec = _FUNCTION_OPS.get(node.target) or _aten_op(node.target)
        if spec is not None:
            op, dims = spec
            name = getattr(node.target, "__name__", None) or str(node.target)
            call = _function_call(op, dims, name, _bind(op, node.args, dict(node.kwargs)))  # type: ignore[arg-type]
    if call is None:
        return None
    return Resampling(call.op, call.stride, call.scale, call.size, node.op == "call_module")


def _bind(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = _ARGS[op]
    bound = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        bound["input" if key == "self" else key] = value
    return bound


def _function_call(op: Op, dims: int, name: str, bound: dict[str, Any]) -> _Call | None:
    if op == "interpolate":
        mode = bound.get("mode", "nearest")
        return _resize_call(name, True, bound.get("size"), bound.get("scale_factor"), str(mode))
    if op == "pixel_shuffle":
        factor = bound.get("upscale_factor")
        return _shuffle_call(name, True, factor) if isinstance(factor, int) else None
    if op == "conv_transpose":
        weight = bound.get("weight")
        wshape = tuple(_meta_shape(weight) or ())
        stride = _tuple(bound.get("stride", 1), dims)
        groups = int(bound.get("groups", 1))
        return _Call(
            op,
            dims,
            name,
            True,
            wshape[2:] if wshape else (1,) * dims,
            stride,
            _tuple(bound.get("padding", 0), dims),
            _tuple(bound.get("dilation", 1), dims),
            groups=groups,
            out_channels=wshape[1] * groups if wshape else 0,
            bias=bound.get("bias") is not None,
            weight_shape=wshape,
            output_padding=_tuple(bound.get("output_padding", 0), dims),
            scale=tuple(float(s) for s in stride),
        )
    if op.startswith("adaptive"):
        return _Call(op, dims, name, True, (), (), (0,) * dims, (1,) * dims)
    if op == "conv":
        weight = bound.get("weight")
        wshape = tuple(_meta_shape(weight) or ())
        padding = bound.get("padding", 0)
        return _Call(
            op,
            dims,
            name,
            True,
            wshape[2:] if wshape else (1,) * dims,
            _tuple(bound.get("stride", 1), dims),
            padding if isinstance(padding, str) else _tuple(padding, dims),
            _tuple(bound.get("dilation", 1), dims),
            groups=int(bound.get("groups", 1)),
            out_channels=wshape[0] if wshape else 0,
            bias=bound.get("bias") is not None,
            weight_shape=wshape,
        )
    kernel = _tuple(bound["kernel_size"], dims)
    stride_value = bound.get("stride")
    stride = _tuple(stride_value, dims) if stride_value not in (None, [], ()) else kernel
    return _Call(
        op,
        dims,
        name,
        True,
        kernel,
        stride,
        _tuple(bound.get("padding", 0), dims),
        _tuple(bound.get("dilation", 1), dims),
        ceil_mode=bool(bound.get("ceil_mode", False)),
        count_include_pad=bool(bound.get("count_include_pad", True)),
        divisor_override=bound.get("divisor_override"),
        norm_type=bound.get("norm_type"),
    )


def _meta_shape(value: Any) -> tuple[int, ...] | None:
    """The shape of an fx/export node's tensor value, if it was propagated with concrete sizes."""
    try:
        return _concrete_shape(value)
    except (TypeError, ValueError, RuntimeError):  # symbolic (data-dependent) sizes
        return None


def _concrete_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, fx.Node):
        meta = value.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return tuple(int(s) for s in meta.shape)
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
        if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
            return tuple(int(s) for s in val[0].shape)
        if isinstance(meta, (tuple, list)) and meta and hasattr(meta[0], "shape"):
            return tuple(int(s) for s in meta[0].shape)
    return None


# ---------------------------------------------------------------------------------------------
# Neighbours: what comes before and after a site
# ---------------------------------------------------------------------------------------------

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
_ACT_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softplus,
)
_ACT_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardtanh,
    torch.tanh,
    F.softplus,
}
_ACT_METHODS = {"relu", "relu_", "tanh", "tanh_"}
_TIMM_ACT_MODULE_NAMES = {
    "Swish",
    "SwishMe",
    "Mish",
    "MishMe",
    "HardSwish",
    "HardSwishMe",
    "HardMish",
    "HardMishMe",
    "GELU",
    "GELUTanh",
    "QuickGELU",
    "PReLU",
}


def _module_kind(module: nn.Module) -> NeighbourKind:
    if isinstance(module, _ACT_TYPES) or type(module).__name__ in _TIMM_ACT_MODULE_NAMES:
        return "act"
    act = getattr(module, "act", None)
    if isinstance(module, _NORM_TYPES):
        # timm's BatchNormAct2d & co. end with an activation
        if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
            return "act"
        return "norm"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        return "pool"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "dropout"
    return "other"


def _function_kind(node: fx.Node) -> NeighbourKind:
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            return "act"
        if node.target in (operator.add, operator.iadd, torch.add):
            return "add"
        if node.target in _FUNCTION_OPS:
            return "conv" if _FUNCTION_OPS[node.target][0] == "conv" else "pool"
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return "act"
    if node.op == "call_method" and node.target in ("add", "add_"):
        return "add"
    return "other"


class _GraphView:
    """One fx region with the per-node facts site finding needs."""

    def __init__(self, region: Region, analysis: Analysis) -> None:
        assert region.graph is not None
        self.region = region
        self.root = region.graph_module if region.graph_module is not None else region.module
        self.nodes = list(region.graph.nodes)
        self.module_uses = Counter(n.target for n in self.nodes if n.op == "call_module")
        self.analysis = analysis

    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(str(node.target))

    def shared(self, node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        name = self.region.qualify(str(node.target))
        hook_calls = len(self.analysis.calls.get(name, ()))
        return self.module_uses[node.target] > 1 or hook_calls > 1

    def neighbour(self, node: fx.Node) -> Neighbour:
        if node.op == "call_module":
            module = self.module(node)
            return Neighbour(
                node.name,
                self.region.qualify(str(node.target)),
                type(module).__name__,
                _module_kind(module),
                True,
                self.shared(node),
                any(True for _ in module.parameters()),
            )
        target = (
            node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        )
        return Neighbour(
            node.name, str(target), str(target), _function_kind(node), False, False, False
        )

    def after(self, node: fx.Node) -> tuple[Neighbour, ...]:
        chain: list[Neighbour] = []
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if user.op == "output":
                break
            item = self.neighbour(user)
            chain.append(item)
            if item.kind not in ("norm", "act", "dropout") or len(chain) >= 4:
                break
            current = user
        return tuple(chain)

    def before(self, node: fx.Node) -> tuple[Neighbour, ...]:
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first.op not in ("placeholder", "get_attr"):
            return (self.neighbour(first),)
        return ()


def _spatial(shape: tuple[int, ...] | None, dims: int) -> tuple[int, ...]:
    return tuple(shape[-dims:]) if shape and len(shape) > dims else ()


def _upsamples(src: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """True when a node maps an image-like (N, C, *spatial) tensor to a larger map: same batch,
    no spatial dim smaller, and both trailing dims larger. A linear layer or a transpose on
    token tensors ((B, N, C), (B, H, W, C)) grows only the last dim or swaps two, so it is not
    mistaken for upsampling (that reset the stage of every site after a transformer MLP)."""
    if len(out) != len(src) or len(out) < 4 or out[0] != src[0]:
        return False
    if any(o < i for o, i in zip(out[2:], src[2:], strict=True)):
        return False
    return out[-1] > src[-1] > 0 and out[-2] > src[-2] > 0


# A stage is the cumulative stride per spatial dim, aligned to the trailing dims (T, H, W):
# a 2-d site's stride (s_h, s_w) counts as (1, s_h, s_w). Per dim, because factorised video
# blocks stride one dim at a time: R(2+1)D's (1,2,2) then (2,1,1) convs reach (2,2,2), the
# stage of their (2,2,2) shortcut, where a product of per-site maxima would say 4.
StageVector = tuple[float, float, float]
_UNIT: StageVector = (1.0, 1.0, 1.0)


def _stage_vector(stride: tuple[int, ...]) -> StageVector:
    padded = (1,) * max(0, 3 - len(stride)) + tuple(stride)
    return (float(padded[-3]), float(padded[-2]), float(padded[-1]))


def _join_stage(inputs: list[fx.Node], stage: dict[fx.Node, StageVector]) -> StageVector:
    """The stage a node inherits: the largest stage among its inputs with the most elements.
    A join keeps the layout of its biggest operand (attention's queries over keys pooled
    8× more, `x * se_scale`, `x + pos_embed`), so a smaller operand's stage does not leak in."""
    if not inputs:
        return _UNIT
    sized = [(math.prod(shape) if (shape := _meta_shape(i)) else 0, stage[i]) for i in inputs]
    top = max(n for n, _ in sized)
    tied = [value for n, value in sized if n == top]
    return (max(v[0] for v in tied), max(v[1] for v in tied), max(v[2] for v in tied))


def _stages(
    view: _GraphView, site_strides: dict[fx.Node, tuple[int, ...]]
) -> dict[fx.Node, StageVector]:
    """Cumulative stride per spatial dim at each node's output: products of site strides along
    the graph, divided where the spatial size grows (upsampling); the region's inputs are 1."""
    stage: dict[fx.Node, StageVector] = {}
    for node in view.nodes:
        inputs = [i for i in node.all_input_nodes if i in stage]
        value = _join_stage(inputs, stage)
        if node in site_strides:
            step = _stage_vector(site_strides[node])
            value = (value[0] * step[0], value[1] * step[1], value[2] * step[2])
        elif inputs and node.op in ("call_function", "call_module", "call_method"):
            out = _meta_shape(node)
            # the largest input: a 1×1 map broadcast into a product (squeeze-excitation's
            # `x * scale`) is not upsampling
            shapes = [s for s in map(_meta_shape, inputs) if s and out and len(s) == len(out)]
            src = max(shapes, key=lambda s: s[-1], default=None)
            if out and src and _upsamples(src, out):
                dims = min(3, len(out) - 2)
                growth = [1.0, 1.0, 1.0]
                for k in range(1, dims + 1):
                    growth[-k] = max(1.0, out[-k] / src[-k])
                value = (value[0] / growth[0], value[1] / growth[1], value[2] / growth[2])
        stage[node] = value
    return stage


def _role(call: _Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Role | None:
    spatial_in, spatial_out = _spatial(in_shape, call.dims), _spatial(out_shape, call.dims)
    if call.op in UPSAMPLE_OPS:
        # a stride-1 transposed conv only grows the map by k-1: a convolution, not an upsampler
        grows = (
            bool(spatial_in)
            and len(spatial_out) == len(spatial_in)
            and all(o >= i for o, i in zip(spatial_out, spatial_in, strict=True))
            and spatial_out != spatial_in
        )
        strided = call.op != "conv_transpose" or max(call.stride, default=1) > 1
        return "upsample" if grows and strided else None
    if call.op.startswith("adaptive"):
        if spatial_out and all(s == 1 for s in spatial_out) and spatial_in != spatial_out:
            return "global_pool"
        if (
            spatial_out
            and spatial_in
            and any(o < i for o, i in zip(spatial_out, spatial_in, strict=False))
        ):
            return "adaptive_pool"
        return None
    if max(call.stride, default=1) <= 1:
        if (
            call.op != "conv"
            and spatial_out
            and all(s == 1 for s in spatial_out)
            and any(s > 1 for s in spatial_in)
        ):
            return "global_pool"
        return None
    if spatial_out and all(s == 1 for s in spatial_out) and call.kernel == spatial_in:
        return "global_pool"
    if (
        call.op == "conv"
        and call.kernel == call.stride
        and call.padding in ((0,) * call.dims, "valid")
    ):
        return "patchify"
    return "downsample"


def _macs(call: _Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    if call.op not in ("conv", "conv_transpose") or not call.weight_shape:
        return 0  # like torch.utils.flop_counter, pooling counts no multiply-accumulates
    if not in_shape or not out_shape:
        return 0
    transposed = call.op == "conv_transpose"
    flops = conv_flop_count(
        list(in_shape), list(call.weight_shape), list(out_shape), transposed=transposed
    )
    return flops // 2


def _make_site(
    name: str,
    module_path: str,
    call: _Call,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    stage_in: float,
    found_by: str,
    calls: int = 1,
    before: tuple[Neighbour, ...] = (),
    after: tuple[Neighbour, ...] = (),
    field: tuple[tuple[float, ...], tuple[float, ...]] = ((), ()),
    stage_out: float | None = None,
) -> Site | None:
    call = _settle(call, in_shape, out_shape)
    role = _role(call, in_shape, out_shape)
    if role is None:
        return None
    in_channels = call.in_channels or (in_shape[-call.dims - 1] if len(in_shape) > call.dims else 0)
    out_channels = call.out_channels or (
        out_shape[-call.dims - 1] if len(out_shape) > call.dims else 0
    )
    spatial_in, spatial_out = _spatial(in_shape, call.dims), _spatial(out_shape, call.dims)
    if call.op.startswith("adaptive") and spatial_in and spatial_out:
        stride = tuple(
            max(1, round(i / max(o, 1))) for i, o in zip(spatial_in, spatial_out, strict=False)
        )
        kernel = spatial_in if role == "global_pool" else stride
        call = replace(call, stride=stride, kernel=kernel)
    stage = max(1, round(stage_in))
    if role == "upsample":
        stage_after = max(1, round(stage_in / max(call.scale, default=1.0)))
    elif stage_out is not None:  # from the graph, per dimension (see StageVector)
        stage_after = max(1, round(stage_out))
    else:
        stage_after = stage * max(call.stride, default=1)
    receptive_field, jump = field
    if not jump and stage_in >= 1:  # no graph: the jump is the stage, per dimension
        jump = (float(stage_after),) * call.dims
    return Site(
        name=name,
        op=call.op,
        role=role,
        dims=call.dims,
        type_name=call.type_name,
        functional=call.functional,
        kernel=call.kernel,
        stride=call.stride,
        padding=call.padding,
        dilation=call.dilation,
        groups=call.groups,
        ceil_mode=call.ceil_mode,
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        bias=call.bias,
        in_shape=in_shape,
        out_shape=out_shape,
        stage_in=stage,
        stage_out=stage_after,
        macs=_macs(call, in_shape, out_shape),
        params=call.params,
        found_by=found_by,
        module=module_path,
        calls=calls,
        before=before,
        after=after,
        padding_mode=call.padding_mode,
        count_include_pad=call.count_include_pad,
        divisor_override=call.divisor_override,
        norm_type=call.norm_type,
        output_padding=call.output_padding,
        scale=call.scale,
        mode=call.mode,
        output_size=tuple(call.size) if call.op == "interpolate" and call.size else (),
        receptive_field=receptive_field,
        jump=jump,
    )


def _owner(node: fx.Node, region: Region) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return region.qualify(str(path))
    return region.path


def _fx_sites(view: _GraphView, seen: Counter[str]) -> tuple[list[Site], set[str]]:
    region = view.region
    found: list[tuple[fx.Node, str, str, _Call]] = []
    for node in view.nodes:
        call: _Call | None = None
        module_path = ""
        if node.op == "call_module":
            module = view.module(node)
            call = _module_call(module)
            module_path = region.qualify(str(node.target))
        elif node.op == "call_function":
            spec = _FUNCTION_OPS.get(node.target) or _aten_op(node.target)
            if spec is not None:
                op, dims = spec
                name = getattr(node.target, "__name__", None) or str(node.target)
                call = _function_call(op, dims, name, _bind(op, node.args, dict(node.kwargs)))  # type: ignore[arg-type]
        if call is not None:
            found.append((node, module_path, _owner(node, region), call))
    # upsampling sites are left to _stages, which divides where the map grows
    strides = {node: call.stride for node, _, _, call in found if call.op not in UPSAMPLE_OPS}
    stages = _stages(view, strides)
    fields = _fields(view, {node: call for node, _, _, call in found})
    sites: list[Site] = []
    # every module the graph called or traced through: hooks need not look at these again
    modules_seen = {region.qualify(str(n.target)) for n in view.nodes if n.op == "call_module"}
    for node, module_path, owner, call in found:
        src = node.args[0] if node.args else None
        in_shape = _meta_shape(src) or ()
        out_shape = _meta_shape(node) or ()
        if module_path:
            k = seen[module_path]
            seen[module_path] += 1
            name = module_path if k == 0 else f"{module_path}#{k}"
        else:
            name = f"{owner}:{node.name}" if owner else f":{node.name}"
        stage_vector = _join_stage([i for i in node.all_input_nodes if i in stages], stages)
        neighbours = region.method == "fx"
        site = _make_site(
            name,
            module_path,
            call,
            in_shape,
            out_shape,
            max(stage_vector),
            region.label,
            calls=view.module_uses[node.target] if module_path else 1,
            before=view.before(node) if neighbours else (),
            after=view.after(node) if neighbours else (),
            field=fields.get(node, ((), ())),
            stage_out=None if node not in strides else max(stages[node]),
        )
        if site is not None:
            sites.append(site)
    return sites, modules_seen


Field = tuple[tuple[float, ...], tuple[float, ...]]  # (receptive field, jump) per dimension

_TAPS = {"linear": 2, "bilinear": 2, "trilinear": 2, "bicubic": 4}  # input samples per output


def _site_field(call: _Call, node: fx.Node, src: Field) -> Field:
    """The receptive field and jump after one site, from those before it."""
    r_in, j_in = src
    in_shape = _meta_shape(node.args[0] if node.args else None) or ()
    out_shape = _meta_shape(node) or ()
    call = _settle(call, in_shape, out_shape)
    dims = len(r_in)
    if call.op.startswith("adaptive"):
        sizes = zip(in_shape[-dims:], out_shape[-dims:], strict=False)
        windows = [(math.ceil(i / max(o, 1)), max(1, i // max(o, 1))) for i, o in sizes]
        kernel, stride = tuple(k for k, _ in windows), tuple(s for _, s in windows)
        dilation: tuple[int, ...] = (1,) * dims
    else:
        kernel, stride, dilation = call.kernel, call.stride, call.dilation
    if len(kernel) != dims or len(stride) != dims:
        return (), ()
    r_out, j_out = [], []
    for i in range(dims):
        if call.op == "conv_transpose":  # a conv with stride 1 on the zero-inserted input
            j = j_in[i] / stride[i]
            r = r_in[i] + (kernel[i] - 1) * dilation[i] * j
        elif call.op in ("interpolate", "pixel_shuffle"):
            factor = call.scale[i] if i < len(call.scale) else float(stride[i])
            j = j_in[i] / factor
            r = r_in[i] + (_TAPS.get(call.mode, 1) - 1) * j_in[i]
        else:
            j = j_in[i] * stride[i]
            r = r_in[i] + (kernel[i] - 1) * dilation[i] * j_in[i]
        r_out.append(float(r))
        j_out.append(float(j))
    return tuple(r_out), tuple(j_out)


def _fields(view: _GraphView, calls: dict[fx.Node, _Call]) -> dict[fx.Node, Field]:
    """(receptive field, jump) at every node's output, walking the graph from the region's
    inputs (receptive field 1, jump 1). Joins take the largest of each."""
    fields: dict[fx.Node, Field] = {}
    for node in view.nodes:
        shape = _meta_shape(node)
        dims = len(shape) - 2 if shape is not None and len(shape) >= 3 else 0
        if node.op == "placeholder":
            fields[node] = ((1.0,) * dims, (1.0,) * dims)
            continue
        if node in calls:
            src = node.args[0] if node.args else None
            known = fields.get(src) if isinstance(src, fx.Node) else None
            if known and known[0]:
                fields[node] = _site_field(calls[node], node, known)
            continue
        sources = [i for i in node.all_input_nodes if i in fields and fields[i][0]]
        if dims and shape is not None:
            # a 1×1 map broadcast into a product (squeeze-excitation) does not join the field
            same = [i for i in sources if (_meta_shape(i) or ())[2:] == shape[2:]]
            sources = same or [i for i in sources if len(fields[i][0]) == dims]
        inputs = [fields[i] for i in sources]
        if inputs:
            fields[node] = (
                tuple(max(values) for values in zip(*(f[0] for f in inputs), strict=True)),
                tuple(max(values) for values in zip(*(f[1] for f in inputs), strict=True)),
            )
    return fields


def find_sites(analysis: Analysis) -> list[Site]:
    """Every downsampling, patchify, global-pool and upsampling site, in execution order."""
    sites: list[Site] = []
    seen: Counter[str] = Counter()
    covered: set[str] = set()
    for region in analysis.regions:
        if region.method == "fx" and region.graph is not None:
            found, called = _fx_sites(_GraphView(region, analysis), seen)
            sites += found
            covered |= called
        elif region.method == "export" and region.graph is not None:
            found, _ = _fx_sites(_GraphView(region, analysis), Counter())
            # module sites inside an export region come from hooks below (exact module objects);
            # keep only the functional ones the graph adds
            sites += [s for s in found if s.functional]
    hooks = [r for r in analysis.regions if r.method == "hooks"]
    for name, module in analysis.model.named_modules():
        if name in covered or name not in analysis.calls:
            continue
        call = _module_call(module)
        if call is None:
            continue
        records = analysis.calls[name]
        for k, record in enumerate(records):
            in_shape = record.in_shapes[0] if record.in_shapes else ()
            out_shape = record.out_shapes[0] if record.out_shapes else ()
            model_in = _model_input_shape(analysis)
            dims = call.dims or max(len(in_shape) - 2, 1)
            stage_in = _stage_from_shapes(model_in, in_shape, dims)
            site = _make_site(
                name if k == 0 else f"{name}#{k}",
                name,
                call,
                in_shape,
                out_shape,
                stage_in,
                _hooks_label(hooks, name),
                calls=len(records),
            )
            if site is not None:
                sites.append(site)
    if len(analysis.regions) > 1:
        order = {name: i for i, name in enumerate(analysis.order)}
        sites.sort(key=lambda s: order.get(s.module or s.name.split(":")[0], math.inf))
    return sites


def _hooks_label(hooks: list[Region], name: str) -> str:
    inside = [r for r in hooks if not r.path or name == r.path or name.startswith(r.path + ".")]
    return max(inside, key=lambda r: len(r.path)).label if inside else "hooks"


def _model_input_shape(analysis: Analysis) -> tuple[int, ...]:
    records = analysis.calls.get("", [])
    return records[0].in_shapes[0] if records and records[0].in_shapes else ()


def _stage_from_shapes(model_in: tuple[int, ...], site_in: tuple[int, ...], dims: int) -> float:
    a, b = _spatial(model_in, dims), _spatial(site_in, dims)
    if not a or not b or b[-1] <= 0:
        return 1.0
    ratio = a[-1] / b[-1]
    return float(2 ** round(math.log2(ratio))) if ratio >= 1 else 1.0
