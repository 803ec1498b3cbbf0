"""``load_latest()`` and ``load_best()`` take the next checkpoint when retention deletes the chosen
one while it is being read, instead of failing."""

from __future__ import annotations

import shutil
import threading
import warnings

import pytest
import torch

from ckpt_plugin import CheckpointManager, CheckpointNotFoundError
from ckpt_plugin._storage.faults import inject


def weights(version: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((256, 64), float(version)), "b": torch.arange(7, dtype=torch.float64) + version}


def assert_holds(checkpoint: dict, version: int) -> None:
    for name, tensor in weights(version).items():
        assert torch.equal(checkpoint["model"][name], tensor), (name, version)


def save_versions(directory, versions, losses) -> None:
    manager = CheckpointManager(directory, max_checkpoints=None, save_rng=False)
    for version in versions:
        manager.save(model=weights(version), epoch=version, metrics={"loss": losses[version]}, extra={"version": version})


def delete_on_first_read(manager: CheckpointManager, victim: str) -> list[str]:
    """Delete the checkpoint ``victim`` the first time a tensor file of it is read (as retention would)."""
    deleted: list[str] = []

    def hook(operation: str, key: str) -> None:
        if operation in ("read_range", "read_bytes", "read_all") and victim in key and key.endswith(".safetensors") and not deleted:
            deleted.append(key)
            shutil.rmtree(manager.checkpoint_dir / victim)

    inject(manager, hook=hook)
    return deleted


LOSSES = {0: 0.5, 1: 0.1, 2: 0.3, 3: 0.2}


@pytest.mark.parametrize(
    ("load", "victim", "expected"),
    [("load_latest", "epoch_3", 2), ("load_best", "epoch_1", 3)],
)
def test_a_load_falls_back_when_the_chosen_checkpoint_is_deleted_while_read(tmp_path, load, victim, expected):
    save_versions(tmp_path, range(4), LOSSES)
    manager = CheckpointManager(tmp_path, max_checkpoints=None, metric_for_best="loss", save_rng=False)
    deleted = delete_on_first_read(manager, victim)
    checkpoint = getattr(manager, load)()
    assert deleted, "the seam did not delete the chosen checkpoint"
    assert checkpoint["epoch"] == expected
    assert_holds(checkpoint, expected)


def test_load_latest_returns_none_when_the_only_checkpoint_is_deleted_while_read(tmp_path):
    save_versions(tmp_path, [0], LOSSES)
    manager = CheckpointManager(tmp_path, max_checkpoints=None, save_rng=False)
    delete_on_first_read(manager, "epoch_0")
    assert manager.load_latest() is None


def test_loading_an_epoch_deleted_while_read_still_says_it_is_gone(tmp_path):
    save_versions(tmp_path, range(2), LOSSES)
    manager = CheckpointManager(tmp_path, max_checkpoints=None, save_rng=False)
    delete_on_first_read(manager, "epoch_1")
    with pytest.raises(CheckpointNotFoundError, match="deleted while it was being read"):
        manager.load(1)


@pytest.mark.slow
def test_load_latest_never_fails_beside_a_writer_whose_retention_keeps_one(tmp_path):
    writer = CheckpointManager(tmp_path, max_checkpoints=1, save_rng=False)
    writer.save(model=weights(0), epoch=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def save_in_a_loop() -> None:
        version = 1
        try:
            while not stop.is_set():
                writer.save(model=weights(version), epoch=version)
                version += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=save_in_a_loop, daemon=True)
    thread.start()
    reader = CheckpointManager(tmp_path, max_checkpoints=None, save_rng=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(200):
                checkpoint = reader.load_latest()
                assert checkpoint is not None
                assert_holds(checkpoint, checkpoint["epoch"])
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not errors, errors
