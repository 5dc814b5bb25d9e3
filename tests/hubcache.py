"""Seed the caches torch hub and the Hugging Face hub read, as each library lays them out.

The test session points `TORCH_HOME` and `HF_HOME` at temporary directories and sets
`HF_HUB_OFFLINE=1` (see conftest.py), so no test reads a developer's caches or the network.
A test writes a weights file of the right architecture (random, seeded) where the library looks:

- torch hub: `$TORCH_HOME/hub/checkpoints/<file name of the weights URL>`;
- Hugging Face hub: `$HF_HOME/hub/models--ORG--NAME/snapshots/REV/FILE` with `refs/main`
  holding REV, which `hf_hub_download` resolves offline.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

__all__ = ["REVISION", "HubCache", "seed_torch_hub", "session_caches"]

REVISION = "0123456789abcdef0123456789abcdef01234567"

_session: list[Path] = []


def session_caches() -> Path:
    """This process's model caches: a temporary directory that `TORCH_HOME` and `HF_HOME` point
    to, with `HF_HUB_OFFLINE=1`; created on the first call, the same one afterwards (conftest
    runs twice when a test imports `tests.conftest`). Call it before huggingface_hub is
    imported: it reads HF_HOME and HF_HUB_OFFLINE once, at import."""
    if not _session:
        root = Path(tempfile.mkdtemp(prefix="surgeon-test-caches-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        os.environ["TORCH_HOME"] = str(root / "torch")
        os.environ["HF_HOME"] = str(root / "huggingface")
        os.environ["HF_HUB_OFFLINE"] = "1"
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            os.environ.pop(name, None)
        _session.append(root)
    return _session[0]


def seed_torch_hub(url: str, state: Mapping[str, Tensor]) -> Path:
    """Save `state` where torch hub keeps the download of `url`; return that path."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), path)
    return path


class HubCache:
    """The session's Hugging Face hub cache (fixed when huggingface_hub is imported); what is
    seeded through it is removed by `remove_seeded`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seeded: list[Path] = []

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def seed(self, repo_id: str, files: Mapping[str, Path]) -> Path:
        """Copy `files` ({name in the repo: local file}) into a snapshot of `repo_id` that
        `refs/main` points to; return the snapshot directory."""
        repo = self.repo_dir(repo_id)
        snapshot = repo / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            shutil.copyfile(source, snapshot / name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(REVISION)
        self._seeded.append(repo)
        return snapshot

    def seed_timm(self, name: str, tmp: Path, *, seed: int = 0) -> tuple[Path, dict[str, Tensor]]:
        """Seed `timm/NAME` (`test_resnet.r160_in1k`) with config.json and model.safetensors of
        a randomly initialised model, as timm's `save_for_hf` writes them; return the snapshot
        and the state dict."""
        import timm
        import timm.models

        torch.manual_seed(seed)
        model = timm.create_model(name)
        export = tmp / f"hf-{name}"
        timm.models.save_for_hf(model, str(export), safe_serialization=True)
        snapshot = self.seed(
            f"timm/{name}",
            {f: export / f for f in ("config.json", "model.safetensors")},
        )
        return snapshot, {k: v.clone() for k, v in model.state_dict().items()}

    def remove_seeded(self) -> None:
        """Remove every repository seeded through this object."""
        for repo in self._seeded:
            shutil.rmtree(repo, ignore_errors=True)
        self._seeded.clear()
