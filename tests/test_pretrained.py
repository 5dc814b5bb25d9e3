"""`--pretrained` reads the caches torch hub and the Hugging Face hub keep, offline, and says
which file it used; without a network or a cached copy the error is one line.

Each test seeds a cache in a temporary directory with weights it writes (a seeded random model
of the right architecture), placed where the library looks (tests/hubcache.py)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.hub

from surgeon.models import load_model
from tests.clirun import run_cli
from tests.hubcache import HubCache, seed_torch_hub

TV_MODEL = "mobilenet_v3_large"  # small, with two weights enums: IMAGENET1K_V1 and V2 (default)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, and no network: a download attempt fails as offline."""

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch"


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_pretrained_tag_loads_the_torch_hub_cache_file_and_names_it(
    torch_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchvision.models import MobileNet_V3_Large_Weights

    seeded = load_model(TV_MODEL, seed=5).model.state_dict()
    path = seed_torch_hub(MobileNet_V3_Large_Weights.IMAGENET1K_V1.url, seeded)
    assert path.parent == torch_home / "hub" / "checkpoints"

    code, _, err = run_cli(
        capsys, "scan", TV_MODEL, "--pretrained", "IMAGENET1K_V1", "--input-size", "3x64x64"
    )
    assert code == 0, err
    assert f"pretrained weights MobileNet_V3_Large_Weights.IMAGENET1K_V1 from {path}" in err

    loaded = load_model(f"torchvision:{TV_MODEL}.IMAGENET1K_V1", pretrained=True)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in seeded.items()), "not the cached weights"
    assert loaded.weights["file"] == str(path) and len(loaded.weights["sha256"]) == 64


def test_pretrained_alone_is_the_default_weights_and_offline_without_cache_is_one_line(
    torch_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchvision.models import MobileNet_V3_Large_Weights

    # only V1 is cached: `--pretrained` alone wants the default (V2), which is not
    seed_torch_hub(MobileNet_V3_Large_Weights.IMAGENET1K_V1.url, {})
    default_file = Path(MobileNet_V3_Large_Weights.DEFAULT.url).name
    code, stdout, err = run_cli(capsys, "scan", TV_MODEL, "--pretrained", "--input-size", "3x64x64")
    assert code == 1, err
    (line,) = _error_lines(err)
    assert "no network connection" in line
    assert str(torch_home / "hub" / "checkpoints" / default_file) in line
    assert stdout == "", "torch hub's download notice belongs on stderr (stdout may be --json)"


def test_timm_tag_and_hub_name_load_from_the_hugging_face_cache_offline(
    hub_cache: HubCache, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot, seeded = hub_cache.seed_timm("test_resnet.r160_in1k", tmp_path, seed=3)
    cached = snapshot / "model.safetensors"

    code, _, err = run_cli(
        capsys, "scan", "timm:test_resnet.r160_in1k", "--pretrained", "--input-size", "3x64x64"
    )
    assert code == 0, err
    assert f"pretrained weights test_resnet.r160_in1k from {cached}" in err

    # a hub name reads its config from the cache too (input size 160 from it)
    code, _, err = run_cli(capsys, "scan", "hf-hub:timm/test_resnet.r160_in1k", "--pretrained")
    assert code == 0, err
    assert f"pretrained weights hf-hub:timm/test_resnet.r160_in1k from {cached}" in err
    assert "input 3x160x160" in err

    loaded = load_model("hf-hub:timm/test_resnet.r160_in1k", pretrained=True)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in seeded.items()), "not the cached weights"


@pytest.mark.parametrize(
    "args",
    [
        ("hf-hub:timm/test_efficientnet.r160_in1k",),
        ("timm:test_efficientnet.r160_in1k", "--pretrained"),
    ],
    ids=["hub-name", "timm-pretrained"],
)
def test_hugging_face_offline_without_cache_is_one_line_about_the_network(
    hub_cache: HubCache, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    code, stdout, err = run_cli(capsys, "scan", *args, "--input-size", "3x64x64")
    assert code == 1, err
    (line,) = _error_lines(err)
    assert "HF_HUB_OFFLINE=1" in line and "no cached copy" in line, line
    assert str(hub_cache.repo_dir("timm/test_efficientnet.r160_in1k")) in line
    assert "import spec" not in line and stdout == ""


def test_a_model_name_read_as_the_pretrained_tag_gets_a_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(capsys, "scan", "--pretrained", "resnet18")
    assert code == 2
    (line,) = _error_lines(err)
    assert "--pretrained read 'resnet18' as its weights tag" in line
    assert "put the model name before --pretrained" in line
