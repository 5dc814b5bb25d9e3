"""Call normalisation: a module call, a `torch.nn.functional` call or an aten op, as one record.

`module_call` and `function_call` turn a conv, pooling or upsampling call into a `Call` (op,
kernel, stride, padding, ...); `resampling` says what an fx node does to resolution. The table of
known functions names each by its `torch.nn.functional` name (`max_pool2d`), which is how
checkpoints refer to a functional call that was replaced (never by an import path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.submodules import count_params

__all__ = [
    "FUNCTION_OPS",
    "SAME_PADDING_TYPES",
    "UPSAMPLE_OPS",
    "Call",
    "Op",
    "Resampling",
    "Role",
    "aten_op",
    "bind_arguments",
    "function_call",
    "function_name",
    "int_tuple",
    "meta_shape",
    "module_call",
    "node_call",
    "resampling",
    "settle",
    "spatial",
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

SAME_PADDING_TYPES = ("Conv2dSame", "StdConv2dSame", "MaxPool2dSame", "AvgPool2dSame")
"""timm's layers that compute TensorFlow 'SAME' padding in their forward (`same_padding`)."""


def int_tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        values = tuple(int(v) for v in value)
        return values * dims if len(values) == 1 else values
    return (int(value),) * dims


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


def _function_table() -> dict[Any, tuple[str, int, str]]:
    """{function: (op, dims, name)}; the name is the function's `torch.nn.functional` name."""
    table: dict[Any, tuple[str, int, str]] = {}

    def add(module: Any, name: str, op: str, dims: int) -> None:
        if hasattr(module, name):
            table.setdefault(getattr(module, name), (op, dims, name))

    for d in (1, 2, 3):
        for module in (F, torch):
            add(module, f"conv{d}d", "conv", d)
            add(module, f"max_pool{d}d", "max_pool", d)
        add(F, f"max_pool{d}d_with_indices", "max_pool", d)
        add(F, f"avg_pool{d}d", "avg_pool", d)
        add(F, f"lp_pool{d}d", "lp_pool", d)
        add(F, f"adaptive_avg_pool{d}d", "adaptive_avg_pool", d)
        add(F, f"adaptive_max_pool{d}d", "adaptive_max_pool", d)
        add(F, f"conv_transpose{d}d", "conv_transpose", d)
    add(torch, "avg_pool1d", "avg_pool", 1)
    # dims 0: taken from the input's rank when the site is made
    add(F, "interpolate", "interpolate", 0)
    add(F, "upsample", "interpolate", 0)
    add(F, "pixel_shuffle", "pixel_shuffle", 2)
    return table


_FUNCTIONS = _function_table()
FUNCTION_OPS: dict[Any, tuple[str, int]] = {f: (op, d) for f, (op, d, _) in _FUNCTIONS.items()}
"""{function: (op, dims)} for every conv, pooling and upsampling function surgeon knows."""


def function_name(target: Any) -> str | None:
    """The name of a known function (`max_pool2d` for `F.max_pool2d` and `torch.max_pool2d`),
    None for any other call target."""
    entry = _FUNCTIONS.get(target)
    return entry[2] if entry is not None else None


def node_call(node: fx.Node, root: nn.Module) -> Call | None:
    """The call record of a module call or a known function call of a graph traced from
    `root`; None for every other node."""
    if node.op == "call_module":
        return module_call(root.get_submodule(str(node.target)))
    if node.op != "call_function":
        return None
    spec = FUNCTION_OPS.get(node.target) or aten_op(node.target)
    if spec is None:
        return None
    op, dims = spec
    name = getattr(node.target, "__name__", None) or str(node.target)
    bound = bind_arguments(op, node.args, dict(node.kwargs))
    return function_call(op, dims, name, bound)  # type: ignore[arg-type]


def aten_op(target: Any) -> tuple[str, int] | None:
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
class Call:
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


def module_call(module: nn.Module) -> Call | None:
    type_name = type(module).__name__
    same = type_name in SAME_PADDING_TYPES
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        dims = len(module.kernel_size)
        stride = int_tuple(module.stride, dims)
        return Call(
            "conv_transpose",
            dims,
            type_name,
            False,
            int_tuple(module.kernel_size, dims),
            stride,
            int_tuple(module.padding, dims),
            int_tuple(module.dilation, dims),
            groups=module.groups,
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            bias=module.bias is not None,
            weight_shape=tuple(module.weight.shape),
            padding_mode=module.padding_mode,
            params=count_params(module),
            output_padding=int_tuple(module.output_padding, dims),
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
            else int_tuple(module.padding, dims)
        )
        return Call(
            "conv",
            dims,
            type_name,
            False,
            int_tuple(module.kernel_size, dims),
            int_tuple(module.stride, dims),
            padding,
            int_tuple(module.dilation, dims),
            groups=module.groups,
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            bias=module.bias is not None,
            weight_shape=tuple(module.weight.shape),
            padding_mode=module.padding_mode,
            params=count_params(module),
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
                return Call(op, dims, type_name, False, (), (), (0,) * dims, (1,) * dims)
            attrs = vars(module)
            kernel = int_tuple(attrs["kernel_size"], dims)
            stride = int_tuple(attrs.get("stride") or attrs["kernel_size"], dims)
            padding = attrs.get("padding", 0)
            pad: tuple[int, ...] | str = "same" if same else int_tuple(padding, dims)
            return Call(
                op,
                dims,
                type_name,
                False,
                kernel,
                stride,
                pad,
                int_tuple(attrs.get("dilation", 1), dims),
                ceil_mode=bool(attrs.get("ceil_mode", False)),
                count_include_pad=bool(attrs.get("count_include_pad", True)),
                divisor_override=attrs.get("divisor_override"),
                norm_type=attrs.get("norm_type"),
            )
    return None


def _resize_call(type_name: str, functional: bool, size: Any, scale_factor: Any, mode: str) -> Call:
    """An interpolation call; its dims and factors are settled by `settle` from the shapes."""
    scale: tuple[float, ...] = ()
    if isinstance(scale_factor, (list, tuple)):
        scale = tuple(float(f) for f in scale_factor)
    elif scale_factor is not None:
        scale = (float(scale_factor),)
    return Call(
        "interpolate", 0, type_name, functional, (), (), (), (), scale=scale, mode=mode, size=size
    )


def _shuffle_call(type_name: str, functional: bool, factor: int) -> Call:
    r = int(factor)
    return Call(
        "pixel_shuffle", 2, type_name, functional, (1, 1), (r, r), (0, 0), (1, 1), scale=(r, r)
    )


def settle(call: Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Call:
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
    call = node_call(node, root)
    if call is None:
        return None
    return Resampling(call.op, call.stride, call.scale, call.size, node.op == "call_module")


def bind_arguments(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = _ARGS[op]
    bound = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        bound["input" if key == "self" else key] = value
    return bound


def function_call(op: Op, dims: int, name: str, bound: dict[str, Any]) -> Call | None:
    if op == "interpolate":
        mode = bound.get("mode", "nearest")
        return _resize_call(name, True, bound.get("size"), bound.get("scale_factor"), str(mode))
    if op == "pixel_shuffle":
        factor = bound.get("upscale_factor")
        return _shuffle_call(name, True, factor) if isinstance(factor, int) else None
    if op == "conv_transpose":
        weight = bound.get("weight")
        wshape = tuple(meta_shape(weight) or ())
        stride = int_tuple(bound.get("stride", 1), dims)
        groups = int(bound.get("groups", 1))
        return Call(
            op,
            dims,
            name,
            True,
            wshape[2:] if wshape else (1,) * dims,
            stride,
            int_tuple(bound.get("padding", 0), dims),
            int_tuple(bound.get("dilation", 1), dims),
            groups=groups,
            out_channels=wshape[1] * groups if wshape else 0,
            bias=bound.get("bias") is not None,
            weight_shape=wshape,
            output_padding=int_tuple(bound.get("output_padding", 0), dims),
            scale=tuple(float(s) for s in stride),
        )
    if op.startswith("adaptive"):
        return Call(op, dims, name, True, (), (), (0,) * dims, (1,) * dims)
    if op == "conv":
        weight = bound.get("weight")
        wshape = tuple(meta_shape(weight) or ())
        padding = bound.get("padding", 0)
        return Call(
            op,
            dims,
            name,
            True,
            wshape[2:] if wshape else (1,) * dims,
            int_tuple(bound.get("stride", 1), dims),
            padding if isinstance(padding, str) else int_tuple(padding, dims),
            int_tuple(bound.get("dilation", 1), dims),
            groups=int(bound.get("groups", 1)),
            out_channels=wshape[0] if wshape else 0,
            bias=bound.get("bias") is not None,
            weight_shape=wshape,
        )
    kernel = int_tuple(bound["kernel_size"], dims)
    stride_value = bound.get("stride")
    stride = int_tuple(stride_value, dims) if stride_value not in (None, [], ()) else kernel
    return Call(
        op,
        dims,
        name,
        True,
        kernel,
        stride,
        int_tuple(bound.get("padding", 0), dims),
        int_tuple(bound.get("dilation", 1), dims),
        ceil_mode=bool(bound.get("ceil_mode", False)),
        count_include_pad=bool(bound.get("count_include_pad", True)),
        divisor_override=bound.get("divisor_override"),
        norm_type=bound.get("norm_type"),
    )


def meta_shape(value: Any) -> tuple[int, ...] | None:
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


def spatial(shape: tuple[int, ...] | None, dims: int) -> tuple[int, ...]:
    return tuple(shape[-dims:]) if shape and len(shape) > dims else ()
