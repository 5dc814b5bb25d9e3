"""surgeon.data: image folders are indexed, hashed and decoded; bad images are skipped and
counted, and too many of them (or none at all) is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from surgeon.data import (
    DecodeFailure,
    FailureCount,
    ImageDataset,
    Sample,
    SampleKey,
    collate_images,
    index_images,
    split_holdout,
    training_transform,
)
from surgeon.errors import DataError
from surgeon.evaluate import resolve_preprocessing
from tests.heal_fixtures import SIZE, TinyNet, write_images


def test_every_image_format_in_a_folder_tree_is_found(tmp_path: Path) -> None:
    write_images(tmp_path, 3, suffix=".png")
    write_images(tmp_path / "deeper", 2, suffix=".JPG", seed=1)
    write_images(tmp_path, 2, suffix=".webp", seed=2)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    write_images(tmp_path / ".hidden", 1)
    index = index_images(tmp_path)
    assert len(index) == 7, index.files
    assert list(index.files) == sorted(index.files)
    assert index.labels is None and not index.unreadable


def test_an_empty_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images in .*check --data") as err:
        index_images(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        index_images(tmp_path / "missing")


def test_labels_need_class_folders_and_follow_their_sorted_order(tmp_path: Path) -> None:
    write_images(tmp_path, 6, classes=3)
    index = index_images(tmp_path, labels=True)
    assert index.classes == ("c0", "c1", "c2")
    assert index.labels is not None
    folders = [f.split("/")[0] for f in index.files]
    assert [index.classes[label] for label in index.labels] == folders
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(DataError, match="one sub-folder of images per class"):
        index_images(flat, labels=True)


def test_content_hash_changes_with_any_byte_or_name(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 4)
    first = index_images(tmp_path).sha256
    assert index_images(tmp_path).sha256 == first, "the hash is not deterministic"
    other = write_images(tmp_path / "other", 1, seed=5)[0]
    paths[0].write_bytes(other.read_bytes())  # same name, other pixels
    other.unlink()
    other.parent.rmdir()
    changed = index_images(tmp_path).sha256
    assert changed != first
    paths[1].rename(paths[1].with_name("renamed.png"))
    assert index_images(tmp_path).sha256 != changed


def test_a_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    write_images(tmp_path, 150)
    (tmp_path / "part0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    index = index_images(tmp_path)
    assert index.unreadable == ("part0/broken.png",)
    assert len(index) == 150 and index.found == 151


def test_more_than_one_percent_of_corrupt_images_is_an_error(tmp_path: Path) -> None:
    write_images(tmp_path, 98)
    for i in range(2):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"2 of 100 images .* cannot be read.*more than 1%"):
        index_images(tmp_path)


def test_an_image_that_fails_to_decode_later_becomes_a_marker_the_batch_drops(
    tmp_path: Path,
) -> None:
    """A truncated JPEG passes PIL's verify() but fails to decode: the dataset returns a
    marker (a worker never dies), the collate drops it and lists it in `failed`."""
    paths = write_images(tmp_path, 120, suffix=".jpg", size=64)
    data = paths[5].read_bytes()
    paths[5].write_bytes(data[: len(data) // 2])
    index = index_images(tmp_path)
    position = index.files.index(paths[5].relative_to(tmp_path).as_posix())
    prep = resolve_preprocessing(TinyNet(), "", (3, SIZE, SIZE))
    dataset = ImageDataset(index, range(len(index)), prep.transform)
    assert isinstance(dataset[position], DecodeFailure)
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate_images)
    batches = list(loader)
    assert sum(b.images.shape[0] for b in batches) == len(index) - 1
    assert [p for b in batches for p in b.failed] == [position]


def test_decode_failures_past_one_percent_stop_the_run(tmp_path: Path) -> None:
    write_images(tmp_path, 120)
    index = index_images(tmp_path)
    failures = FailureCount(index)
    failures.add([3])
    with pytest.raises(DataError, match="2 of 120 images"):
        failures.add([3, 4])


def test_augmentation_depends_only_on_the_sample_key(tmp_path: Path) -> None:
    write_images(tmp_path, 4)
    index = index_images(tmp_path)
    prep = resolve_preprocessing(TinyNet(), "", (3, SIZE, SIZE))
    dataset = ImageDataset(index, range(4), training_transform(prep))
    first = dataset[SampleKey(1, 0, 0)]
    torch.rand(100)  # the global RNG moves on; the key alone decides
    again = dataset[SampleKey(1, 0, 0)]
    other_epoch = dataset[SampleKey(1, 1, 0)]
    assert isinstance(first, Sample) and isinstance(again, Sample)
    assert isinstance(other_epoch, Sample)
    assert first.image.shape == (3, SIZE, SIZE)
    assert torch.equal(first.image, again.image)
    assert not torch.equal(first.image, other_epoch.image), "epochs share their augmentation"
    state = torch.get_rng_state()
    dataset[SampleKey(2, 0, 0)]
    assert torch.equal(state, torch.get_rng_state()), "decoding disturbed the global RNG"


def test_holdout_split_is_seeded_disjoint_and_never_empty() -> None:
    train, held = split_holdout(10_000, 0.05, seed=3)
    assert len(held) == 500 and len(train) == 9_500
    assert not set(train) & set(held)
    assert split_holdout(10_000, 0.05, seed=3) == (train, held)
    assert len(split_holdout(1000, 0.02, seed=0)[1]) == 32, "at least 32 images"
    assert len(split_holdout(60, 0.02, seed=0)[1]) == 15, "a quarter of a small folder"
    assert len(split_holdout(3, 0.02, seed=0)[1]) == 1
    assert len(split_holdout(10**6, 0.02, seed=0)[1]) == 2000, "at most 2000"
    assert split_holdout(100, 0.0, seed=0)[1] == ()
    with pytest.raises(DataError, match="nothing to train on"):
        split_holdout(1, 0.5, seed=0)
