"""The manifest schema: the one description of every field of surgery.json that is read.

`MANIFEST_SCHEMA` maps each field to its expected JSON type (a nested dict is an object whose
fields are all required; other fields anywhere are allowed and kept, for forward compatibility
within a format version); `validate_manifest` checks a manifest against it and raises a
one-line CheckpointError naming the first field that does not fit. docs/checkpoint.md documents
every field listed here.
"""

from __future__ import annotations

import re
import types
from collections.abc import Collection, Mapping
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

from surgeon.errors import CheckpointError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "WEIGHTS_FILE",
    "require_trusted_import",
    "validate_manifest",
]

FORMAT = "surgeon-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "surgery.json"
FIX_MANIFEST = "re-create the checkpoint"

JSONScalar = str | int | float | bool | None
# model kwargs: scalars or flat lists of them (replace_stride_with_dilation=[false, true, true])
JSONKwarg = JSONScalar | list[JSONScalar]

MANIFEST_SCHEMA: dict[str, Any] = {
    "format": Literal["surgeon-checkpoint"],
    "format_version": int,
    "created": str,
    "model": {
        "spec": str,
        "source": Literal["torchvision", "timm", "import"],
        "name": str,
        "kwargs": dict[str, JSONKwarg],
        "input_size": list[int],
    },
    "policy": dict[str, Any],
    "sites": list[dict[str, Any]],
    "decisions": list[dict[str, Any]],
    "versions": dict[str, str],
    "weights": {
        "file": Literal["model.safetensors"],
        "sha256": str,
        "bytes": int,
    },
}

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

    _check_field(manifest, MANIFEST_SCHEMA, "")
    model = manifest["model"]
    if not model["input_size"] or any(n <= 0 for n in model["input_size"]):
        _field_error(
            "model.input_size", "a non-empty list of positive integers", model["input_size"]
        )
    if model["source"] == "import" and not _IMPORT_SPEC.match(model["name"]):
        _field_error("model.name", "an import spec 'pkg.module:factory'", model["name"])
    weights = manifest["weights"]
    if not _SHA256.match(weights["sha256"]):
        _field_error("weights.sha256", "64 lowercase hex digits", weights["sha256"])
    if weights["bytes"] < 0:
        _field_error("weights.bytes", "a size in bytes", weights["bytes"])


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
            f"that code; surgeon imports nothing from a checkpoint on its own: pass "
            f"--trust-import {spec} if you trust it"
        )


def _check_field(value: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        if not isinstance(value, Mapping):
            _field_error(where, "an object", value)
        for key, sub in expected.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                raise CheckpointError(
                    f"{MANIFEST_FILE}: required field '{path}' is missing; {FIX_MANIFEST}"
                )
            _check_field(value[key], sub, path)
        return
    if expected is Any:
        return
    origin, args = get_origin(expected), get_args(expected)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            _field_error(where, "one of " + ", ".join(repr(a) for a in args), value)
    elif origin in (Union, types.UnionType):
        if not any(_matches(value, arg) for arg in args):
            _field_error(where, _describe(expected), value)
    elif origin is list:
        if not isinstance(value, list):
            _field_error(where, _describe(expected), value)
        for i, item in enumerate(value):
            _check_field(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            _field_error(where, _describe(expected), value)
        for key, item in value.items():
            _check_field(item, args[1], f"{where}.{key}")
    elif not _matches(value, expected):
        _field_error(where, _describe(expected), value)


def _matches(value: Any, expected: Any) -> bool:
    if expected is type(None) or expected is None:
        return value is None
    if get_origin(expected) is not None or isinstance(expected, dict):
        try:
            _check_field(value, expected, "")
        except CheckpointError:
            return False
        return True
    if expected is int:
        return _is_int(value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def _field_error(where: str, expected: str, value: Any) -> NoReturn:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise CheckpointError(
        f"{MANIFEST_FILE}: field '{where}' must be {expected}, got {type(value).__name__} "
        f"{shown}; {FIX_MANIFEST}"
    )
