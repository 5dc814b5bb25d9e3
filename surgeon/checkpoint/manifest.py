"""The manifest schema: the one description of every field of surgery.json that is read.

`MANIFEST_SCHEMA` (format version 2) and `MANIFEST_SCHEMA_V1` (version 1, still read) describe
each field: a Python type (`str`, `int`, `list[int]`, `dict[str, Any]`, a `Literal`, a union)
for plain values, `Obj` for an object (its fields required unless named optional), `ListOf`
for a list of objects, `Tagged` for an object whose `kind` (or `op`) picks its fields. Fields
not described are allowed and kept (forward compatibility within a format version).
`validate_manifest` checks a manifest against the schema of its version and raises a one-line
CheckpointError naming the first field that does not fit (`history[0].edits[3].path`).
docs/checkpoint.md documents every field listed here (a test checks it).
"""

from __future__ import annotations

import re
import types
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

from surgeon.errors import Argument, CheckpointError

__all__ = [
    "FIX_MANIFEST",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "MANIFEST_SCHEMA_V1",
    "WEIGHTS_FILE",
    "ListOf",
    "Obj",
    "Summary",
    "Tagged",
    "field_error",
    "policy_name",
    "require_trusted_import",
    "schema_paths",
    "summarize",
    "validate_manifest",
]

FORMAT = "surgeon-checkpoint"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "surgery.json"
FIX_MANIFEST = "re-create the checkpoint"


@dataclass(frozen=True)
class Obj:
    """A JSON object: `fields` by name (all required except those in `optional`)."""

    fields: Mapping[str, Any] = field(hash=False)
    optional: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ListOf:
    """A JSON list whose items are each described by `item` (an Obj or Tagged)."""

    item: Any


@dataclass(frozen=True)
class Tagged:
    """A JSON object whose field `tag` names which of `kinds` describes the rest."""

    tag: str
    kinds: Mapping[str, Obj] = field(hash=False)


JSONScalar = str | int | float | bool | None
# model kwargs: scalars or flat lists of them (replace_stride_with_dilation=[false, true, true])
JSONKwarg = JSONScalar | list[JSONScalar]
# a registered layer: {"type": NAME, "args": {...}} or {"type": "Sequential", "children": [...]};
# its arguments are checked against the layer registry when the edit is rebuilt
LAYER_SPEC = Obj({"type": str}, frozenset())

_WEIGHTS_FILE = Obj({"file": Literal["model.safetensors"], "sha256": str, "bytes": int})

EDIT_OP = Tagged(
    "op",
    {
        "replace": Obj({"path": str, "module": LAYER_SPEC}),
        "wrap": Obj({"path": str, "before": ListOf(LAYER_SPEC), "after": ListOf(LAYER_SPEC)}),
        "set_attrs": Obj({"path": str, "attrs": dict[str, list[int] | str]}),
        "replace_call": Obj(
            {
                "owner": str,
                "function": str,
                "index": int,
                "attr": str,
                "module": LAYER_SPEC,
                "keywords": list[str],
            },
            frozenset({"keywords"}),
        ),
        "link": Obj({"leader": str, "followers": list[str]}),
    },
)

# what a fold made of a unit (surgeon.fold): unchanged, one of its folds, or a BlurPool form
FOLD_FORM = Literal["kept", "folded", "interior", "gather", "pad", "separable", "conv"]

SOURCE_WEIGHTS = Tagged(
    "kind",
    {
        "random": Obj({"seed": int}),
        "file": Obj({"path": str, "sha256": str}),
        "pretrained": Obj({"name": str, "file": str, "sha256": str}, frozenset({"file", "sha256"})),
        "unrecorded": Obj({}),
    },
)

_MODEL = {
    "spec": str,
    "source": Literal["torchvision", "timm", "import"],
    "name": str,
    "kwargs": dict[str, JSONKwarg],
    "input_size": list[int],
}

_ENTRY = {"created": str, "versions": dict[str, str]}

HISTORY_ENTRY = Tagged(
    "kind",
    {
        "patch": Obj(
            {
                **_ENTRY,
                "policy": dict[str, Any],
                "plugins": list[str],
                "seed": int,
                "sites": list[dict[str, Any]],
                "decisions": list[dict[str, Any]],
                "rows": list[dict[str, Any]],
                "summary": dict[str, Any],
                "edits": ListOf(EDIT_OP),
            }
        ),
        "fold": Obj(
            {
                **_ENTRY,
                "choose": str,
                "threads": int,
                "backend": Literal["eager", "inductor", "onnxruntime"],
                "layers": ListOf(Obj({"name": str, "form": FOLD_FORM})),
                "edits": ListOf(EDIT_OP),
            },
            frozenset({"backend"}),  # folds recorded before per-backend folding were eager
        ),
        "heal": Obj(
            {
                **_ENTRY,
                "data": Obj(
                    {"images": int, "skipped": int, "sha256": str, "train": int, "holdout": int}
                ),
                "steps": int,
                "epochs": float,
                "batch_size": int,
                "world_size": int,
                "options": dict[str, Any],
                "features": list[str],
                "losses": dict[str, float],
                "teacher": dict[str, float],
                "before": dict[str, float],
                "after": dict[str, float],
                "seconds": float,
                "images_per_s": float,
                "resumed_from": int | None,
            }
        ),
    },
)

MANIFEST_SCHEMA = Obj(
    {
        "format": Literal["surgeon-checkpoint"],
        "format_version": int,
        "created": str,
        "weights": _WEIGHTS_FILE,
        "model": Obj(
            {
                **_MODEL,
                "task": Literal[
                    "classification",
                    "detection",
                    "segmentation",
                    "video",
                    "quantization",
                    "optical_flow",
                ],
                "weights": SOURCE_WEIGHTS,
            }
        ),
        "history": ListOf(HISTORY_ENTRY),
    }
)
"""surgery.json, format version 2: the source model and the edits of every surgery, in order."""

MANIFEST_SCHEMA_V1 = Obj(
    {
        "format": Literal["surgeon-checkpoint"],
        "format_version": int,
        "created": str,
        "model": Obj({**_MODEL, "task": str}, frozenset({"task"})),
        "policy": dict[str, Any],
        "plugins": list[str],
        "seed": int,
        "sites": list[dict[str, Any]],
        "decisions": list[dict[str, Any]],
        "edits": list[dict[str, Any]],
        "versions": dict[str, str],
        "weights": _WEIGHTS_FILE,
        "spd_channel_order": str,
        "fold": Obj({"layers": ListOf(Obj({"name": str, "form": Literal["folded", "kept"]}))}),
    },
    frozenset({"plugins", "seed", "edits", "spd_channel_order", "fold"}),
)
"""surgery.json, format version 1 (read, replayed, and upgraded by `surgeon upgrade`)."""

_IMPORT_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the first field of `manifest` that breaks the schema.

    The format and version are checked first, so a checkpoint from a newer surgeon asks for an
    upgrade instead of reporting a field it cannot know about.
    """
    if not isinstance(manifest, Mapping):
        raise CheckpointError(f"{MANIFEST_FILE} must hold a JSON object; {FIX_MANIFEST}")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{MANIFEST_FILE} is not a surgeon checkpoint manifest "
            f"(format is {manifest.get('format')!r}, expected {FORMAT!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(
            f"{MANIFEST_FILE}: field 'format_version' must be an integer, got {version!r}; "
            f"{FIX_MANIFEST}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"this checkpoint has format_version {version}, newer than this surgeon reads "
            f"({FORMAT_VERSION}); upgrade surgeon (pip install -U surgeon)"
        )
    if version < 1:
        raise CheckpointError(f"{MANIFEST_FILE}: format_version {version} is not valid")
    _check(manifest, MANIFEST_SCHEMA if version == 2 else MANIFEST_SCHEMA_V1, "")
    model = manifest["model"]
    if not model["input_size"] or any(n <= 0 for n in model["input_size"]):
        field_error(
            "model.input_size", "a non-empty list of positive integers", model["input_size"]
        )
    if model["source"] == "import" and not _IMPORT_SPEC.match(model["name"]):
        field_error("model.name", "an import spec 'pkg.module:factory'", model["name"])
    weights = manifest["weights"]
    if not _SHA256.match(weights["sha256"]):
        field_error("weights.sha256", "64 lowercase hex digits", weights["sha256"])
    if weights["bytes"] < 0:
        field_error("weights.bytes", "a size in bytes", weights["bytes"])


def require_trusted_import(manifest: Mapping[str, Any], allowed: Collection[str]) -> None:
    """Raise CheckpointError if rebuilding the model would import code the user did not name.

    For `model.source == "import"` the factory `model.name` ("pkg.mod:fn") must be in
    `allowed` (what the user passed with `--trust-import`); other sources import nothing.
    """
    model = manifest.get("model")
    if not isinstance(model, Mapping) or model.get("source") != "import":
        return
    spec = model.get("name")
    if spec not in allowed:
        raise CheckpointError(
            f"this checkpoint rebuilds its model by importing and calling {spec!r}, which runs "
            "that code; surgeon imports nothing from a checkpoint on its own: pass ",
            Argument("trust_import", spec, many=True),
            " if you trust it",
        )


def schema_paths(schema: Any, prefix: str = "") -> Iterator[str]:
    """Every field path a schema describes (`model.weights.seed`, `history[].edits[].path`):
    what docs/checkpoint.md must document."""
    if isinstance(schema, Obj):
        for key, sub in schema.fields.items():
            yield prefix + key
            yield from schema_paths(sub, f"{prefix}{key}.")
    elif isinstance(schema, ListOf):
        yield from schema_paths(schema.item, prefix.removesuffix(".") + "[].")
    elif isinstance(schema, Tagged):
        yield prefix + schema.tag
        for kind in schema.kinds.values():
            yield from schema_paths(kind, prefix)


def _check(value: Any, expected: Any, where: str) -> None:
    if isinstance(expected, Obj):
        if not isinstance(value, Mapping):
            field_error(where, "an object", value)
        for key, sub in expected.fields.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                if key in expected.optional:
                    continue
                raise CheckpointError(
                    f"{MANIFEST_FILE}: required field '{path}' is missing; {FIX_MANIFEST}"
                )
            _check(value[key], sub, path)
        return
    if isinstance(expected, ListOf):
        if not isinstance(value, list):
            field_error(where, "a list of objects", value)
        for i, item in enumerate(value):
            _check(item, expected.item, f"{where}[{i}]")
        return
    if isinstance(expected, Tagged):
        if not isinstance(value, Mapping):
            field_error(where, "an object", value)
        tag = value.get(expected.tag)
        kind = expected.kinds.get(tag) if isinstance(tag, str) else None
        if kind is None:
            kinds = ", ".join(repr(k) for k in expected.kinds)
            field_error(f"{where}.{expected.tag}", f"one of {kinds}", tag)
        _check(value, kind, where)
        return
    if expected is Any:
        return
    origin, args = get_origin(expected), get_args(expected)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            field_error(where, "one of " + ", ".join(repr(a) for a in args), value)
    elif origin in (Union, types.UnionType):
        if not any(_matches(value, arg) for arg in args):
            field_error(where, _describe(expected), value)
    elif origin is list:
        if not isinstance(value, list):
            field_error(where, _describe(expected), value)
        for i, item in enumerate(value):
            _check(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            field_error(where, _describe(expected), value)
        for key, item in value.items():
            _check(item, args[1], f"{where}.{key}")
    elif not _matches(value, expected):
        field_error(where, _describe(expected), value)


def _matches(value: Any, expected: Any) -> bool:
    if expected is type(None) or expected is None:
        return value is None
    if get_origin(expected) is not None or isinstance(expected, (Obj, ListOf, Tagged)):
        try:
            _check(value, expected, "")
        except CheckpointError:
            return False
        return True
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    origin, args = get_origin(expected), get_args(expected)
    if expected == JSONScalar:
        return "a string, number, true/false or null"
    if expected == JSONKwarg:
        return "a string, number, true/false, null or a list of those"
    if expected in names:
        return names[expected]
    if expected is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "an object" if args[1] is Any else f"an object of {_describe(args[1])} values"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return getattr(expected, "__name__", str(expected))


def field_error(where: str, expected: str, value: Any) -> NoReturn:
    """Raise the one-line CheckpointError for field `where` holding the wrong `value`."""
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise CheckpointError(
        f"{MANIFEST_FILE}: field '{where}' must be {expected}, got {type(value).__name__} "
        f"{shown}; {FIX_MANIFEST}"
    )


@dataclass(frozen=True)
class Summary:
    """What a validated manifest of either version says, for `surgeon info`, eval and export:
    the source model and where its weights came from, every surgery in order (`history`; a
    version-1 manifest's recipe as one `patch` entry, and a `fold` entry if it was folded),
    the policies applied (`spd + antialias`) and, of the last patch, its seed, rows and
    totals."""

    format_version: int
    spec: str
    task: str
    input_size: tuple[int, ...]
    kwargs: Mapping[str, Any] = field(hash=False)
    policy: str
    seed: int
    created: str
    versions: Mapping[str, str] = field(hash=False)
    rows: tuple[Mapping[str, Any], ...]
    totals: Mapping[str, Any] = field(hash=False)
    folded: tuple[str, ...]  # layers the last fold rewrote (form other than "kept")
    fold_layers: int  # layers the last fold considered (0: not folded)
    surgeries: tuple[str, ...]  # the kinds of the history entries, in order
    weights: Mapping[str, Any] = field(hash=False)  # the source model's weights record
    history: tuple[Mapping[str, Any], ...] = field(hash=False)


def summarize(manifest: Mapping[str, Any]) -> Summary:
    """The `Summary` of a manifest that `validate_manifest` accepted."""
    model = manifest["model"]
    if manifest["format_version"] == 1:
        history: list[Mapping[str, Any]] = [
            {**manifest, "kind": "patch", "rows": manifest.get("edits", [])}
        ]
        if "fold" in manifest:
            history.append({**manifest["fold"], "kind": "fold"})
    else:
        history = list(manifest["history"])
    patches = [e for e in history if e["kind"] == "patch"]
    patch = patches[-1] if patches else {}
    folds = [e for e in history if e["kind"] == "fold"]
    layers = folds[-1]["layers"] if folds else []
    return Summary(
        format_version=manifest["format_version"],
        spec=model["spec"],
        task=model.get("task", "classification"),
        input_size=tuple(model["input_size"]),
        kwargs=dict(model["kwargs"]),
        policy=" + ".join(policy_name(e) for e in patches) or "none",
        seed=int(patch.get("seed", 0)),
        created=manifest["created"],
        versions=dict(patch.get("versions", manifest.get("versions", {}))),
        rows=tuple(patch.get("rows", [])),
        totals=dict(patch.get("summary", {})),
        folded=tuple(layer["name"] for layer in layers if layer["form"] != "kept"),
        fold_layers=len(layers),
        surgeries=tuple(e["kind"] for e in history),
        weights=dict(model.get("weights", {"kind": "unrecorded"})),
        history=tuple(history),
    )


def policy_name(entry: Mapping[str, Any]) -> str:
    """The name of the policy a `patch` history entry applied (`custom` when it has none)."""
    return str(entry.get("policy", {}).get("name") or "custom")
