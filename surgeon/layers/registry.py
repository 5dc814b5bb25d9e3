"""The layer registry: a name for every module type surgeon puts into a model, and that
module's constructor arguments as JSON data.

A checkpoint records each edit as data, `{"type": "SpaceToDepthConv", "args": {...}}` (a
`Sequential` as `{"type": "Sequential", "children": [...]}`), and rebuilds the module from the
registry: nothing named in the data is ever imported. The registry holds surgeon's replacement
layers (each with a `config()` method) and a fixed allow-list of the torch.nn classes the
rewrites build; `register_layer` adds a plugin's layers.

`build_module` checks a spec against the constructor's type hints before calling it: every
problem is one `ValueError` line naming the type and the argument. JSON lists become tuples
where the constructor takes a tuple or a sequence.
"""

from __future__ import annotations

import inspect
import math
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from torch import nn

from surgeon.layers.aps import AdaptivePolyphaseSampling
from surgeon.layers.blur import BlurPool
from surgeon.layers.folded import FoldedSpaceToDepthConv
from surgeon.layers.folded_blur import FoldedBlurConv
from surgeon.layers.haar import HaarConv
from surgeon.layers.lip import LocalImportancePool
from surgeon.layers.lps import LearnablePolyphaseSampling
from surgeon.layers.msau import AdaptiveUpsampling
from surgeon.layers.pool_pad import PoolPad
from surgeon.layers.resize_conv import ResizeConv
from surgeon.layers.sfm import AdaptiveResampling
from surgeon.layers.softpool import SoftPool
from surgeon.layers.spd import SpaceToDepthConv
from surgeon.layers.stride_pad import StridePad
from surgeon.layers.sub_pixel import SubPixelConv

__all__ = ["build_module", "layer_config", "module_spec", "register_layer", "registered_layers"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# what a module's constructor receives from elsewhere than its recorded arguments
_NOT_RECORDED = frozenset({"device", "dtype"})


@dataclass(frozen=True)
class _Argument:
    hint: Any  # the type a JSON value must have (int, str, Sequence[int], Literal[...], unions)
    required: bool


@dataclass(frozen=True)
class _Entry:
    cls: type[nn.Module]
    arguments: Mapping[str, _Argument]
    config: Callable[[Any], dict[str, Any]] | None  # None: nn.Sequential, recorded by children


_ENTRIES: dict[str, _Entry] = {}
_NAMES: dict[type[nn.Module], str] = {}


# --------------------------------------------------------------------------- registration


def register_layer(cls: type[ModuleT], name: str | None = None) -> type[ModuleT]:
    """Register `cls` under `name` (its class name by default) and return it (a decorator too).

    `cls` must define `config() -> dict[str, Any]` returning JSON data such that
    `cls(**m.config())` rebuilds `m` with the same state-dict keys and shapes, and type hints
    on its constructor's arguments that say what JSON value each takes (int, float, bool, str,
    None, Literal, sequences and tuples of those, unions); `device` and `dtype` are never
    recorded. Raises TypeError for a class that does not qualify, ValueError for a name that
    another class holds. Registering the same class under the same name again does nothing.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer takes an nn.Module subclass, got {cls!r}")
    config = getattr(cls, "config", None)
    if not callable(config):
        raise TypeError(
            f"{cls.__qualname__} has no config() method returning its constructor arguments"
        )
    _add(name or cls.__name__, cls, _arguments(cls), config)
    return cls


def registered_layers() -> dict[str, type[nn.Module]]:
    """{registered name: class}, surgeon's layers and the allowed torch.nn classes included."""
    return {name: entry.cls for name, entry in _ENTRIES.items()}


def _add(
    name: str,
    cls: type[nn.Module],
    arguments: Mapping[str, _Argument],
    config: Callable[[Any], dict[str, Any]] | None,
) -> None:
    held = _ENTRIES.get(name)
    if held is not None and held.cls is not cls:
        raise ValueError(f"layer name {name!r} is already registered to {held.cls.__qualname__}")
    if cls in _NAMES and _NAMES[cls] != name:
        raise ValueError(f"{cls.__qualname__} is already registered as {_NAMES[cls]!r}")
    _ENTRIES[name] = _Entry(cls, arguments, config)
    _NAMES[cls] = name


def _arguments(cls: type[nn.Module]) -> dict[str, _Argument]:
    """The recorded arguments of `cls.__init__`, from its signature and type hints."""
    init: Any = cls.__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception as exc:  # an annotation naming what its module does not define
        raise TypeError(f"{cls.__qualname__}.__init__'s type hints do not resolve: {exc}") from exc
    arguments: dict[str, _Argument] = {}
    for parameter in list(inspect.signature(init).parameters.values())[1:]:
        if parameter.name in _NOT_RECORDED:
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{cls.__qualname__}.__init__ takes *{parameter.name}: not recordable")
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise TypeError(f"{cls.__qualname__}.__init__: {parameter.name} is positional-only")
        hint = hints.get(parameter.name)
        if hint is None or not _supported(hint):
            raise TypeError(
                f"{cls.__qualname__}.__init__: argument {parameter.name!r} needs a type hint of "
                f"JSON types (int, float, bool, str, None, Literal, Sequence, tuple), got {hint!r}"
            )
        arguments[parameter.name] = _Argument(hint, parameter.default is parameter.empty)
    return arguments


# --------------------------------------------------------------------------- JSON types


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _supported(hint: Any) -> bool:
    if hint in (int, float, bool, str, type(None), Any):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        return all(_supported(a) for a in args)
    if origin is Literal:
        return all(isinstance(a, (int, str, bool)) for a in args)
    if origin in (Sequence, list):
        return len(args) == 1 and _supported(args[0])
    if origin is tuple:
        return bool(args) and all(a is Ellipsis or _supported(a) for a in args)
    return False


class _Mismatch(Exception):
    """A value does not have the type its argument's hint asks for."""


def _coerce(value: Any, hint: Any) -> Any:
    """`value` (JSON data) as `hint` asks for, lists made tuples where it wants a tuple or a
    sequence; _Mismatch if it does not fit."""
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        for option in args:
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    if origin is list:
        return [_coerce(v, args[0]) for v in value]
    if origin is Sequence or args[-1] is Ellipsis:
        return tuple(_coerce(v, args[0]) for v in value)
    if len(value) != len(args):
        raise _Mismatch
    return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))


def _describe(hint: Any) -> str:
    """What a hint asks for, in JSON's words."""
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
        Any: "any value",
    }
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Sequence, list) or args[-1] is Ellipsis:
        return f"a list of ({_describe(args[0])})"
    return f"a list of {len(args)}: " + ", ".join(f"({_describe(a)})" for a in args)


def _json_data(value: Any) -> bool:
    """Whether `value` is plain JSON data: what `json.dumps(..., allow_nan=False)` writes and
    `json.loads` gives back equal."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_data(v) for k, v in value.items())
    return False


# --------------------------------------------------------------------------- spec <-> module


def layer_config(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a module of a registered type, as JSON data.

    Surgeon's layers answer with their `config()`; the torch.nn classes with the arguments their
    attributes hold (a convolution's `bias` as a bool). TypeError for an unregistered type and
    for `nn.Sequential`, which `module_spec` records by its children.
    """
    name = _NAMES.get(type(module))
    if name is None:
        raise TypeError(f"{_class_name(module)} is not a registered layer type")
    config = _ENTRIES[name].config
    if config is None:
        raise TypeError("an nn.Sequential has no arguments, only children: use module_spec")
    return config(module)


def module_spec(module: nn.Module) -> dict[str, Any]:
    """`module` as JSON data: `{"type": NAME, "args": {...}}`, or for an `nn.Sequential`
    `{"type": "Sequential", "children": [spec, ...]}`.

    Types match exactly (a subclass of a registered class is not registered: its forward may
    differ). TypeError naming the class and its path below `module` for a module of an
    unregistered type, a Sequential with named children, or a config that is not JSON data.
    """
    return _spec(module, "")


def _spec(module: nn.Module, path: str) -> dict[str, Any]:
    where = path or "the root module"
    name = _NAMES.get(type(module))
    if name is None:
        raise TypeError(
            f"{where} is a {_class_name(module)}, not a registered layer type "
            "(surgeon.layers.register_layer adds one)"
        )
    config = _ENTRIES[name].config
    if config is None:
        children = list(module.named_children())
        if [child for child, _ in children] != [str(i) for i in range(len(children))]:
            raise TypeError(
                f"{where} is an nn.Sequential with named children; only index-named ones "
                "are recorded"
            )
        return {
            "type": name,
            "children": [_spec(child, f"{path}.{key}" if path else key) for key, child in children],
        }
    args = config(module)
    if not isinstance(args, dict) or not _json_data(args):
        raise TypeError(
            f"{where}: {_class_name(module)}.config() returned {args!r}, not JSON data "
            "(lists, not tuples; finite numbers; no tensors, dtypes or devices)"
        )
    return {"type": name, "args": args}


def build_module(spec: Mapping[str, Any]) -> nn.Module:
    """The module a `module_spec` describes, freshly initialised (load its weights next).

    The spec is checked before anything is built: an unknown type, a missing, unexpected or
    wrong-typed argument, or arguments the constructor rejects each raise ValueError, one line
    naming the type and the argument (and, inside a Sequential, the child's position).
    """
    return _build(spec, "")


def _build(spec: Any, where: str) -> nn.Module:
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where}a layer spec is an object with 'type' and 'args', got {_short(spec)}"
        )
    name = spec.get("type")
    if not isinstance(name, str) or name not in _ENTRIES:
        known = ", ".join(sorted(_ENTRIES))
        raise ValueError(f"{where}unknown layer type {_short(name)}; registered types: {known}")
    entry = _ENTRIES[name]
    if entry.config is None:
        _expect_keys(spec, {"type", "children"}, name, where)
        children = spec["children"]
        if not isinstance(children, list):
            raise ValueError(
                f"{where}Sequential: 'children' must be a list, got {_short(children)}"
            )
        return nn.Sequential(
            *(_build(child, f"{where}Sequential child {i}: ") for i, child in enumerate(children))
        )
    _expect_keys(spec, {"type", "args"}, name, where)
    args = spec["args"]
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}{name}: 'args' must be an object, got {_short(args)}")
    unexpected = sorted(set(args) - set(entry.arguments))
    if unexpected:
        raise ValueError(f"{where}{name}: unexpected argument {_short(unexpected[0])}")
    kwargs: dict[str, Any] = {}
    for key, argument in entry.arguments.items():
        if key not in args:
            if argument.required:
                raise ValueError(f"{where}{name}: missing argument {key!r}")
            continue
        try:
            kwargs[key] = _coerce(args[key], argument.hint)
        except _Mismatch:
            raise ValueError(
                f"{where}{name}: argument {key!r} must be {_describe(argument.hint)}, "
                f"got {_short(args[key])}"
            ) from None
    try:
        return entry.cls(**kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{where}{name}: {message}") from exc


def _expect_keys(spec: Mapping[str, Any], keys: set[str], name: str, where: str) -> None:
    missing = sorted(keys - set(spec))
    if missing:
        raise ValueError(f"{where}{name}: the spec has no {missing[0]!r}")
    extra = sorted(set(spec) - keys)
    if extra:
        raise ValueError(f"{where}{name}: the spec has an unexpected key {extra[0]!r}")


def _short(value: Any) -> str:
    """`repr(value)`, abbreviated: error lines stay short whatever the data holds."""
    return reprlib.repr(value)


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------- torch.nn classes


def _listed(value: Any) -> Any:
    """A module attribute as JSON data: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


_SIZE: Any = int | tuple[int, ...]
_SCALE: Any = float | tuple[float, ...]


def _conv_config(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> dict[str, Any]:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": _listed(conv.padding),
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


_CONV_ARGUMENTS = {
    "in_channels": _Argument(int, True),
    "out_channels": _Argument(int, True),
    "kernel_size": _Argument(_SIZE, True),
    "stride": _Argument(_SIZE, False),
    "padding": _Argument(str | _SIZE, False),
    "dilation": _Argument(_SIZE, False),
    "groups": _Argument(int, False),
    "bias": _Argument(bool, False),
    "padding_mode": _Argument(Literal["zeros", "reflect", "replicate", "circular"], False),
}


def _max_pool_config(pool: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d) -> dict[str, Any]:
    return {
        "kernel_size": _listed(pool.kernel_size),
        "stride": _listed(pool.stride),
        "padding": _listed(pool.padding),
        "dilation": _listed(pool.dilation),
        "return_indices": pool.return_indices,
        "ceil_mode": pool.ceil_mode,
    }


_MAX_POOL_ARGUMENTS = {
    "kernel_size": _Argument(_SIZE, True),
    "stride": _Argument(_SIZE | None, False),
    "padding": _Argument(_SIZE, False),
    "dilation": _Argument(_SIZE, False),
    "return_indices": _Argument(bool, False),
    "ceil_mode": _Argument(bool, False),
}


def _avg_pool_config(pool: nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d) -> dict[str, Any]:
    config = {
        "kernel_size": _listed(pool.kernel_size),
        "stride": _listed(pool.stride),
        "padding": _listed(pool.padding),
        "ceil_mode": pool.ceil_mode,
        "count_include_pad": pool.count_include_pad,
    }
    if not isinstance(pool, nn.AvgPool1d):  # AvgPool1d takes no divisor_override
        config["divisor_override"] = pool.divisor_override
    return config


_AVG_POOL_1D_ARGUMENTS = {
    "kernel_size": _Argument(_SIZE, True),
    "stride": _Argument(_SIZE | None, False),
    "padding": _Argument(_SIZE, False),
    "ceil_mode": _Argument(bool, False),
    "count_include_pad": _Argument(bool, False),
}
_AVG_POOL_ARGUMENTS = {**_AVG_POOL_1D_ARGUMENTS, "divisor_override": _Argument(int | None, False)}


def _upsample_config(up: nn.Upsample) -> dict[str, Any]:
    return {
        "size": _listed(up.size),
        "scale_factor": _listed(up.scale_factor),
        "mode": up.mode,
        "align_corners": up.align_corners,
        "recompute_scale_factor": up.recompute_scale_factor,
    }


_UPSAMPLE_ARGUMENTS = {
    "size": _Argument(_SIZE | None, False),
    "scale_factor": _Argument(_SCALE | None, False),
    "mode": _Argument(
        Literal["nearest", "linear", "bilinear", "bicubic", "trilinear", "nearest-exact"], False
    ),
    "align_corners": _Argument(bool | None, False),
    "recompute_scale_factor": _Argument(bool | None, False),
}


def _register_builtins() -> None:
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        _add(conv.__name__, conv, _CONV_ARGUMENTS, _conv_config)
    for pool in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        _add(pool.__name__, pool, _MAX_POOL_ARGUMENTS, _max_pool_config)
    _add("AvgPool1d", nn.AvgPool1d, _AVG_POOL_1D_ARGUMENTS, _avg_pool_config)
    _add("AvgPool2d", nn.AvgPool2d, _AVG_POOL_ARGUMENTS, _avg_pool_config)
    _add("AvgPool3d", nn.AvgPool3d, _AVG_POOL_ARGUMENTS, _avg_pool_config)
    _add("Sequential", nn.Sequential, {}, None)
    _add("Identity", nn.Identity, {}, lambda _: {})
    _add(
        "PixelShuffle",
        nn.PixelShuffle,
        {"upscale_factor": _Argument(int, True)},
        lambda shuffle: {"upscale_factor": shuffle.upscale_factor},
    )
    _add(
        "PixelUnshuffle",
        nn.PixelUnshuffle,
        {"downscale_factor": _Argument(int, True)},
        lambda unshuffle: {"downscale_factor": unshuffle.downscale_factor},
    )
    _add("Upsample", nn.Upsample, _UPSAMPLE_ARGUMENTS, _upsample_config)
    for layer in (
        SpaceToDepthConv,
        FoldedSpaceToDepthConv,
        BlurPool,
        FoldedBlurConv,
        PoolPad,
        StridePad,
        SubPixelConv,
        ResizeConv,
        AdaptivePolyphaseSampling,
        LearnablePolyphaseSampling,
        HaarConv,
        LocalImportancePool,
        SoftPool,
        AdaptiveResampling,
        AdaptiveUpsampling,
    ):
        register_layer(layer)


_register_builtins()
