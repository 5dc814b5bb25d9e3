"""Model specs -> nn.Module: torchvision and timm registries, user factories, weights.

A spec is `resnet50` (torchvision first, then timm), `torchvision:resnet50`, `timm:resnet50`
or `package.module:factory` (any importable callable returning an nn.Module).
"""

from __future__ import annotations

import difflib
import importlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from surgeon.errors import ModelSpecError, UsageError, WeightsError

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "build_model",
    "example_inputs",
    "load_model",
    "load_state",
    "parse_input_size",
    "parse_kwargs",
    "parse_spec",
]

Source = Literal["torchvision", "timm", "import"]
Task = Literal[
    "classification", "detection", "segmentation", "video", "quantization", "optical_flow"
]

_DEFAULT_SIZES: dict[str, tuple[int, ...]] = {
    "classification": (3, 224, 224),
    "segmentation": (3, 224, 224),
    "detection": (3, 224, 224),
    "quantization": (3, 224, 224),
    "video": (3, 16, 112, 112),
    "optical_flow": (3, 128, 128),
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: where the model comes from and how to build it."""

    source: Source
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The canonical spec string, e.g. `torchvision:resnet50`."""
        return self.name if self.source == "import" else f"{self.source}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.text,
            "source": self.source,
            "name": self.name,
            "kwargs": dict(self.kwargs),
        }


@dataclass
class LoadedModel:
    """A built model with what the rest of the pipeline needs to run it."""

    model: nn.Module
    spec: ModelSpec
    task: Task
    input_size: tuple[int, ...]
    weights: str  # "random", "pretrained" or the weights file path
    # where the weights came from, as a checkpoint records it (`surgeon heal` rebuilds the
    # unpatched model from it): {"kind": "random", "seed": ...}, {"kind": "file", "path": ...,
    # "sha256": ...} or {"kind": "pretrained", "name": ...}
    source_weights: dict[str, Any] = field(default_factory=lambda: {"kind": "unrecorded"})


@cache
def _torchvision_names() -> dict[str, Task]:
    from torchvision import models

    tasks: dict[str, Task] = {}
    modules: list[tuple[Any, Task]] = [
        (models.detection, "detection"),
        (models.segmentation, "segmentation"),
        (models.video, "video"),
        (models.quantization, "quantization"),
        (models.optical_flow, "optical_flow"),
    ]
    for module, task in modules:
        for name in models.list_models(module=module):
            tasks[name] = task
    for name in models.list_models():
        tasks.setdefault(name, "classification")
    return tasks


@cache
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def _suggest(name: str) -> str:
    pool = sorted(set(_torchvision_names()) | _timm_names())
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    if not close:
        close = [n for n in pool if name.lower() in n][:5]
    return f"; did you mean {', '.join(close)}?" if close else ""


def parse_spec(text: str, kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
    """Resolve a spec string to a ModelSpec (bare names: torchvision first, then timm)."""
    kwargs = dict(kwargs or {})
    text = text.strip()
    if not text:
        raise ModelSpecError("empty model spec; pass a name such as resnet50")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("torchvision", "timm"):
        if prefix == "torchvision" and rest not in _torchvision_names():
            raise ModelSpecError(f"unknown torchvision model {rest!r}{_suggest(rest)}")
        if prefix == "timm" and rest not in _timm_names():
            raise ModelSpecError(f"unknown timm model {rest!r}{_suggest(rest)}")
        return ModelSpec(prefix, rest, kwargs)  # type: ignore[arg-type]
    if sep:
        if not prefix or not rest.isidentifier():
            raise ModelSpecError(
                f"bad import spec {text!r}; write package.module:factory, e.g. mypkg.nets:build"
            )
        return ModelSpec("import", text, kwargs)
    if text in _torchvision_names():
        return ModelSpec("torchvision", text, kwargs)
    if text in _timm_names():
        return ModelSpec("timm", text, kwargs)
    raise ModelSpecError(f"unknown model {text!r} (not in torchvision or timm){_suggest(text)}")


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """Parse `key=value` strings; values are YAML scalars (`3`, `0.5`, `true`, `[1, 2]`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"bad --model-kwarg {item!r}; write key=value, e.g. num_classes=10")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def parse_input_size(text: str) -> tuple[int, ...]:
    """Parse `3x224x224` (or `3x16x112x112` for video) into a tuple of positive ints."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"bad --input-size {text!r}; write channels x height x width, e.g. 3x224x224"
        ) from None
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise UsageError(f"bad --input-size {text!r}: need 2 to 4 positive sizes, e.g. 3x224x224")
    if len(dims) > 4:
        raise UsageError(f"bad --input-size {text!r}: at most 4 sizes (C x T x H x W)")
    return dims


def _default_input_size(spec: ModelSpec, task: Task, model: nn.Module) -> tuple[int, ...]:
    if spec.source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size")
        if size:
            return tuple(int(s) for s in size)
    image_size = getattr(model, "image_size", None)  # torchvision ViT: what it was built for
    if spec.source == "torchvision" and isinstance(image_size, int):
        # the DEFAULT weights' crop can differ (vit_h_14: 518 px SWAG weights, 224 px model)
        return (3, image_size, image_size)
    if spec.source == "torchvision" and task in ("classification", "video"):
        from torchvision.models import get_model_weights

        try:
            weights = get_model_weights(spec.name).DEFAULT
            crop = weights.transforms().crop_size
            if task == "video":
                # MViT and S3D need 224-px crops and at least 14-16 frames; ResNet3Ds use 112
                frames = max(16, int(weights.meta.get("min_temporal_size", 16)))
                return (3, frames, int(crop[0]), int(crop[-1]))
            return (3, int(crop[0]), int(crop[-1]))
        except (ValueError, AttributeError, TypeError):
            pass
    return _DEFAULT_SIZES[task]


def _build_torchvision(spec: ModelSpec, task: Task, pretrained: bool) -> nn.Module:
    from torchvision.models import get_model

    kwargs = dict(spec.kwargs)
    kwargs.setdefault("weights", "DEFAULT" if pretrained else None)
    if task in ("detection", "segmentation"):
        kwargs.setdefault("weights_backbone", "DEFAULT" if pretrained else None)
    if task == "quantization":
        kwargs.setdefault("quantize", False)
    return get_model(spec.name, **kwargs)


def _build_import(spec: ModelSpec) -> nn.Module:
    module_name, _, attr = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code
        raise ModelSpecError(
            f"cannot import {module_name!r} for model spec {spec.name!r}: {exc}; "
            "check that the package is installed and on PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r}")
    model = factory(**spec.kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _task(spec: ModelSpec) -> Task:
    return _torchvision_names()[spec.name] if spec.source == "torchvision" else "classification"


def build_model(
    spec: ModelSpec, *, pretrained: bool = False, weights: Path | None = None, seed: int = 0
) -> LoadedModel:
    """Build the model (random init from `seed` unless `pretrained`), load `weights` if given,
    eval mode. The same seed builds the same random weights."""
    task = _task(spec)
    torch.manual_seed(seed)
    try:
        if spec.source == "torchvision":
            model = _build_torchvision(spec, task, pretrained)
        elif spec.source == "timm":
            import timm

            model = timm.create_model(spec.name, pretrained=pretrained, **spec.kwargs)
        else:
            model = _build_import(spec)
    except TypeError as exc:
        raise ModelSpecError(
            f"cannot build {spec.text} with {dict(spec.kwargs)}: {exc}; check --model-kwarg names"
        ) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise WeightsError(
                f"could not fetch pretrained weights for {spec.text}: {exc}; "
                "check the internet connection or pass --weights FILE"
            ) from exc
        raise ModelSpecError(f"cannot build {spec.text}: {exc}") from exc
    source = "pretrained" if pretrained else "random"
    record: dict[str, Any] = (
        {"kind": "pretrained", "name": spec.text}
        if pretrained
        else {"kind": "random", "seed": seed}
    )
    if weights is not None:
        from surgeon.checkpoint.files import sha256_file
        from surgeon.checkpoint.weights import check_state_dict_fits, load_weights_file

        state = load_weights_file(weights)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_state_dict_fits(expected, state, source=weights)
        load_state(model, state)
        source = str(weights)
        path = Path(weights).resolve()
        record = {"kind": "file", "path": str(path), "sha256": sha256_file(path)}
    model.eval()
    size = _default_input_size(spec, task, model)
    return LoadedModel(model, spec, task, size, source, record)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state, strict=True)` for a state dict read from a file.

    safetensors keeps no per-module version metadata (`state_dict()._metadata`), and a module
    with a versioned `_load_from_state_dict` refuses a state dict without it (torchvision's
    MNASNet: "version should be set to 1 or 2"); the model's own versions are attached then.
    """
    if getattr(state, "_metadata", None) is None:
        metadata = getattr(model.state_dict(), "_metadata", None)
        state = OrderedDict(state)
        if metadata is not None:
            state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def load_model(
    text: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    weights: Path | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Parse a spec string and build the model: the one call the CLI makes."""
    spec = parse_spec(text, kwargs)
    return build_model(spec, pretrained=pretrained, weights=weights, seed=seed)


def example_inputs(
    task: Task | str, input_size: tuple[int, ...], *, batch: int = 1, seed: int = 0
) -> tuple[Any, ...]:
    """Positional example arguments for a model of this task (seeded random images)."""
    gen = torch.Generator().manual_seed(seed)
    if task == "detection":
        return ([torch.rand(input_size[-3:], generator=gen) for _ in range(batch)],)
    if task == "optical_flow":
        shape = (batch, *input_size[-3:])
        return (torch.rand(shape, generator=gen), torch.rand(shape, generator=gen))
    if task == "video" and len(input_size) == 3:
        input_size = (input_size[0], 16, *input_size[1:])
    return (torch.randn((batch, *input_size), generator=gen),)
