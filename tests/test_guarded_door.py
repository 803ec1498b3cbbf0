"""The guarded door: whatever sits at a file's name in a checkpoint tree (a link to /dev/zero or out
of the run, a FIFO, a file far over its kind's size), a read ends in a CheckpointError naming it
or a warning that skips it, never a hang, a memory blow-up or a read outside the run. One bad
sibling never stops the rest; names that are not exactly ours are never listed nor pruned."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_plugin import ArtifactRegistry, CheckpointManager, CorruptCheckpointError
from ckpt_plugin import _savelog as savelog
from ckpt_plugin._checkpoint import METADATA_FILE, STATE_FILE
from ckpt_plugin.cli import app
from ckpt_plugin._format import limits
from ckpt_plugin._listing import CACHE_FILE
from ckpt_plugin._storage import backend_of, conditional

pytestmark = pytest.mark.timeout(60)  # a FIFO read by today's code blocks forever: fail, never hang


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def fifo(path: Path) -> None:
    os.mkfifo(path)


SPECIAL = {"dev_zero": dev_zero, "fifo": fifo}
"""Things planted in place of a document: endless bytes, and no bytes ever."""


def plant(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


def saved_run(directory: Path, epochs: int = 2) -> CheckpointManager:
    manager = CheckpointManager(directory, max_checkpoints=None)
    for epoch in range(epochs):
        manager.save(torch.nn.Linear(3, 2), epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    return manager


def names(directory: Path) -> list[str]:
    return [info.name for info in CheckpointManager(directory).checkpoints()]


def link_outside(path: Path, outside: Path) -> None:
    """Replace ``path`` with a link to an identical copy of it outside the run."""
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)


# ---------------------------------------------------------------------- one bad sibling


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_sibling_metadata_is_skipped_and_saves_loads_and_retention_go_on(tmp_path, kind):
    directory = tmp_path / "run"
    saved_run(directory)
    plant(directory / "epoch_1" / METADATA_FILE, SPECIAL[kind])
    manager = CheckpointManager(directory, max_checkpoints=1)
    with pytest.warns(UserWarning, match="epoch_1"):
        assert [info.name for info in manager.checkpoints()] == ["epoch_0"]
    manager.save(torch.nn.Linear(3, 2), epoch=2, metrics={"loss": 0.1})
    assert names(directory) == ["epoch_2"]  # epoch_0 pruned; the unreadable sibling is never deleted
    assert (directory / "epoch_1").is_dir()
    assert manager.load_latest()["epoch"] == 2


def test_a_sibling_metadata_linked_outside_the_run_is_not_read(tmp_path):
    directory = tmp_path / "run"
    saved_run(directory)
    link_outside(directory / "epoch_1" / METADATA_FILE, tmp_path / "elsewhere.json")
    with pytest.warns(UserWarning, match="symbolic link"):
        assert names(directory) == ["epoch_0"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_listing_cache_is_ignored(tmp_path, kind):
    directory = tmp_path / "run"
    saved_run(directory)
    cache = directory / CACHE_FILE
    if not cache.exists():
        cache.write_bytes(b"{}")
    plant(cache, SPECIAL[kind])
    assert names(directory) == ["epoch_0", "epoch_1"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_state_json_fails_the_load_with_a_clear_error(tmp_path, kind):
    directory = tmp_path / "run"
    saved_run(directory)
    plant(directory / "epoch_1" / STATE_FILE, SPECIAL[kind])
    with pytest.raises(CorruptCheckpointError, match=r"state\.json"):
        CheckpointManager(directory).load(epoch=1)


@pytest.mark.parametrize("verify", [True, False])
def test_a_state_json_linked_outside_the_run_is_refused(tmp_path, verify):
    directory = tmp_path / "run"
    saved_run(directory)
    link_outside(directory / "epoch_1" / STATE_FILE, tmp_path / "elsewhere.json")
    with pytest.raises(CorruptCheckpointError, match=r"state\.json is a symbolic link"):
        CheckpointManager(directory).load(epoch=1, verify=verify)


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_production_record_is_a_clear_error(tmp_path, kind):
    directory = tmp_path / "run"
    saved_run(directory)
    registry = ArtifactRegistry(directory)
    registry.validate(epoch="latest", version="1.0.0")
    registry.promote("1.0.0")
    record = Path(os.path.realpath(registry.production_dir)) / "model.json"
    plant(record, SPECIAL[kind])
    with pytest.raises(CorruptCheckpointError, match=r"model\.json"):
        ArtifactRegistry(directory).production()
    with pytest.raises(CorruptCheckpointError, match=r"model\.json"):
        ArtifactRegistry(directory).load_production()


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_save_log_is_skipped_by_plot_and_saves(tmp_path, kind):
    pytest.importorskip("matplotlib")
    directory = tmp_path / "run"
    saved_run(directory)
    plant(directory / savelog.LOG_FILE, SPECIAL[kind])
    with pytest.warns(UserWarning, match="skipping the save log"):
        assert savelog.read(directory) == []
    result = CliRunner().invoke(app, ["plot", str(directory), "-o", str(tmp_path / "run.png"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept"] == ["epoch_0", "epoch_1"]
    with pytest.warns(UserWarning, match="save log"):
        CheckpointManager(directory, max_checkpoints=None).save(torch.nn.Linear(3, 2), epoch=2, metrics={"loss": 0.1})
    assert names(directory) == ["epoch_0", "epoch_1", "epoch_2"]


def test_a_save_log_linked_outside_the_run_is_never_written(tmp_path):
    directory = tmp_path / "run"
    saved_run(directory)
    outside = tmp_path / "notes.txt"
    outside.write_bytes(b"mine\n")
    (directory / savelog.LOG_FILE).unlink()
    (directory / savelog.LOG_FILE).symlink_to(outside)
    with pytest.warns(UserWarning, match="symbolic link"):
        CheckpointManager(directory, max_checkpoints=None).save(torch.nn.Linear(3, 2), epoch=2, metrics={"loss": 0.1})
    assert outside.read_bytes() == b"mine\n"


@pytest.mark.parametrize("kind", SPECIAL)
def test_the_cli_lists_a_directory_with_a_special_sibling(tmp_path, kind):
    directory = tmp_path / "run"
    saved_run(directory)
    plant(directory / "epoch_1" / METADATA_FILE, SPECIAL[kind])
    result = CliRunner().invoke(app, ["list", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    assert [entry["name"] for entry in json.loads(result.stdout)["checkpoints"]] == ["epoch_0"]


# ---------------------------------------------------------------------- size caps


def test_a_metadata_json_over_its_cap_is_refused_unread(tmp_path):
    directory = tmp_path / "run"
    saved_run(directory)
    metadata = directory / "epoch_1" / METADATA_FILE
    padded = metadata.read_bytes() + b" " * limits.DOCUMENT_CAPS[METADATA_FILE]  # still valid JSON
    metadata.unlink()
    metadata.write_bytes(padded)
    with pytest.warns(UserWarning, match=rf"over the {limits.DOCUMENT_CAPS[METADATA_FILE]}"):
        assert names(directory) == ["epoch_0"]


def test_an_object_over_its_cap_is_refused_and_one_within_is_read_whole(remote_url):
    backend = backend_of(remote_url)
    key = backend.join(remote_url, "production", "model.json")
    cap = limits.DOCUMENT_CAPS["model.json"]
    for size in (cap + 1, cap + 10):
        backend.fs.pipe_file(backend.path_of(key), b" " * size)
        with pytest.raises(CorruptCheckpointError, match=r"model\.json"):
            backend.read_bytes(key)
        with pytest.raises(CorruptCheckpointError, match=r"model\.json"):
            conditional.read(backend, key)  # the registry's read of its production pointer
    for size in (0, cap):
        backend.fs.pipe_file(backend.path_of(key), b"x" * size)
        assert len(backend.read_bytes(key)) == size
        assert len(conditional.read(backend, key).data) == size


# ---------------------------------------------------------------------- what is still read


def test_hard_linked_files_of_incremental_saves_still_load(tmp_path):
    manager = CheckpointManager(tmp_path, max_checkpoints=None, incremental=True)
    model = torch.nn.Linear(3, 2)
    manager.save(model, epoch=0, metrics={"loss": 1.0})
    manager.save(model, epoch=1, metrics={"loss": 0.5})
    shared = [path for path in (tmp_path / "epoch_1").glob("*.safetensors") if path.stat().st_nlink > 1]
    assert shared, "the incremental save linked no file of the previous one"
    loaded = CheckpointManager(tmp_path).load(epoch=1)
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())


# ---------------------------------------------------------------------- names


NEAR_MISSES = ["epoch_１", "epoch_٣", "epoch_00007", "epoch_1\n", "epoch_-1", "epoch_1 ", "Epoch_1", "epoch_1_step_",
               "epoch_1_step_01"]


def test_names_that_are_not_exactly_ours_are_never_listed_nor_pruned(tmp_path):
    directory = tmp_path / "run"
    saved_run(directory, epochs=1)
    for name in NEAR_MISSES:  # each a whole checkpoint, so only its name can keep it out
        shutil.copytree(directory / "epoch_0", directory / name)
    manager = CheckpointManager(directory, max_checkpoints=1, keep_best=False)
    assert [info.name for info in manager.checkpoints()] == ["epoch_0"]
    for epoch in (1, 2):
        manager.save(torch.nn.Linear(3, 2), epoch=epoch, metrics={"loss": 1.0})
    assert names(directory) == ["epoch_2"]
    assert sorted(entry.name for entry in directory.iterdir() if not entry.name.startswith(".")) == sorted(
        [*NEAR_MISSES, "epoch_2"]
    )
