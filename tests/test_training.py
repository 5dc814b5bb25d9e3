"""surgeon.training: the engine's schedule, precision, modes, empty batches and state files."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.data import ImageBatch
from surgeon.errors import TrainingError, UsageError
from surgeon.training import (
    STATE_FILE,
    Distributed,
    StepOutput,
    TrainConfig,
    Trainer,
    init_distributed,
    read_state,
    resolve_precision,
    set_train_mode,
)
from tests.heal_fixtures import SIZE, TinyNet

CPU = Distributed(1, 0, 0, torch.device("cpu"), None)


class CrossEntropy:
    def __call__(self, model: nn.Module, batch: ImageBatch) -> StepOutput:
        logits = model(batch.images)
        loss = nn.functional.cross_entropy(logits, batch.labels)
        agree = (logits.argmax(1) == batch.labels).sum()
        return StepOutput(loss, {"loss": loss.detach()}, agree)


def _batch(n: int, seed: int = 0) -> ImageBatch:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return ImageBatch(images, labels, torch.arange(n), ())


def _trainer(**config: object) -> Trainer:
    torch.manual_seed(0)
    options = {"steps": 10, "batch_size": 4, "workers": 0, **config}
    return Trainer(TinyNet(), CrossEntropy(), TrainConfig(**options), CPU, progress=False)  # type: ignore[arg-type]


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero() -> None:
    trainer = _trainer(steps=20, warmup_steps=4, lr=1.0)
    factors = [trainer._lr_factor(step) for step in range(21)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:])), factors
    assert factors[20] == pytest.approx(0.0, abs=1e-12)


def test_precision_is_fp32_on_cpu_unless_asked_and_fp16_needs_cuda() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UsageError, match="fp16 training needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="must be auto, bf16, fp16 or fp32"):
        resolve_precision("fp8", cpu)


def test_alone_without_torchrun_there_is_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist = init_distributed("cpu")
    assert (dist.world_size, dist.rank, dist.backend) == (1, 0, None) and dist.is_main
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE='two' must be an integer"):
        init_distributed("cpu")


def test_freeze_bn_keeps_norms_in_eval_mode_and_the_rest_training() -> None:
    model = TinyNet()
    set_train_mode(model, freeze_bn=True)
    assert model.training and model[0].training
    assert not model[1].training and not model[5].training


def test_a_batch_whose_every_image_failed_still_takes_part_with_weight_zero() -> None:
    """The other processes wait for its gradients: the previous batch runs again, weight 0."""
    trainer = _trainer()
    first = trainer.train_step(_batch(4))
    assert first.images == 4 and first.agree is not None
    empty = ImageBatch(
        torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), (7,)
    )
    stats = trainer.train_step(empty)
    assert stats.images == 0 and stats.failed == (7,) and stats.agree == 0
    with pytest.raises(TrainingError, match="every image of the first batch failed"):
        _trainer().train_step(empty)


def test_state_checkpoints_are_written_whole_and_read_back(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.state_dir = tmp_path
    trainer.train_step(_batch(4))
    trainer.step, trainer.batch_in_epoch = 1, 1
    trainer.save_state(per_epoch=5, extra={"note": 1})
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE], "a temporary file was left"
    state = read_state(tmp_path)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (1, 0, 1)
    assert state["extra"] == {"note": 1}
    again = _trainer()
    again.state_dir = tmp_path
    assert again.load_state() == {"note": 1}
    for key, value in trainer.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read the state checkpoint") as err:
        read_state(tmp_path)
    assert "\n" not in str(err.value)


def test_a_finished_epoch_is_saved_as_the_start_of_the_next(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.state_dir = tmp_path
    trainer.step, trainer.epoch, trainer.batch_in_epoch = 5, 0, 5
    trainer.save_state(per_epoch=5)
    state = read_state(tmp_path)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 0)
