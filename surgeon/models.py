"""Model specs -> nn.Module: torchvision and timm registries, pretrained tags, hub names,
user factories, weights.

A spec is one of
- a registry name: `resnet50` (torchvision first, then timm), `torchvision:resnet50`,
  `timm:resnet50`;
- a registry name with a pretrained tag: timm's `resnet50.a1_in1k` or
  `timm:convnext_tiny.fb_in22k_ft_in1k_384`, torchvision's weights enum
  `torchvision:resnet50.IMAGENET1K_V2`. The tag picks the weights that `pretrained` loads and
  the input size they were trained at; without `pretrained` the model is randomly initialised;
- a Hugging Face hub name, `hf-hub:timm/resnet50.a1_in1k`, built by timm from the hub's config
  (the hub or its local cache is read even for a random initialisation);
- `package.module:factory`, any importable callable returning an nn.Module.

Random initialisation is seeded, so the same spec and seed give the same model. Pretrained
weights come from the caches torch hub (`$TORCH_HOME/hub/checkpoints`) and the Hugging Face hub
(`$HF_HOME/hub`, `HF_HUB_OFFLINE=1`) keep, downloading only what is not cached. Each
`LoadedModel` records which weights it holds (`LoadedModel.weights`, JSON-able).
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import socket
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

import torch
import yaml
from torch import nn

from surgeon.errors import Argument, ModelSpecError, UsageError, WeightsError

__all__ = [
    "DEFAULT_TAG",
    "HF_HUB_PREFIX",
    "LoadedModel",
    "ModelSpec",
    "build_model",
    "describe_weights",
    "example_inputs",
    "load_model",
    "load_state",
    "parse_input_size",
    "parse_kwargs",
    "parse_spec",
    "weights_label",
]

Source = Literal["torchvision", "timm", "import"]
Task = Literal[
    "classification", "detection", "segmentation", "video", "quantization", "optical_flow"
]

HF_HUB_PREFIX = "hf-hub:"
DEFAULT_TAG = "DEFAULT"
"""What `pretrained=True` (and `--pretrained` alone) stands for: the library's default weights."""

_WEIGHTS_FILE = Argument("weights", metavar="FILE")  # the fix for weights a library lacks

_HUB_NAME = re.compile(r"^hf-hub:[\w.-]+/[\w.-]+(@[\w./-]+)?$")

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
    """A resolved model spec: where the model comes from and how to build it.

    `name` is what the library is given: `resnet50`, `resnet50.a1_in1k` (architecture and
    pretrained tag), `hf-hub:timm/resnet50.a1_in1k`, or `package.module:factory`."""

    source: Source
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hub(self) -> bool:
        """True for a Hugging Face hub name (`hf-hub:org/name`), which timm builds."""
        return self.source == "timm" and self.name.startswith(HF_HUB_PREFIX)

    @property
    def architecture(self) -> str:
        """The registry name without its pretrained tag (`resnet50` for `resnet50.a1_in1k`)."""
        if self.source == "import" or self.hub:
            return self.name
        return self.name.partition(".")[0]

    @property
    def tag(self) -> str | None:
        """The pretrained tag the spec names (`a1_in1k`, `IMAGENET1K_V2`), if any."""
        if self.source == "import" or self.hub:
            return None
        return self.name.partition(".")[2] or None

    @property
    def text(self) -> str:
        """The canonical spec string: `torchvision:resnet50`, `hf-hub:timm/resnet18.a1_in1k`."""
        return self.name if self.source == "import" or self.hub else f"{self.source}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.text,
            "source": self.source,
            "name": self.name,
            "kwargs": dict(self.kwargs),
        }


@dataclass
class LoadedModel:
    """A built model with what the rest of the pipeline needs to run it.

    `weights` says which weights the model holds, as JSON-able data:
    `{"kind": "random", "seed": N}`, `{"kind": "file", "path": ABS_PATH, "sha256": HEX}` or
    `{"kind": "pretrained", "name": TAG_OR_ENUM, "file": CACHED_FILE_OR_NONE,
    "sha256": HEX_OR_NONE}` (`name` is timm's `arch.tag`, torchvision's `Enum.MEMBER` or the hub
    name; `file` the cache file the library read)."""

    model: nn.Module
    spec: ModelSpec
    task: Task
    input_size: tuple[int, ...]
    weights: dict[str, Any]


def describe_weights(weights: Mapping[str, Any]) -> str:
    """One phrase for a `LoadedModel.weights` record: what the model holds and from which file."""
    kind = weights.get("kind")
    if kind == "random":
        return f"random weights, seed {weights.get('seed')}"
    if kind == "file":
        return f"weights from {weights.get('path')}"
    if kind == "pretrained":
        file = weights.get("file")
        where = f" from {file}" if file else " (no cache file found)"
        return f"pretrained weights {weights.get('name')}{where}"
    if kind == "unrecorded":
        return "weights not recorded"
    return f"weights {dict(weights)}"


def weights_label(weights: Mapping[str, Any]) -> str:
    """A few words for a `LoadedModel.weights` record, for a table cell: `random, seed 0`,
    the weights file's name, the pretrained weights' name, `unrecorded`."""
    kind = weights.get("kind")
    if kind == "random":
        return f"random, seed {weights.get('seed')}"
    if kind == "file":
        return Path(str(weights.get("path"))).name
    if kind == "pretrained":
        return str(weights.get("name"))
    return str(kind or "unrecorded")


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


def _torchvision_tags(architecture: str) -> list[str]:
    """The members of the architecture's weights enum (`IMAGENET1K_V1`, ..., `DEFAULT`)."""
    from torchvision.models import get_model_weights

    return list(get_model_weights(architecture).__members__)


def _timm_tags(architecture: str) -> list[str]:
    """timm's pretrained tags of an architecture (`a1_in1k`, ...), default first."""
    from timm.models import get_arch_pretrained_cfgs

    return [name.partition(".")[2] for name in get_arch_pretrained_cfgs(architecture)]


def _suggest(name: str) -> str:
    pool = sorted(set(_torchvision_names()) | _timm_names())
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    if not close:
        close = [n for n in pool if name.lower() in n][:5]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _tag_list(tags: Sequence[str], tag: str) -> str:
    close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
    shown = close + [t for t in tags if t not in close][: max(0, 6 - len(close))]
    more = f", ... ({len(tags)} in all)" if len(tags) > len(shown) else ""
    return ", ".join(shown) + more


def _unknown_tag(architecture: str, tag: str, sources: Sequence[str]) -> ModelSpecError:
    known = []
    if "torchvision" in sources and architecture in _torchvision_names():
        known.append(f"torchvision weights {_tag_list(_torchvision_tags(architecture), tag)}")
    if "timm" in sources and architecture in _timm_names():
        tags = _timm_tags(architecture)
        known.append(f"timm tags {_tag_list(tags, tag)}" if tags else "timm has no tags for it")
    return ModelSpecError(f"unknown pretrained tag {tag!r} for {architecture}: {'; '.join(known)}")


def _registry_spec(
    source: Literal["torchvision", "timm"], name: str, kwargs: dict[str, Any]
) -> ModelSpec:
    """`name` (`arch` or `arch.tag`) in one registry, or a ModelSpecError naming what is wrong."""
    architecture, dot, tag = name.partition(".")
    known = _torchvision_names() if source == "torchvision" else _timm_names()
    if architecture not in known:
        raise ModelSpecError(f"unknown {source} model {architecture!r}{_suggest(architecture)}")
    tags = _torchvision_tags if source == "torchvision" else _timm_tags
    if dot and tag not in tags(architecture):
        error = _unknown_tag(architecture, tag, [source])
        other: Literal["torchvision", "timm"] = "timm" if source == "torchvision" else "torchvision"
        try:
            _registry_spec(other, name, kwargs)
        except ModelSpecError:
            raise error from None
        raise ModelSpecError(f"{error}; {other} has it: {other}:{name}") from None
    return ModelSpec(source, name, kwargs)


def parse_spec(text: str, kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
    """Resolve a spec string to a ModelSpec (bare names: torchvision first, then timm; a bare
    name with a tag goes to the registry that knows the tag)."""
    kwargs = dict(kwargs or {})
    text = text.strip()
    if not text:
        raise ModelSpecError("empty model spec; pass a name such as resnet50")
    if text.startswith("timm:" + HF_HUB_PREFIX):
        text = text.removeprefix("timm:")
    if text.startswith(HF_HUB_PREFIX):
        if not _HUB_NAME.match(text):
            raise ModelSpecError(
                f"bad hub name {text!r}; write hf-hub:ORG/NAME, e.g. hf-hub:timm/resnet50.a1_in1k"
            )
        return ModelSpec("timm", text, kwargs)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("torchvision", "timm"):
        return _registry_spec(prefix, rest, kwargs)  # type: ignore[arg-type]
    if sep:
        if not prefix or not rest.isidentifier():
            raise ModelSpecError(
                f"bad import spec {text!r}; write package.module:factory, e.g. mypkg.nets:build"
            )
        return ModelSpec("import", text, kwargs)
    architecture, dot, tag = text.partition(".")
    in_torchvision = architecture in _torchvision_names()
    if in_torchvision and (not dot or tag in _torchvision_tags(architecture)):
        return ModelSpec("torchvision", text, kwargs)
    in_timm = architecture in _timm_names()  # imports timm: only once torchvision said no
    if in_timm and (not dot or tag in _timm_tags(architecture)):
        return ModelSpec("timm", text, kwargs)
    if dot and (in_torchvision or in_timm):
        raise _unknown_tag(architecture, tag, ["torchvision", "timm"])
    raise ModelSpecError(f"unknown model {text!r} (not in torchvision or timm){_suggest(text)}")


def _with_tag(text: str, tag: str) -> str:
    """The spec text with `--pretrained TAG` folded in (`resnet50` + `a1_in1k`)."""
    spec = text.strip()
    if spec.startswith((HF_HUB_PREFIX, "timm:" + HF_HUB_PREFIX)):
        raise UsageError(
            Argument("pretrained", tag),
            f": a hub name ({spec}) carries its own weights; pass ",
            Argument("pretrained", True),
            " without a tag",
        )
    prefix, sep, rest = spec.partition(":")
    if sep and prefix not in ("torchvision", "timm"):
        raise UsageError(
            Argument("pretrained", tag),
            f": {spec} is a user factory with no library weights; pass ",
            _WEIGHTS_FILE,
            " instead",
        )
    name = rest if sep else spec
    _, dot, own = name.partition(".")
    if dot and own != tag:
        raise UsageError(
            f"the model spec {spec} names the tag {own!r} and ",
            Argument("pretrained"),
            f" names {tag!r}; give the tag once",
        )
    return spec if dot else f"{spec}.{tag}"


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """Parse `key=value` strings; values are YAML scalars (`3`, `0.5`, `true`, `[1, 2]`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(
                "bad ", Argument("kwargs", item), "; write key=value, e.g. num_classes=10"
            )
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
            "bad ",
            Argument("input_size", text),
            "; write channels x height x width, e.g. 3x224x224",
        ) from None
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise UsageError(
            "bad ", Argument("input_size", text), ": need 2 to 4 positive sizes, e.g. 3x224x224"
        )
    if len(dims) > 4:
        raise UsageError("bad ", Argument("input_size", text), ": at most 4 sizes (C x T x H x W)")
    return dims


def _torchvision_weights(spec: ModelSpec) -> Any:
    """The weights enum member the spec names (its tag, else DEFAULT)."""
    from torchvision.models import get_model_weights

    return get_model_weights(spec.architecture)[spec.tag or DEFAULT_TAG]


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
        try:
            weights = _torchvision_weights(spec)
            crop = weights.transforms().crop_size
            if task == "video":
                # MViT and S3D need 224-px crops and at least 14-16 frames; ResNet3Ds use 112
                frames = max(16, int(weights.meta.get("min_temporal_size", 16)))
                return (3, frames, int(crop[0]), int(crop[-1]))
            return (3, int(crop[0]), int(crop[-1]))
        except (ValueError, AttributeError, TypeError, KeyError):
            pass
    return _DEFAULT_SIZES[task]


def _build_torchvision(spec: ModelSpec, task: Task, pretrained: bool) -> nn.Module:
    from torchvision.models import get_model

    kwargs = dict(spec.kwargs)
    kwargs.setdefault("weights", _torchvision_weights(spec) if pretrained else None)
    if task in ("detection", "segmentation"):
        kwargs.setdefault("weights_backbone", DEFAULT_TAG if pretrained else None)
    if task == "quantization":
        kwargs.setdefault("quantize", False)
    return get_model(spec.architecture, **kwargs)


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
    if spec.source == "torchvision":
        return _torchvision_names()[spec.architecture]
    return "classification"


def _build(spec: ModelSpec, task: Task, pretrained: bool) -> nn.Module:
    if spec.source == "torchvision":
        return _build_torchvision(spec, task, pretrained)
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.name, pretrained=pretrained, **spec.kwargs)
    if pretrained:
        raise UsageError(
            Argument("pretrained"),
            f": {spec.name} is a user factory with no library weights; pass ",
            _WEIGHTS_FILE,
            " instead",
        )
    return _build_import(spec)


def build_model(
    spec: ModelSpec, *, pretrained: bool = False, weights: Path | None = None, seed: int = 0
) -> LoadedModel:
    """Build the model, load `weights` if given, eval mode.

    The initialisation is seeded with `seed` (the caller's random state is left as it was), so
    the same spec and seed give the same model; `pretrained` then loads the weights the spec's
    tag names (the library's default without one) from its cache or the network."""
    task = _task(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(spec, task, pretrained)
    except TypeError as exc:
        raise ModelSpecError(
            f"cannot build {spec.text} with {dict(spec.kwargs)}: {exc}; check the names in ",
            Argument("kwargs"),
        ) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        raise _fetch_error(spec, pretrained, exc) from exc
    record: dict[str, Any] = {"kind": "random", "seed": seed}
    if pretrained:
        record = _pretrained_record(spec, model)
    if weights is not None:
        from surgeon.checkpoint.files import sha256_file
        from surgeon.checkpoint.weights import check_state_dict_fits, load_weights_file

        state = load_weights_file(weights)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_state_dict_fits(expected, state, source=weights)
        load_state(model, state)
        path = Path(weights).resolve()
        record = {"kind": "file", "path": str(path), "sha256": sha256_file(path)}
    model.eval()
    return LoadedModel(model, spec, task, _default_input_size(spec, task, model), record)


# --- pretrained weights: which cache file, and why a fetch failed ---------------------------


def _torch_hub_file(url: str) -> Path:
    """Where torch hub keeps the download of `url` (`$TORCH_HOME/hub/checkpoints/NAME`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _hf_cache_dir(repo_id: str) -> Path:
    """The Hugging Face hub's cache folder of a model repository (under `$HF_HOME/hub`)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _timm_cache_file(cfg: Mapping[str, Any]) -> Path | None:
    """The cached file timm loaded for a pretrained config: the hub's copy when the config names
    a hub repository (timm prefers it, safetensors first), else torch hub's download."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(hub_id).partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        for name in names or ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        return _torch_hub_file(str(cfg["url"]))
    return Path(cfg["file"]) if cfg.get("file") else None


def _pretrained_record(spec: ModelSpec, model: nn.Module) -> dict[str, Any]:
    if spec.source == "torchvision":
        enum = _torchvision_weights(spec)
        name = str(enum)  # ResNet50_Weights.IMAGENET1K_V2: what DEFAULT resolved to
        file: Path | None = _torch_hub_file(enum.url)
    else:
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        name = spec.name
        if not spec.hub and cfg.get("tag"):
            name = f"{cfg.get('architecture') or spec.architecture}.{cfg['tag']}"
        file = _timm_cache_file(cfg)
    if file is None or not file.is_file():
        return {"kind": "pretrained", "name": name, "file": None, "sha256": None}
    from surgeon.checkpoint.files import sha256_file

    return {"kind": "pretrained", "name": name, "file": str(file), "sha256": sha256_file(file)}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _hf_error(exc: BaseException, name: str) -> bool:
    """Whether `exc` is huggingface_hub's error class `name` (the package is timm's)."""
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub is installed with timm, but not required by it
        return False
    cls = getattr(errors, name, None)
    return cls is not None and isinstance(exc, cls)


def _offline_reason(exc: BaseException) -> str | None:
    """Why a fetch failed for want of a network ("no network connection (...)"), else None."""
    hf_offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    for cause in _causes(exc):
        if _hf_error(cause, "OfflineModeIsEnabled") or (
            _hf_error(cause, "LocalEntryNotFoundError") and hf_offline
        ):
            return "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)"
        if isinstance(cause, URLError) and not isinstance(cause, HTTPError):
            return f"no network connection ({cause.reason})"
        if _hf_error(cause, "LocalEntryNotFoundError") or isinstance(
            cause, (ConnectionError, TimeoutError, socket.gaierror)
        ):
            return "no network connection"
    return None


def _cache_location(spec: ModelSpec) -> str:
    """Where the library looks for a cached copy of the spec's weights (or hub config)."""
    try:
        if spec.source == "torchvision":
            return f"at {_torch_hub_file(_torchvision_weights(spec).url)}"
        if spec.hub:
            repo = spec.name.removeprefix(HF_HUB_PREFIX).partition("@")[0]
            return f"in {_hf_cache_dir(repo)}"
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.name)
        if cfg is not None and cfg.hf_hub_id:
            return f"in {_hf_cache_dir(cfg.hf_hub_id.partition('@')[0])}"
        if cfg is not None and isinstance(cfg.url, str) and cfg.url:
            return f"at {_torch_hub_file(cfg.url)}"
    except (ImportError, KeyError, ValueError, RuntimeError):
        pass
    return "in the library's cache"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fetch_error(spec: ModelSpec, pretrained: bool, exc: BaseException) -> Exception:
    """The one-line error for a model that failed to build: offline without a cached copy, a
    hub repository that does not exist, or the library's own complaint."""
    reason = _offline_reason(exc)
    if reason is not None and (pretrained or spec.hub):
        what = "pretrained weights" if pretrained else "the model config"
        fix = "or pass " if not spec.hub else "or name the timm architecture (timm:NAME) with "
        return WeightsError(
            f"cannot fetch {what} for {spec.text}: {reason} and no cached copy "
            f"{_cache_location(spec)}; connect once (downloads are cached) {fix}",
            _WEIGHTS_FILE,
        )
    if spec.hub and any(_hf_error(c, "RepositoryNotFoundError") for c in _causes(exc)):
        return ModelSpecError(
            f"{spec.text} is not a model repository on the Hugging Face hub; check the name, "
            "e.g. hf-hub:timm/resnet50.a1_in1k"
        )
    if pretrained:
        return WeightsError(
            f"could not fetch pretrained weights for {spec.text}: {_first_line(exc)}; "
            "check the internet connection or pass ",
            _WEIGHTS_FILE,
        )
    return ModelSpecError(f"cannot build {spec.text}: {_first_line(exc)}")


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
    pretrained: bool | str = False,
    weights: Path | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Parse a spec string and build the model: the one call the CLI makes.

    `pretrained` is False (seeded random initialisation), True or "DEFAULT" (the weights the
    spec's tag names, else the library's default), or a tag: a torchvision weights enum member
    (`IMAGENET1K_V2`) or a timm pretrained tag (`a1_in1k`)."""
    if isinstance(pretrained, str) and pretrained != DEFAULT_TAG:
        text = _with_tag(text, pretrained)
    spec = parse_spec(text, kwargs)
    return build_model(spec, pretrained=bool(pretrained), weights=weights, seed=seed)


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
