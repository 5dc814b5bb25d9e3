"""Checkpoint directories (atomic writes, checksums, manifest schema) and user weights files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from surgeon.checkpoint import (
    atomic,
    check_state_dict_fits,
    files,
    load_weights_file,
    read_checkpoint,
    require_trusted_import,
    sha256_file,
    validate_manifest,
    write_checkpoint,
)
from surgeon.checkpoint.manifest import MANIFEST_SCHEMA, MANIFEST_SCHEMA_V1, schema_paths
from surgeon.errors import CheckpointError, OutputError, WeightsError

REPO = Path(__file__).resolve().parents[1]
CREATED = "2024-01-02T03:04:05+00:00"


def make_manifest(**overrides: Any) -> dict[str, Any]:
    """A format-version-2 manifest as a caller hands it to write_checkpoint."""
    versions = {"surgeon": "0.1.0", "torch": torch.__version__}
    conv = {"type": "Conv2d", "args": {"in_channels": 3, "out_channels": 8, "kernel_size": [3, 3]}}
    manifest: dict[str, Any] = {
        "created": CREATED,
        "model": {
            "spec": "torchvision:resnet18",
            "source": "torchvision",
            "name": "resnet18",
            "kwargs": {"num_classes": 10, "zero_init_residual": False, "dropout": 0.5},
            "input_size": [1, 3, 32, 32],
            "task": "classification",
            "weights": {"kind": "random", "seed": 0},
        },
        "history": [
            {
                "kind": "patch",
                "created": CREATED,
                "versions": versions,
                "policy": {"rules": [{"match": "conv", "action": "spd"}]},
                "plugins": [],
                "seed": 0,
                "sites": [{"name": "conv1", "op": "conv", "stride": [2, 2]}],
                "decisions": [{"site": "conv1", "action": "spd", "rule": 0}],
                "rows": [{"site": "conv1", "status": "patched"}],
                "summary": {"params_before": 9, "params_after": 9},
                "edits": [
                    {"op": "replace", "path": "conv1", "module": conv},
                    {"op": "wrap", "path": "relu", "before": [], "after": [conv]},
                    {"op": "set_attrs", "path": "maxpool", "attrs": {"stride": [1, 1]}},
                    {
                        "op": "replace_call",
                        "owner": "",
                        "function": "max_pool2d",
                        "index": 0,
                        "attr": "pool",
                        "module": conv,
                    },
                ],
            },
            {
                "kind": "fold",
                "created": CREATED,
                "versions": versions,
                "choose": "folded",
                "threads": 1,
                "layers": [{"name": "conv1", "form": "folded"}],
                "edits": [],
            },
            {
                "kind": "heal",
                "created": CREATED,
                "versions": versions,
                "data": {
                    "images": 100,
                    "skipped": 1,
                    "sha256": "0" * 64,
                    "train": 68,
                    "holdout": 32,
                },
                "steps": 10,
                "epochs": 2.5,
                "batch_size": 4,
                "world_size": 2,
                "options": {"lr": 1e-4, "temperature": 2.0, "labels": False},
                "features": ["layer1"],
                "losses": {"loss": 0.5, "kd": 0.5, "agreement": 0.9},
                "teacher": {"images": 32, "agreement": 1.0},
                "before": {"images": 32, "agreement": 0.5},
                "after": {"images": 32, "agreement": 0.9},
                "seconds": 3.5,
                "images_per_s": 40.0,
                "resumed_from": None,
            },
        ],
    }
    manifest.update(overrides)
    return manifest


def make_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 3, generator=gen)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(8, generator=gen).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.rand(5, generator=gen) > 0.5,
        "head.weight": shared,
        "embed.weight": shared,  # tied weights share storage
        "transposed": torch.randn(3, 5, generator=gen).t(),  # not contiguous
        "empty": torch.empty(0),
    }


def on_disk_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "surgery.json").read_text())


def write_on_disk_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / "surgery.json").write_text(json.dumps(manifest))


def siblings(path: Path) -> list[str]:
    """Hidden temporary or set-aside directories next to `path`."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def dead_pid() -> int:
    command = [sys.executable, "-c", "import os; print(os.getpid())"]
    proc = subprocess.run(command, check=True, capture_output=True, text=True)
    return int(proc.stdout)


# --- writing and reading -------------------------------------------------------------------


def test_round_trip_is_bit_identical_and_keeps_the_manifest(tmp_path: Path) -> None:
    state_dict, manifest = make_state_dict(), make_manifest()
    out = write_checkpoint(tmp_path / "ckpt", state_dict, manifest, {"report.md": "# Report\n"})

    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors",
        "report.md",
        "surgery.json",
    ]
    assert (out / "report.md").read_text() == "# Report\n"
    read_manifest, tensors = read_checkpoint(out)
    assert sorted(tensors) == sorted(state_dict)
    for key, expected in state_dict.items():
        got = tensors[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert torch.equal(got, expected), f"{key} changed in the round trip"
    weights = read_manifest.pop("weights")
    assert read_manifest.pop("format") == "surgeon-checkpoint"
    assert read_manifest.pop("format_version") == 2
    assert read_manifest == manifest
    assert weights == {
        "file": "model.safetensors",
        "sha256": sha256_file(out / "model.safetensors"),
        "bytes": (out / "model.safetensors").stat().st_size,
    }


def test_same_inputs_give_byte_identical_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_checkpoint(tmp_path / name, make_state_dict(), make_manifest(), {"report.md": "x"})
    for file in ("model.safetensors", "surgery.json", "report.md"):
        first, second = (tmp_path / "a" / file).read_bytes(), (tmp_path / "b" / file).read_bytes()
        assert first == second, f"{file} differs between two writes of the same inputs"
    text = (tmp_path / "a" / "surgery.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_created_is_added_when_absent_and_tuples_become_lists(tmp_path: Path) -> None:
    manifest = make_manifest()
    del manifest["created"]
    manifest["model"]["input_size"] = (1, 3, 32, 32)
    read_manifest, _ = read_checkpoint(write_checkpoint(tmp_path / "c", {}, manifest))
    assert read_manifest["created"].endswith("+00:00"), read_manifest["created"]
    assert read_manifest["model"]["input_size"] == [1, 3, 32, 32]


def test_rewriting_a_read_manifest_refreshes_the_weights_record(tmp_path: Path) -> None:
    manifest, _ = read_checkpoint(
        write_checkpoint(tmp_path / "a", {"w": torch.ones(2)}, make_manifest())
    )
    write_checkpoint(tmp_path / "b", {"w": torch.zeros(3)}, manifest)
    _, tensors = read_checkpoint(tmp_path / "b")
    assert torch.equal(tensors["w"], torch.zeros(3))


def test_manifest_is_validated_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape("model.source")):
        write_checkpoint(
            tmp_path / "c", {}, make_manifest(model={**make_manifest()["model"], "source": "hub"})
        )
    with pytest.raises(CheckpointError, match="JSON"):
        write_checkpoint(tmp_path / "c", {}, make_manifest(policy={"path": Path("x")}))
    assert list(tmp_path.iterdir()) == []


def test_non_tensor_state_dict_entry_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="'extra' \\(dict\\): only tensors"):
        write_checkpoint(tmp_path / "c", {"extra": {"a": 1}}, make_manifest())  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name", ["../escape.md", "sub/report.md", "surgery.json", "model.safetensors", ".hidden"]
)
def test_extra_file_names_must_be_plain_and_unreserved(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        write_checkpoint(tmp_path / "c", {}, make_manifest(), {name: "x"})


# --- where a checkpoint may be written -----------------------------------------------------


def test_non_empty_directory_is_refused_without_force(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="exists and is not empty; pass --force to replace it"):
        write_checkpoint(target, {}, make_manifest())
    assert (target / "notes.txt").read_text() == "keep me"
    assert siblings(target) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_force_replaces_an_existing_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    write_checkpoint(target, {"w": torch.ones(2)}, make_manifest(), {"old.md": "old"})
    write_checkpoint(target, {"w": torch.zeros(3)}, make_manifest(), force=True)
    _, tensors = read_checkpoint(target)
    assert torch.equal(tensors["w"], torch.zeros(3))
    assert not (target / "old.md").exists(), "files of the replaced checkpoint survived"
    assert siblings(target) == [], "the replaced checkpoint was left behind"


def test_force_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "home"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match=r"not a surgeon checkpoint .*even with --force"):
        write_checkpoint(target, {}, make_manifest(), force=True)
    assert (target / "thesis.tex").read_text() == "precious"


def test_existing_empty_directory_is_used(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    write_checkpoint(target, {"w": torch.ones(1)}, make_manifest())
    assert read_checkpoint(target)[1]["w"].item() == 1.0


def test_relative_paths_are_written_next_to_their_siblings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert write_checkpoint(Path("ckpt"), {}, make_manifest()) == Path("ckpt")
    monkeypatch.chdir(tmp_path / "ckpt")
    write_checkpoint(Path("."), {"w": torch.ones(1)}, make_manifest(), force=True)
    assert read_checkpoint(tmp_path / "ckpt")[1]["w"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "exp1" / "ckpt"
    write_checkpoint(target, {"w": torch.ones(1)}, make_manifest())
    assert read_checkpoint(target)[1]["w"].item() == 1.0


def test_path_under_a_regular_file_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"file\.txt is a file, not a directory"):
        write_checkpoint(blocker / "sub" / "ckpt", {}, make_manifest())
    with pytest.raises(OutputError, match="exists and is a file"):
        write_checkpoint(blocker, {}, make_manifest(), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_parent_is_an_output_error(tmp_path: Path) -> None:
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            write_checkpoint(parent / "ckpt", {}, make_manifest())
    finally:
        parent.chmod(0o700)
    assert list(parent.iterdir()) == []


def test_disk_full_is_an_output_error_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_half_then_fail(path: Path, data: bytes) -> None:
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(files, "write_file", write_half_then_fail)
    target = tmp_path / "new" / "ckpt"
    with pytest.raises(OutputError, match=r"not enough disk space to write .*ckpt") as info:
        write_checkpoint(target, make_state_dict(), make_manifest())
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == [], "a failed write left files or directories behind"


def test_disk_full_while_replacing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    write_checkpoint(target, {"w": torch.ones(2)}, make_manifest())
    before = sorted((p.name, p.read_bytes()) for p in target.iterdir())

    def fail(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(files, "write_file", fail)
    with pytest.raises(OutputError, match="not enough disk space"):
        write_checkpoint(target, {"w": torch.zeros(2)}, make_manifest(), force=True)
    assert sorted((p.name, p.read_bytes()) for p in target.iterdir()) == before
    assert siblings(target) == []


def test_disk_full_inside_safetensors_is_an_output_error_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the weights are streamed by safetensors' Rust writer, which reports I/O errors its own way
    def full(tensors: dict, path: str, metadata: dict) -> None:
        Path(path).write_bytes(b"partial")
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "new" / "ckpt"
    with pytest.raises(OutputError, match=r"not enough disk space to write .*ckpt"):
        write_checkpoint(target, make_state_dict(), make_manifest())
    assert list(tmp_path.iterdir()) == [], "a failed write left files or directories behind"


_PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from surgeon.checkpoint import read_checkpoint, write_checkpoint
    state = {"w": torch.ones(100 * 2**20)}  # 400 MiB
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_checkpoint(sys.argv[1], state, json.loads(sys.argv[2]))
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    _, loaded = read_checkpoint(sys.argv[1])
    assert torch.equal(loaded["w"], state["w"])
    print(growth)
    """
)


def test_saving_streams_the_weights_without_a_second_copy_in_memory(tmp_path: Path) -> None:
    # a 400 MiB state dict: serialising it to bytes first would double the peak; streaming it
    # to the file (and hashing the file in chunks) adds next to nothing
    command = [sys.executable, "-c", _PEAK, str(tmp_path / "ckpt"), json.dumps(make_manifest())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert int(done.stdout) < 0.25 * 400 * 2**20, done.stdout


# --- crashes -------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from surgeon.checkpoint import write_checkpoint

    # ~200 MB: long enough to be killed in the middle of writing it.
    tensors = {f"layer{i}.weight": torch.full((1 << 20,), float(i)) for i in range(50)}
    write_checkpoint(Path(sys.argv[1]), tensors, json.loads(sys.argv[2]), force=True)
    """
)


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "replacing"])
def test_sigkill_mid_write_leaves_no_partial_checkpoint(tmp_path: Path, previous: bool) -> None:
    target = tmp_path / "ckpt"
    if previous:
        write_checkpoint(target, {"w": torch.arange(4.0)}, make_manifest())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", _WRITER, str(target), json.dumps(make_manifest())]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any((tmp_path / s / "model.safetensors").exists() for s in siblings(target)):
            assert proc.poll() is None, f"writer exited early: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the writer never created its temporary directory"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"

    # Killed while writing its weights (the usual case) the old state must be untouched; a
    # writer descheduled past its rename may already have put a complete new checkpoint there.
    if target.exists() and "layer0.weight" in read_checkpoint(target)[1]:
        assert len(read_checkpoint(target)[1]) == 50, "a partial new checkpoint is in place"
    elif previous:
        _, tensors = read_checkpoint(target)
        assert torch.equal(tensors["w"], torch.arange(4.0)), "the previous checkpoint changed"
        assert siblings(target), "expected the killed writer's temporary directory"
    else:
        assert not target.exists(), "a killed write left a target directory"
        assert siblings(target), "expected the killed writer's temporary directory"

    write_checkpoint(target, {"w": torch.ones(1)}, make_manifest(), force=True)
    assert siblings(target) == [], "the next write did not clean up the killed writer's leftovers"


def test_set_aside_checkpoint_of_a_killed_replace_is_restored(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    write_checkpoint(target, {"w": torch.arange(3.0)}, make_manifest())
    aside = tmp_path / f".ckpt.old-{dead_pid()}-0badc0de"
    target.rename(aside)  # killed between "rename old aside" and "rename new in"

    with pytest.raises(CheckpointError, match=r"does not exist \(an interrupted write left .*old-"):
        read_checkpoint(target)
    with pytest.raises(OutputError, match="exists and is not empty"):
        write_checkpoint(target, {"w": torch.zeros(1)}, make_manifest())
    assert torch.equal(read_checkpoint(target)[1]["w"], torch.arange(3.0))
    assert siblings(target) == []


def test_only_leftovers_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / f".ckpt.tmp-{dead_pid()}-1234abcd"
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-1234abcd"  # our parent is alive
    unrelated = tmp_path / ".ckpt.tmp-notes"
    for path in (stale, live, unrelated):
        path.mkdir()
    write_checkpoint(tmp_path / "ckpt", {}, make_manifest())
    assert siblings(tmp_path / "ckpt") == sorted([live.name, unrelated.name])


# --- reading damaged checkpoints -----------------------------------------------------------


@pytest.fixture
def written(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", make_state_dict(), make_manifest())


TAMPERED = re.escape(
    "model.safetensors does not match the checksum in surgery.json (modified or corrupt); "
    "re-create the checkpoint"
)


def test_flipped_weight_byte_is_detected(written: Path) -> None:
    weights = written / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=TAMPERED):
        read_checkpoint(written)


def test_edited_header_is_detected(written: Path) -> None:
    weights = written / "model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b'"F32"', b'"F16"', 1))
    with pytest.raises(CheckpointError, match=TAMPERED):
        read_checkpoint(written)


def test_truncated_weights_are_detected(written: Path) -> None:
    weights = written / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=TAMPERED):
        read_checkpoint(written)


def test_unparsable_header_with_a_matching_checksum_is_a_checkpoint_error(written: Path) -> None:
    weights = written / "model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b'"F32"', b'"F33"', 1))
    manifest = on_disk_manifest(written)
    manifest["weights"]["sha256"] = sha256_file(weights)
    write_on_disk_manifest(written, manifest)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_checkpoint(written)


def test_missing_pieces_are_named(tmp_path: Path, written: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        read_checkpoint(tmp_path / "nowhere")
    (written / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors is missing")):
        read_checkpoint(written)
    (written / "surgery.json").unlink()
    with pytest.raises(
        CheckpointError, match=re.escape("not a surgeon checkpoint: surgery.json is missing")
    ):
        read_checkpoint(written)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON \\(line 1"), ("[1, 2]", "must hold a JSON object")],
)
def test_unreadable_manifest_is_a_checkpoint_error(written: Path, text: str, message: str) -> None:
    (written / "surgery.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(written)


def test_newer_format_version_asks_for_an_upgrade(written: Path) -> None:
    manifest = on_disk_manifest(written)
    manifest["format_version"] = 3
    del manifest["model"]  # a future format may differ: the version is reported first
    write_on_disk_manifest(written, manifest)
    with pytest.raises(CheckpointError, match=r"format_version 3, newer .*upgrade surgeon"):
        read_checkpoint(written)


def test_other_format_is_not_a_surgeon_checkpoint(written: Path) -> None:
    manifest = on_disk_manifest(written)
    manifest["format"] = "something-else"
    write_on_disk_manifest(written, manifest)
    with pytest.raises(CheckpointError, match="not a surgeon checkpoint manifest"):
        read_checkpoint(written)


def valid_on_disk_manifest() -> dict[str, Any]:
    return {
        **make_manifest(),
        "format": "surgeon-checkpoint",
        "format_version": 2,
        "weights": {"file": "model.safetensors", "sha256": "0" * 64, "bytes": 8},
    }


# required fields of the top level, of `model`, and of the patch entry and its first edit
REQUIRED = [
    *(k for k in ("created", "weights", "model", "history")),
    *(f"model.{k}" for k in ("spec", "source", "name", "kwargs", "input_size", "task", "weights")),
    *(f"history[0].{k}" for k in ("created", "versions", "policy", "seed", "rows", "edits")),
    "history[0].edits[0].path",
    "history[0].edits[0].module",
    "history[0].edits[3].index",
    "history[1].layers",
    "model.weights.seed",
]


def _holder(manifest: dict[str, Any], path: str) -> tuple[Any, str]:
    """The object that holds the last key of `path` (`history[0].edits[1].path`), and the key."""
    *parents, last = path.split(".")
    holder: Any = manifest
    for key in parents:
        name, _, index = key.partition("[")
        holder = holder[name]
        for i in index.rstrip("]").split("]["):
            if i:
                holder = holder[int(i)]
    return holder, last


@pytest.mark.parametrize("path", REQUIRED)
def test_every_missing_field_is_named(path: str) -> None:
    manifest = valid_on_disk_manifest()
    holder, last = _holder(manifest, path)
    del holder[last]
    with pytest.raises(CheckpointError, match=f"required field '{re.escape(path)}' is missing"):
        validate_manifest(manifest)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("format_version", "1", "must be an integer"),
        ("format_version", True, "must be an integer"),
        ("created", 20240102, "'created' must be a string"),
        ("model", "resnet18", "'model' must be an object"),
        ("model.source", "hub", "'model.source' must be one of 'torchvision', 'timm', 'import'"),
        ("model.kwargs", {"layers": [[1, 2]]}, "'model.kwargs.layers' must be a string, number"),
        ("model.kwargs", {"flag": {"nested": 1}}, "'model.kwargs.flag'"),
        ("model.input_size", [1, "3", 32], "'model.input_size\\[1\\]' must be an integer"),
        ("model.input_size", [1, 3.0, 32], "'model.input_size\\[1\\]' must be an integer"),
        ("model.input_size", [], "non-empty list of positive integers"),
        ("model.input_size", [1, 0, 32], "non-empty list of positive integers"),
        ("history[0].policy", [], "'history\\[0\\].policy' must be an object"),
        ("history[0].sites", {}, "'history\\[0\\].sites' must be a list of objects"),
        ("history[0].decisions", ["spd"], "'history\\[0\\].decisions\\[0\\]' must be an object"),
        ("history[0].versions", {"torch": 2}, "'history\\[0\\].versions.torch' must be a string"),
        (
            "history[0].kind",
            "graft",
            "'history\\[0\\].kind' must be one of 'patch', 'fold', 'heal'",
        ),
        ("history[0].edits[0].op", "swap", "'history\\[0\\].edits\\[0\\].op' must be one of"),
        ("history[0].edits[2].attrs", {"stride": 2}, "edits\\[2\\].attrs.stride' must be a list"),
        ("history[0].edits[3].index", "0", "edits\\[3\\].index' must be an integer"),
        ("history[1].layers", [{"name": "a", "form": "x"}], "layers\\[0\\].form' must be one of"),
        ("history", {}, "'history' must be a list of objects"),
        ("model.task", "painting", "'model.task' must be one of"),
        ("model.weights", {"kind": "file", "path": "w.pt"}, "'model.weights.sha256' is missing"),
        ("weights.file", "../../etc/passwd", "'weights.file' must be one of 'model.safetensors'"),
        ("weights.sha256", "abc", "64 lowercase hex digits"),
        ("weights.bytes", -1, "a size in bytes"),
    ],
)
def test_wrong_field_types_are_named(path: str, value: Any, expected: str) -> None:
    manifest = valid_on_disk_manifest()
    holder, last = _holder(manifest, path)
    holder[last] = value
    with pytest.raises(CheckpointError, match=expected):
        validate_manifest(manifest)


def test_unknown_extra_fields_are_allowed() -> None:
    manifest = valid_on_disk_manifest()
    manifest["report"] = {"summary": "ok"}
    manifest["model"]["weights_spec"] = "imagenet"
    validate_manifest(manifest)


# --- import-source models ------------------------------------------------------------------

IMPORT_MODEL = {
    "spec": "never_imported_pkg.models:build",
    "source": "import",
    "name": "never_imported_pkg.models:build",
    "kwargs": {},
    "input_size": [1, 3, 16, 16],
    "task": "classification",
    "weights": {"kind": "random", "seed": 0},
}


def test_import_source_is_refused_unless_trusted(tmp_path: Path) -> None:
    out = write_checkpoint(tmp_path / "c", {}, make_manifest(model=IMPORT_MODEL))
    manifest, _ = read_checkpoint(out)
    assert "never_imported_pkg" not in sys.modules, "reading a checkpoint imported its factory"
    with pytest.raises(
        CheckpointError,
        match=re.escape("pass --trust-import never_imported_pkg.models:build if you trust it"),
    ):
        require_trusted_import(manifest, allowed=[])
    with pytest.raises(CheckpointError, match="importing and calling"):
        require_trusted_import(manifest, allowed=["never_imported_pkg.models:other"])
    require_trusted_import(manifest, allowed=["never_imported_pkg.models:build"])
    require_trusted_import(make_manifest(), allowed=[])  # torchvision imports nothing of yours


def test_import_source_name_must_be_a_factory_spec() -> None:
    manifest = valid_on_disk_manifest()
    manifest["model"] = {**IMPORT_MODEL, "name": "os.system('rm -rf /')"}
    with pytest.raises(CheckpointError, match=re.escape("'model.name' must be an import spec")):
        validate_manifest(manifest)


# --- user weights files --------------------------------------------------------------------


class NotATensor:
    pass


def small_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"fc.weight": torch.randn(2, 3, generator=gen), "fc.bias": torch.randn(2, generator=gen)}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_safetensors_weights_load(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(small_state_dict(), path)
    assert_same(load_weights_file(path), small_state_dict())


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".PT"])
@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torch_weights_load_raw_or_wrapped(tmp_path: Path, suffix: str, wrap: str | None) -> None:
    path = tmp_path / f"w{suffix}"
    obj: Any = small_state_dict() if wrap is None else {wrap: small_state_dict(), "epoch": 3}
    torch.save(obj, path)
    assert_same(load_weights_file(path), small_state_dict())


def test_truncated_pt_is_a_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(small_state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match=re.escape("w.pt is truncated or corrupt")) as info:
        load_weights_file(path)
    assert "\n" not in str(info.value)


def test_truncated_safetensors_is_a_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(small_state_dict(), path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_weights_file(path)


def test_pickled_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({**small_state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(
        WeightsError,
        match=re.escape(
            "contains pickled objects that are not plain tensors; surgeon only loads "
            "weights_only=True files — re-save with torch.save(model.state_dict(), path) "
            "or convert to .safetensors"
        ),
    ):
        load_weights_file(path)


def test_missing_directory_and_unknown_extension_are_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=re.escape("nope.pt does not exist")):
        load_weights_file(tmp_path / "nope.pt")
    with pytest.raises(WeightsError, match="is a directory"):
        load_weights_file(tmp_path)
    npz = tmp_path / "w.npz"
    npz.write_bytes(b"x")
    with pytest.raises(
        WeightsError, match=re.escape("unknown extension '.npz'; surgeon reads .safetensors")
    ):
        load_weights_file(npz)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([torch.ones(1)], "holds no state dict.*found a list"),
        ({"epoch": 3, "w": torch.ones(1)}, '1 entry is not tensors \\("epoch"\\)'),
        ({}, "found an empty dict"),
    ],
)
def test_file_without_a_state_dict_is_a_weights_error(
    tmp_path: Path, obj: Any, message: str
) -> None:
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(WeightsError, match=message):
        load_weights_file(path)


def test_fitting_state_dict_passes() -> None:
    state_dict = small_state_dict()
    check_state_dict_fits({k: v.shape for k, v in state_dict.items()}, state_dict)


def test_mismatched_keys_and_shapes_are_listed_with_counts() -> None:
    expected = {f"layer{i}.weight": (4, 4) for i in range(8)} | {"fc.weight": (10, 4)}
    state_dict = {f"layer{i}.weight": torch.zeros(4, 4) for i in range(1, 8)}
    state_dict |= {"fc.weight": torch.zeros(1000, 4), "classifier.weight": torch.zeros(1)}
    with pytest.raises(WeightsError) as info:
        check_state_dict_fits(expected, state_dict, source="resnet.pt")
    message = str(info.value)
    assert message.startswith(
        "resnet.pt does not fit the model (1 missing key(s), 1 unexpected key(s), "
        "1 shape mismatch(es); the model has 9 keys)."
    ), message
    assert 'Missing key(s) in state_dict: "layer0.weight".' in message
    assert 'Unexpected key(s) in state_dict: "classifier.weight".' in message
    assert '"fc.weight" is (1000, 4) in the file, (10, 4) in the model' in message
    assert "another architecture" in message


def test_long_key_lists_are_cut_at_five() -> None:
    expected = {f"k{i}": (1,) for i in range(12)}
    with pytest.raises(WeightsError, match='"k0", "k1", "k2", "k3", "k4" and 7 more\\.'):
        check_state_dict_fits(expected, {})


def test_data_parallel_prefix_gets_a_hint() -> None:
    state_dict = small_state_dict()
    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    with pytest.raises(WeightsError, match=re.escape("start with 'module.'")):
        check_state_dict_fits({k: v.shape for k, v in state_dict.items()}, prefixed)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_docs_describe_every_manifest_field() -> None:
    docs = (REPO / "docs" / "checkpoint.md").read_text()
    paths = set(schema_paths(MANIFEST_SCHEMA))
    undocumented = sorted(p for p in paths if f"`{p}`" not in docs)
    assert not undocumented, f"docs/checkpoint.md does not describe: {undocumented}"
    old = {p for p in schema_paths(MANIFEST_SCHEMA_V1) if "." not in p and "[" not in p}
    missing = sorted(p for p in old if f"`{p}`" not in docs)
    assert not missing, f"docs/checkpoint.md does not name these version-1 fields: {missing}"


def test_a_version_1_checkpoint_with_channel_major_spd_kernels_loads_converted(
    tmp_path: Path,
) -> None:
    """Version-1 checkpoints written before SPD-Conv of ungrouped convs went phase-major (no
    `spd_channel_order` in surgery.json) hold channel-major kernels: `load` converts them."""
    import warnings

    from surgeon.api import load
    from surgeon.layers.spd import SpaceToDepthConv
    from surgeon.layers.transfer import channel_major_kernel

    source = REPO / "tests" / "data" / "v1" / "tiny-spd"
    trust = ["tests.tiny_models:tiny_resnet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(source, trust_import=trust)
    state = dict(model.state_dict())
    dense = [n for n, m in model.named_modules() if isinstance(m, SpaceToDepthConv)]
    assert dense and all(model.get_submodule(n).phase_major for n in dense)
    for name in dense:
        block = model.get_submodule(name).block
        state[f"{name}.conv.weight"] = channel_major_kernel(state[f"{name}.conv.weight"], block)
    old = tmp_path / "old"
    old.mkdir()
    weights_name = "model.safetensors"
    safetensors.torch.save_file(state, str(old / weights_name), metadata={"format": "pt"})
    manifest = on_disk_manifest(source)
    del manifest["spd_channel_order"]
    weights = old / "model.safetensors"
    manifest["weights"] = {
        "file": "model.safetensors",
        "sha256": sha256_file(weights),
        "bytes": weights.stat().st_size,
    }
    write_on_disk_manifest(old, manifest)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = load(old, trust_import=trust)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
