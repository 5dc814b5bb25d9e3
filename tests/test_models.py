"""Model specs resolve to the right registry, and bad specs fail with one helpful line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.errors import ModelSpecError, UsageError, WeightsError
from surgeon.models import example_inputs, load_model, parse_input_size, parse_kwargs, parse_spec


def build_tiny(width: int = 4) -> nn.Module:
    """A user factory for the import-spec tests."""
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())


def not_a_module() -> int:
    return 3


def test_bare_name_prefers_torchvision_then_timm() -> None:
    assert parse_spec("resnet50").source == "torchvision"
    assert parse_spec("resnet50d").source == "timm"
    assert parse_spec("timm:resnet50").source == "timm"


def test_unknown_model_suggests_close_names_from_both_registries() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown model 'resnet5'.*did you mean.*resnet50"):
        parse_spec("resnet5")
    with pytest.raises(ModelSpecError, match="unknown timm model"):
        parse_spec("timm:not_a_model_xyz")


def test_import_spec_builds_a_user_factory_with_kwargs() -> None:
    loaded = load_model("tests.test_models:build_tiny", kwargs={"width": 6})
    assert loaded.spec.source == "import"
    assert isinstance(loaded.model, nn.Sequential) and loaded.model[0].out_channels == 6


def test_import_spec_errors_are_one_line() -> None:
    with pytest.raises(ModelSpecError, match=r"cannot import 'no_such_pkg_xyz\.mod'"):
        load_model("no_such_pkg_xyz.mod:build")
    with pytest.raises(ModelSpecError, match=r"not a torch\.nn\.Module"):
        load_model("tests.test_models:not_a_module")
    with pytest.raises(ModelSpecError, match="has no callable 'missing'"):
        load_model("tests.test_models:missing")


def test_bad_model_kwarg_names_the_kwarg() -> None:
    with pytest.raises(ModelSpecError, match="check the names in kwargs"):
        load_model("resnet18", kwargs={"no_such_kwarg": 1})
    with pytest.raises(UsageError, match="key=value"):
        parse_kwargs(["num_classes"])


def test_kwargs_are_parsed_as_yaml_scalars() -> None:
    assert parse_kwargs(
        ["num_classes=10", "flag=true", "rate=0.5", "dil=[false, true]", "s=x"]
    ) == {
        "num_classes": 10,
        "flag": True,
        "rate": 0.5,
        "dil": [False, True],
        "s": "x",
    }


@pytest.mark.parametrize("text", ["3x0x224", "3xax224", "", "224", "1x2x3x4x5", "-3x4x4"])
def test_bad_input_size_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="bad input_size="):
        parse_input_size(text)


def test_input_size_parses() -> None:
    assert parse_input_size("3x225x225") == (3, 225, 225)
    assert parse_input_size("3x16x112x112") == (3, 16, 112, 112)


def test_default_input_sizes_come_from_metadata() -> None:
    assert load_model("inception_v3", kwargs={"init_weights": False}).input_size == (3, 299, 299)
    assert load_model("timm:resnet18").input_size == (3, 224, 224)


def test_detection_models_build_without_weights_and_take_image_lists() -> None:
    loaded = load_model("ssdlite320_mobilenet_v3_large")
    assert loaded.task == "detection" and loaded.weights == {"kind": "random", "seed": 0}
    (images,) = example_inputs(loaded.task, (3, 64, 64))
    assert isinstance(images, list) and images[0].shape == (3, 64, 64)


def test_weights_file_is_loaded_and_checked(tmp_path: Path) -> None:
    source = load_model("resnet18").model
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model("resnet18", weights=path)
    assert torch.equal(loaded.model.conv1.weight, source.conv1.weight)
    with pytest.raises(WeightsError, match="another architecture"):
        load_model("resnet34", weights=path)


def test_pretrained_offline_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.hub

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        WeightsError, match="could not fetch pretrained weights for torchvision:resnet18"
    ):
        load_model("resnet18", pretrained=True)


def test_timm_pretrained_tags_resolve_and_set_the_input_size() -> None:
    assert parse_spec("resnet50.a1_in1k") == parse_spec("timm:resnet50.a1_in1k")
    assert parse_spec("resnet50.a1_in1k").source == "timm"
    tagged = load_model("timm:convnext_tiny.fb_in22k_ft_in1k_384")
    assert tagged.input_size == (3, 384, 384), "the tag's pretrained_cfg sets the input size"
    assert tagged.spec.architecture == "convnext_tiny"
    assert tagged.spec.tag == "fb_in22k_ft_in1k_384"


def test_torchvision_weights_enum_names_resolve() -> None:
    spec = parse_spec("torchvision:resnet50.IMAGENET1K_V2")
    assert (spec.source, spec.architecture) == ("torchvision", "resnet50")
    assert spec.tag == "IMAGENET1K_V2"
    assert parse_spec("resnet50.IMAGENET1K_V1").source == "torchvision"
    assert parse_spec("resnet50").tag is None


def test_unknown_tags_list_the_tags_each_registry_has() -> None:
    with pytest.raises(
        ModelSpecError, match=r"unknown pretrained tag 'IMAGENET1K_V9'.*IMAGENET1K_V2.*a1_in1k"
    ):
        parse_spec("resnet50.IMAGENET1K_V9")
    with pytest.raises(ModelSpecError, match=r"timm has it: timm:resnet50\.a1_in1k"):
        parse_spec("torchvision:resnet50.a1_in1k")


def test_hub_names_go_to_timm_not_to_the_import_parser() -> None:
    spec = parse_spec("hf-hub:timm/resnet50.a1_in1k")
    assert (spec.source, spec.name, spec.text) == (
        "timm",
        "hf-hub:timm/resnet50.a1_in1k",
        "hf-hub:timm/resnet50.a1_in1k",
    )
    assert spec.hub and spec.tag is None
    assert parse_spec("timm:hf-hub:timm/resnet50.a1_in1k") == spec
    with pytest.raises(ModelSpecError, match=r"bad hub name.*hf-hub:ORG/NAME"):
        parse_spec("hf-hub:resnet50")


def test_pretrained_tag_folds_into_the_spec_and_conflicts_are_refused() -> None:
    with pytest.raises(UsageError, match="names the tag 'a1_in1k' and pretrained names 'b"):
        load_model("resnet50.a1_in1k", pretrained="b1k_in1k")
    with pytest.raises(UsageError, match=r"hub name .* carries its own weights"):
        load_model("hf-hub:timm/resnet50.a1_in1k", pretrained="a1_in1k")
    with pytest.raises(UsageError, match="user factory with no library weights"):
        load_model("tests.test_models:build_tiny", pretrained=True)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = load_model("resnet18", seed=3)
    assert torch.equal(torch.get_rng_state(), state), "building a model moved the global RNG"
    b = load_model("resnet18", seed=3)
    c = load_model("resnet18", seed=4)
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight), "same seed, other weights"
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight), "seed had no effect"
    assert a.weights == {"kind": "random", "seed": 3}


def test_weights_file_is_recorded_with_its_path_and_sha256(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "w.pt"
    torch.save(load_model("resnet18", seed=1).model.state_dict(), path)
    loaded = load_model("resnet18", weights=tmp_path / ".." / tmp_path.name / "w.pt")
    assert loaded.weights == {
        "kind": "file",
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def test_a_torchvision_name_resolves_without_importing_timm() -> None:
    """timm costs most of a second to import: a torchvision model's CLI run must not pay it."""
    code = (
        "import sys; from surgeon.models import parse_spec; "
        "assert parse_spec('resnet18').source == 'torchvision'; "
        "assert 'timm' not in sys.modules, 'timm imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
