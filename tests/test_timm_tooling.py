"""A patched timm model rebuilt by `surgeon.load` keeps working with timm's own tooling:
forward_features / forward_head / reset_classifier, pretrained_cfg / default_cfg,
`timm.data.resolve_data_config(model=...)` and `timm.data.create_transform(...)`.

Two families (ResNet, EfficientNet), as timm's tiny test configurations, randomly initialised,
checkpoints written by `surgeon patch` at a small input size."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm.data
import torch
from PIL import Image

import surgeon
from tests.clirun import run_cli


@pytest.mark.parametrize(
    ("name", "policy", "family"),
    [
        ("test_resnet.r160_in1k", "antialias", "ResNet"),
        ("test_efficientnet.r160_in1k", "spd", "EfficientNet"),
    ],
)
def test_a_loaded_patched_timm_model_works_with_timms_tooling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, policy: str, family: str
) -> None:
    out = tmp_path / "ck"
    args = ["--policy", policy, "--out", str(out), "--input-size", "3x64x64"]
    code, _, err = run_cli(capsys, "patch", f"timm:{name}", *args)
    assert code == 0, err
    model = surgeon.load(out)
    assert type(model).__name__ == family, "the patched model lost its timm class"
    patched = [m for m in model.modules() if type(m).__module__.startswith("surgeon.layers")]
    assert patched, f"{policy} changed no layer of {name}: the test would prove nothing"

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.allclose(model.forward_head(features), model(x), atol=1e-6)
        pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features)

    assert model.pretrained_cfg["architecture"] == name.partition(".")[0]
    assert model.default_cfg == model.pretrained_cfg
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 160, 160), "the data config no longer comes from the tag"
    transform = timm.data.create_transform(**config)
    image = Image.fromarray(torch.randint(0, 256, (200, 180, 3), dtype=torch.uint8).numpy())
    batch = transform(image).unsqueeze(0)
    assert batch.shape == (1, 3, 160, 160)
    with torch.no_grad():
        assert model(batch).shape == (1, model.num_classes)

    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.forward_head(model.forward_features(x)).shape == (2, 7)
