"""Patched checkpoints on disk: the manifest schema, atomic writes, reads, user weights files.

`surgeon.checkpoint.manifest` describes surgery.json, `atomic` writes directories and files so
that a crash never leaves a half-written one, `files` writes and reads checkpoint directories,
and `weights` reads users' weights files.
"""

from surgeon.checkpoint.files import (
    check_writable,
    read_checkpoint,
    read_manifest,
    sha256_file,
    write_checkpoint,
)
from surgeon.checkpoint.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    WEIGHTS_FILE,
    require_trusted_import,
    validate_manifest,
)
from surgeon.checkpoint.weights import WEIGHTS_SUFFIXES, check_state_dict_fits, load_weights_file

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "WEIGHTS_FILE",
    "WEIGHTS_SUFFIXES",
    "check_state_dict_fits",
    "check_writable",
    "load_weights_file",
    "read_checkpoint",
    "read_manifest",
    "require_trusted_import",
    "sha256_file",
    "validate_manifest",
    "write_checkpoint",
]
