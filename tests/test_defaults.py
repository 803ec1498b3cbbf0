"""The manager's defaults follow the seed: keep_best is opt-in, and the best is ranked as the checkpoints recorded."""

from __future__ import annotations

import pytest
import torch

from ckpt_plugin import ArtifactRegistry, CheckpointManager, CheckpointNotFoundError

LOSSES = [0.9, 0.8, 0.7, 0.6, 0.1, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]  # the best is epoch 4


def test_the_seeds_first_example_keeps_exactly_the_last_five(tmp_path):
    manager = CheckpointManager(checkpoint_dir=tmp_path, max_checkpoints=5)  # "Keep only last 5"
    assert not manager.keep_best and manager.metric_for_best is None and manager.mode == "min"
    for epoch, loss in enumerate(LOSSES):
        manager.save(model=torch.nn.Linear(2, 2), epoch=epoch, metrics={"loss": loss, "accuracy": 1 - loss})
    assert [info.epoch for info in manager.checkpoints()] == [7, 8, 9, 10, 11]
    assert manager.best().epoch == 7  # by "loss", among what is left
    assert manager.load_best(metric="accuracy", mode="max")["epoch"] == 7


def test_the_seeds_second_example_also_keeps_the_best(tmp_path):
    manager = CheckpointManager(checkpoint_dir=tmp_path, max_checkpoints=5, keep_best=True, metric_for_best="loss")
    for epoch, loss in enumerate(LOSSES):
        manager.save(model=torch.nn.Linear(2, 2), epoch=epoch, metrics={"loss": loss})
    assert [info.epoch for info in manager.checkpoints()] == [4, 7, 8, 9, 10, 11]
    assert CheckpointManager(tmp_path, keep_best=True).metric_for_best == "loss"  # keep_best alone ranks by loss


def test_a_manager_without_a_metric_ranks_by_what_the_checkpoints_recorded(tmp_path):
    writer = CheckpointManager(tmp_path, max_checkpoints=None, metric_for_best="eval_accuracy", mode="max")
    for epoch, loss in enumerate(LOSSES):
        writer.save(torch.nn.Linear(2, 2), epoch=epoch, metrics={"eval_loss": loss, "eval_accuracy": 1 - loss})
    reader = CheckpointManager(tmp_path)  # e.g. in another process, or the hf callback's output_dir
    assert reader.best().epoch == 4 and reader.load_best()["epoch"] == 4
    assert reader.best("eval_loss").epoch == 4  # an explicit metric ranks in the manager's mode, "min"
    assert CheckpointManager(tmp_path, mode="max").best("eval_loss").epoch == 0
    assert ArtifactRegistry(tmp_path).resolve("best").epoch == 4


def test_without_any_recorded_metric_best_ranks_by_loss_or_says_what_was_recorded(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(torch.nn.Linear(2, 2), epoch=0, metrics={"loss": 0.3})
    manager.save(torch.nn.Linear(2, 2), epoch=1, metrics={"loss": 0.2})
    assert manager.best().epoch == 1
    other = CheckpointManager(tmp_path / "other")
    other.save(torch.nn.Linear(2, 2), epoch=0, metrics={"score": 1.0})
    with pytest.raises(CheckpointNotFoundError, match="recorded metrics: score"):
        other.best()
