"""Sharded checkpoints with a local tier: two FSDP2 ranks over gloo on the CPU commit each save in
``local_dir``, upload their own shards to the durable tier, and a new machine restores from it."""

from __future__ import annotations

import pytest

from ckpt_plugin import CheckpointManager
from sharded_workers import launch


@pytest.fixture(scope="module")
def saved_tiered(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded-tiered")
    launch("tiered_save", 2, directory)
    return directory


@pytest.mark.parametrize("world", [1, 2])
def test_a_new_machine_restores_a_sharded_tiered_run_from_the_durable_tier(saved_tiered, world):
    launch("tiered_restore", world, saved_tiered)


def test_a_sharded_upload_killed_midway_is_resumed_by_the_coordinators_next_manager(tmp_path):
    with pytest.raises(Exception, match="signal|exit"):
        launch("tiered_killed", 2, tmp_path)
    durable = tmp_path / "durable"
    assert sorted(path.name for path in durable.iterdir() if not path.name.startswith(".")) == ["epoch_1"]
    manager = CheckpointManager(durable, local_dir=tmp_path / "local-r0")
    assert [info.name for info in manager.pending_uploads()] == ["epoch_2"]
    manager.wait()
    assert manager.pending_uploads() == []
    assert sorted(path.name for path in durable.iterdir() if not path.name.startswith(".")) == ["epoch_1", "epoch_2"]
    assert sorted(path.name for path in (durable / "epoch_2").iterdir()) == sorted([*manager.latest().files, "metadata.json"])
    launch("tiered_restore", 2, tmp_path, arguments=("2",))
