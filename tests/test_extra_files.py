"""Extra named files in a checkpoint (``save(files=...)``) and the storage link helpers."""

from __future__ import annotations

import os

import pytest
import torch

from ckpt_plugin import CheckpointManager, ConfigurationError, CorruptCheckpointError, StorageError
from ckpt_plugin._io.files import read_bytes_file
from ckpt_plugin._storage import remove_link, set_link, symlinks


def test_extra_files_are_committed_and_checksummed(tmp_path):
    manager = CheckpointManager(tmp_path, keep_best=False)
    info = manager.save(torch.nn.Linear(2, 2), epoch=1, step=4, files={"trainer_state.json": '{"global_step": 4}'})
    listed = manager.latest()
    assert (listed.path / "trainer_state.json").read_text() == '{"global_step": 4}'
    assert listed.files["trainer_state.json"] == info.files["trainer_state.json"]
    assert (
        read_bytes_file(listed.path / "trainer_state.json", listed.files["trainer_state.json"]) == b'{"global_step": 4}'
    )
    (listed.path / "trainer_state.json").write_text('{"global_step": 5}')
    with pytest.raises(CorruptCheckpointError, match="trainer_state.json"):
        read_bytes_file(listed.path / "trainer_state.json", listed.files["trainer_state.json"])
    assert manager.load_latest()["epoch"] == 1


@pytest.mark.parametrize(
    "name", ["metadata.json", "state.json", "model.safetensors", "x.safetensors", "../x", "a/b", ".hidden", ""]
)
def test_bad_extra_file_names_are_refused_before_writing(tmp_path, name):
    manager = CheckpointManager(tmp_path / "run", keep_best=False)
    with pytest.raises(ConfigurationError):
        manager.save(torch.nn.Linear(2, 2), epoch=1, files={name: b"x"})
    assert manager.checkpoints() == []


def test_extra_file_must_be_bytes_or_text(tmp_path):
    with pytest.raises(ConfigurationError, match="bytes or str"):
        CheckpointManager(tmp_path, keep_best=False).save(torch.nn.Linear(2, 2), epoch=1, files={"a.json": {"x": 1}})


def test_links_are_relative_replaced_atomically_and_never_replace_a_directory(tmp_path):
    target_a, target_b = tmp_path / "epoch_1", tmp_path / "epoch_2"
    target_a.mkdir()
    target_b.mkdir()
    set_link(tmp_path / "latest", target_a)
    assert os.readlink(tmp_path / "latest") == "epoch_1"
    set_link(tmp_path / "latest", target_b)
    assert symlinks(tmp_path) == {"latest": target_b}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
    with pytest.raises(StorageError):
        set_link(target_a, target_b)
    assert target_a.is_dir() and not target_a.is_symlink()
    remove_link(tmp_path / "latest")
    remove_link(tmp_path / "latest")
    remove_link(target_a)
    assert symlinks(tmp_path) == {} and target_a.is_dir() and target_b.is_dir()
