"""CheckpointManager as users drive it: save, list, load, load_best, provenance and re-saves."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

import ckpt_plugin
from ckpt_plugin import CheckpointInfo, CheckpointManager, CheckpointNotFoundError

from core_helpers import assert_same_tree, hidden_dirs, tiny_training, train_one_step, visible_names

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_manager(directory: Path, **options) -> CheckpointManager:
    options.setdefault("max_checkpoints", None)
    return CheckpointManager(checkpoint_dir=directory, **options)


def quiet_save(manager: CheckpointManager, *args, **kwargs) -> CheckpointInfo:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return manager.save(*args, **kwargs)


def test_the_user_code_from_the_issue_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, optimizer = tiny_training()
    config_dict = {"lr": 0.1, "layers": [4, 8, 2], "name": "tiny"}
    manager = CheckpointManager(checkpoint_dir="checkpoints", max_checkpoints=5,
                                keep_best=True, metric_for_best="loss", mode="min")
    for epoch in (50, 100):
        train_one_step(model, optimizer)
        manager.save(model=model, optimizer=optimizer, epoch=epoch,
                     metrics={"loss": 0.5 if epoch == 100 else 0.7, "accuracy": 0.95}, config=config_dict)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}

    fresh_model, fresh_optimizer = tiny_training()
    checkpoint = manager.load_latest()
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    checkpoint = manager.load(epoch=50)
    best = manager.load_best(metric="loss", mode="min")

    assert_same_tree(expected_model, fresh_model.state_dict())
    assert_same_tree(optimizer.state_dict(), fresh_optimizer.state_dict())
    assert checkpoint["epoch"] == 50
    assert best["epoch"] == 100 and best["metrics"] == {"loss": 0.5, "accuracy": 0.95}
    assert best["config"] == config_dict
    assert (tmp_path / "checkpoints" / "epoch_100" / "model.safetensors").is_file()


def test_save_returns_a_record_of_what_was_saved(tmp_path):
    manager = make_manager(tmp_path / "ckpts")
    model, optimizer = tiny_training()
    info = manager.save(model, optimizer, epoch=3, metrics={"loss": 1.25, "acc": 0.5}, step=120)
    assert isinstance(info, CheckpointInfo)
    assert info.path == tmp_path / "ckpts" / "epoch_3_step_120"
    assert info.path.is_dir() and (info.path / "metadata.json").is_file()
    assert (info.epoch, info.step, info.metrics) == (3, 120, {"loss": 1.25, "acc": 0.5})
    assert manager.checkpoints() == [info] or [c.path for c in manager.checkpoints()] == [info.path]
    no_step = manager.save(model, epoch=4, metrics={"loss": 1.0})
    assert no_step.step is None and no_step.path.name == "epoch_4"


def test_loaded_checkpoint_holds_the_documented_keys(tmp_path):
    manager = make_manager(tmp_path)
    model, optimizer = tiny_training()
    manager.save(model, optimizer, epoch=1, metrics={"loss": 0.3}, config={"a": 1})
    plain = manager.load(epoch=1)
    assert {"model", "optimizer", "epoch", "metrics", "config", "metadata"} <= set(plain)
    assert not {"step", "scheduler", "extra"} & set(plain)
    assert plain["epoch"] == 1 and plain["metrics"] == {"loss": 0.3} and plain["config"] == {"a": 1}

    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    manager.save(model, optimizer, epoch=2, metrics={"loss": 0.2}, step=7, scheduler=scheduler,
                 extra={"note": "hello", "counts": (1, 2), "t": torch.arange(3)})
    full = manager.load(epoch=2)
    assert full["step"] == 7
    assert_same_tree(scheduler.state_dict(), full["scheduler"])
    assert_same_tree({"note": "hello", "counts": (1, 2), "t": torch.arange(3)}, full["extra"])
    assert full["config"] is None


def test_model_and_optimizer_may_be_given_as_state_dicts(tmp_path):
    manager = make_manager(tmp_path)
    model, optimizer = tiny_training()
    train_one_step(model, optimizer)
    manager.save(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=0, metrics={"loss": 1.0})
    loaded = manager.load(epoch=0)
    assert_same_tree(model.state_dict(), loaded["model"])
    assert_same_tree(optimizer.state_dict(), loaded["optimizer"])


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ("git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args),
        cwd=cwd, check=True, capture_output=True, text=True,
    )
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_metadata_records_provenance_inside_a_git_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("print('train')\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("GIT_DIR", raising=False)
    manager = make_manager(repo / "checkpoints")
    model, _ = tiny_training()

    before = datetime.datetime.now(datetime.timezone.utc)
    manager.save(model, epoch=1, metrics={"loss": 1.0})
    after = datetime.datetime.now(datetime.timezone.utc)
    meta = manager.load(epoch=1)["metadata"]

    stamp = datetime.datetime.fromisoformat(meta["timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0), "the timestamp must be in UTC"
    assert before - datetime.timedelta(seconds=1) <= stamp <= after + datetime.timedelta(seconds=1)
    assert meta["git_hash"] == head
    assert meta["git_dirty"] is False, "untracked checkpoints must not make the tree dirty"
    assert meta["python_version"] == platform.python_version()
    assert meta["torch_version"] == torch.__version__
    assert meta["safetensors_version"] == safetensors.__version__
    assert meta["ckpt_plugin_version"] == ckpt_plugin.__version__
    assert meta["hostname"] == socket.gethostname()
    assert meta["command"] == sys.argv

    (repo / "train.py").write_text("print('changed')\n")
    manager.save(model, epoch=2, metrics={"loss": 1.0})
    meta = manager.load(epoch=2)["metadata"]
    assert meta["git_hash"] == head and meta["git_dirty"] is True


def test_a_command_line_that_is_not_utf8_is_recorded_exactly(tmp_path, monkeypatch):
    odd_path = os.fsdecode(b"/data/caf\xe9-\xff")  # a Latin-1 file name, as Python decodes it
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", odd_path, "--name", "caf\u00e9 \u2603"])
    manager = make_manager(tmp_path, keep_best=False)
    manager.save({"w": torch.zeros(1)}, epoch=0, metrics={}, config={"data": odd_path})
    loaded = make_manager(tmp_path).load(epoch=0)
    assert loaded["metadata"]["command"] == ["train.py", "--data", odd_path, "--name", "caf\u00e9 \u2603"]
    assert loaded["config"] == {"data": odd_path}


def test_metadata_git_fields_are_null_outside_a_repository(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv("GIT_DIR", raising=False)
    manager = make_manager(outside / "checkpoints")
    model, _ = tiny_training()
    manager.save(model, epoch=1, metrics={"loss": 1.0})
    meta = manager.load_latest()["metadata"]
    assert meta["git_hash"] is None
    assert meta["git_dirty"] is None
    raw = json.loads((outside / "checkpoints" / "epoch_1" / "metadata.json").read_text())
    assert raw["metadata"]["git_hash"] is None


def test_load_latest_is_none_without_checkpoints(tmp_path):
    assert make_manager(tmp_path / "missing").load_latest() is None
    (tmp_path / "empty").mkdir()
    manager = make_manager(tmp_path / "empty")
    assert manager.load_latest() is None
    assert manager.checkpoints() == []
    assert manager.load_best() is None


def test_load_of_a_missing_epoch_names_the_epochs_that_exist(tmp_path):
    manager = make_manager(tmp_path)
    model, _ = tiny_training()
    for epoch in (3, 7, 12):
        manager.save(model, epoch=epoch, metrics={"loss": 1.0})
    with pytest.raises(CheckpointNotFoundError) as caught:
        manager.load(epoch=5)
    message = str(caught.value)
    assert "5" in message
    for epoch in ("3", "7", "12"):
        assert re.search(rf"\b{epoch}\b", message), f"epoch {epoch} is not named in: {message}"
    assert isinstance(caught.value, ckpt_plugin.CheckpointError)


def test_load_best_defaults_to_the_manager_metric_and_mode(tmp_path):
    manager = make_manager(tmp_path, metric_for_best="val_loss", mode="min")
    model, _ = tiny_training()
    for epoch, val_loss, acc in [(1, 0.9, 0.1), (2, 0.4, 0.3), (3, 0.6, 0.8), (4, 0.5, 0.6)]:
        manager.save(model, epoch=epoch, metrics={"val_loss": val_loss, "acc": acc})
    assert manager.load_best()["epoch"] == 2
    assert manager.load_best(metric="acc", mode="max")["epoch"] == 3
    assert manager.load_best(metric="acc", mode="min")["epoch"] == 1
    assert manager.load_best(mode="max")["epoch"] == 1
    assert manager.best().epoch == 2

    maximizing = make_manager(tmp_path, metric_for_best="acc", mode="max")
    assert maximizing.load_best()["epoch"] == 3


@pytest.mark.parametrize("mode", ["min", "max"])
def test_missing_or_nan_metric_never_wins(tmp_path, mode):
    manager = make_manager(tmp_path, metric_for_best="loss", mode=mode)
    model, _ = tiny_training()
    quiet_save(manager, model, epoch=1, metrics={"loss": 0.5})
    quiet_save(manager, model, epoch=2, metrics={"loss": float("nan")})
    quiet_save(manager, model, epoch=3, metrics={"acc": 1.0})
    quiet_save(manager, model, epoch=4, metrics={"loss": 0.7})
    quiet_save(manager, model, epoch=5, metrics={"loss": torch.tensor(float("nan"))})
    expected = 1 if mode == "min" else 4
    assert manager.best().epoch == expected
    assert manager.load_best()["epoch"] == expected
    loaded_nan = manager.load(epoch=2)["metrics"]["loss"]
    assert isinstance(loaded_nan, float) and math.isnan(loaded_nan)


def test_load_best_without_any_checkpoint_recording_the_metric_is_an_error(tmp_path):
    manager = make_manager(tmp_path, keep_best=False)
    model, _ = tiny_training()
    manager.save(model, epoch=1, metrics={"acc": 0.1})
    with pytest.raises(CheckpointNotFoundError, match="loss"):
        manager.load_best()
    with pytest.raises(ckpt_plugin.ConfigurationError):
        manager.load_best(mode="sideways")


@pytest.mark.parametrize("location", ["cpu", torch.device("cpu")])
def test_every_load_method_takes_a_map_location(tmp_path, location):
    manager = make_manager(tmp_path)
    model, optimizer = tiny_training()
    train_one_step(model, optimizer)
    manager.save(model, optimizer, epoch=1, metrics={"loss": 1.0})
    device = torch.device(location)
    for loaded in (
        manager.load(epoch=1, map_location=location),
        manager.load_latest(map_location=location),
        manager.load_best(map_location=location),
    ):
        tensors = list(loaded["model"].values()) + [
            value for state in loaded["optimizer"]["state"].values() for value in state.values()
            if isinstance(value, torch.Tensor)
        ]
        assert tensors and all(tensor.device.type == device.type for tensor in tensors)
        ckpt_plugin.restore_rng_state(loaded["rng"])
    on_cpu = manager.load(epoch=1, map_location="cpu")
    assert_same_tree(model.state_dict(), on_cpu["model"])


def test_loaded_tensors_are_writable_and_never_change_the_files(tmp_path):
    manager = make_manager(tmp_path)
    model, _ = tiny_training()
    manager.save(model, epoch=1, metrics={"loss": 1.0})
    loaded = manager.load(epoch=1)
    for tensor in loaded["model"].values():
        tensor.add_(1.0)
    again = manager.load(epoch=1)
    assert_same_tree(model.state_dict(), again["model"])


def test_checkpoints_are_listed_oldest_first_by_epoch_then_step(tmp_path):
    manager = make_manager(tmp_path)
    model, _ = tiny_training()
    for epoch, step in [(3, None), (1, 20), (2, None), (1, None), (1, 5), (10, None)]:
        manager.save(model, epoch=epoch, step=step, metrics={"loss": 1.0})
    order = [(info.epoch, info.step) for info in manager.checkpoints()]
    assert order == [(1, None), (1, 5), (1, 20), (2, None), (3, None), (10, None)]
    assert manager.latest().epoch == 10
    assert manager.load_latest()["epoch"] == 10


def test_a_second_manager_sees_the_same_checkpoints(tmp_path):
    first = make_manager(tmp_path, max_checkpoints=3)
    model, optimizer = tiny_training()
    for epoch in range(5):
        train_one_step(model, optimizer)
        first.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    second = make_manager(tmp_path, max_checkpoints=3)
    assert [c.path for c in second.checkpoints()] == [c.path for c in first.checkpoints()]
    assert [c.epoch for c in second.checkpoints()] == [2, 3, 4]
    assert_same_tree(first.load_latest()["model"], second.load_latest()["model"])
    second.save(model, optimizer, epoch=5, metrics={"loss": 0.1})
    assert [c.epoch for c in first.checkpoints()] == [3, 4, 5]


def test_a_new_process_sees_the_same_checkpoints(tmp_path):
    manager = make_manager(tmp_path / "ckpts")
    model, _ = tiny_training()
    for epoch in range(3):
        manager.save(model, epoch=epoch, step=epoch * 10, metrics={"loss": float(epoch)})
    script = (
        "import json, sys\n"
        "from ckpt_plugin import CheckpointManager\n"
        "m = CheckpointManager(sys.argv[1], max_checkpoints=None)\n"
        "latest = m.load_latest()\n"
        "print(json.dumps({'listed': [[c.epoch, c.step, c.metrics['loss']] for c in m.checkpoints()],\n"
        "                  'latest': latest['epoch'], 'keys': sorted(latest['model'])}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpts")], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"listed": [[0, 0, 0.0], [1, 10, 1.0], [2, 20, 2.0]], "latest": 2,
                    "keys": sorted(model.state_dict())}


def test_each_checkpoint_records_metric_for_best_and_mode(tmp_path):
    model, _ = tiny_training()
    by_loss = make_manager(tmp_path, metric_for_best="loss", mode="min")
    by_loss.save(model, epoch=1, metrics={"loss": 0.3, "acc": 0.2})
    by_acc = make_manager(tmp_path, metric_for_best="acc", mode="max")
    by_acc.save(model, epoch=2, metrics={"loss": 0.5, "acc": 0.9})

    listed = make_manager(tmp_path, metric_for_best=None, keep_best=False).checkpoints()
    assert [(c.metric_for_best, c.mode) for c in listed] == [("loss", "min"), ("acc", "max")]
    meta = by_acc.load(epoch=1)["metadata"]
    assert (meta["metric_for_best"], meta["mode"]) == ("loss", "min")
    raw = json.loads((tmp_path / "epoch_2" / "metadata.json").read_text())
    assert (raw["metric_for_best"], raw["mode"]) == ("acc", "max")


def test_resaving_an_epoch_replaces_it(tmp_path):
    manager = make_manager(tmp_path)
    manager.save({"w": torch.zeros(4)}, epoch=1, metrics={"loss": 2.0}, extra={"version": "old", "old_only": 1})
    manager.save({"w": torch.ones(4)}, epoch=1, metrics={"loss": 1.0}, extra={"version": "new"})
    assert [c.epoch for c in manager.checkpoints()] == [1]
    loaded = make_manager(tmp_path).load(epoch=1)
    assert_same_tree({"w": torch.ones(4)}, loaded["model"])
    assert loaded["metrics"] == {"loss": 1.0} and loaded["extra"] == {"version": "new"}
    assert visible_names(tmp_path) == ["epoch_1"]
    manager.wait()  # the replaced directory, already out of sight, is deleted in the background
    assert hidden_dirs(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "epoch_1").iterdir()) == sorted(
        ["model.safetensors", "metadata.json", "state.json", "state.safetensors"]
    ) or (tmp_path / "epoch_1" / "model.safetensors").is_file()


def test_a_reader_never_sees_a_torn_mix_while_an_epoch_is_resaved(tmp_path):
    """Readers racing a re-save of the same epoch get the old or the new checkpoint, whole."""
    writer = make_manager(tmp_path, save_rng=False)
    reader = make_manager(tmp_path, save_rng=False)

    def content(version: int) -> dict:
        return {"a": torch.full((2000,), float(version)), "b": torch.full((3,), version, dtype=torch.int64)}

    writer.save(content(0), epoch=1, metrics={"loss": 0.0}, extra={"version": 0})
    done = threading.Event()
    failures: list[BaseException] = []

    def resave() -> None:
        try:
            for version in range(1, 60):
                writer.save(content(version), epoch=1, metrics={"loss": float(version)}, extra={"version": version})
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=resave)
    thread.start()
    reads, last = 0, 0
    try:
        while not done.is_set() or reads < 5:
            loaded = reader.load(epoch=1)
            version = loaded["extra"]["version"]
            assert version >= last, "a reader went back to an older version"
            assert loaded["metrics"] == {"loss": float(version)}
            assert_same_tree(content(version), loaded["model"])
            last, reads = version, reads + 1
    finally:
        thread.join()
    assert not failures, failures
    assert reader.load(epoch=1)["extra"]["version"] == 59


def test_step_named_checkpoints(tmp_path):
    manager = make_manager(tmp_path)
    model, _ = tiny_training()
    for step in (50, 100, 150):
        manager.save(model, epoch=1, step=step, metrics={"loss": 1.0 / step})
    manager.save(model, epoch=2, step=200, metrics={"loss": 0.001})
    assert visible_names(tmp_path) == ["epoch_1_step_100", "epoch_1_step_150", "epoch_1_step_50", "epoch_2_step_200"]
    assert manager.load(epoch=1)["step"] == 150
    assert manager.load(epoch=1, step=50)["step"] == 50
    assert manager.load_latest()["step"] == 200
    with pytest.raises(CheckpointNotFoundError):
        manager.load(epoch=1, step=75)


def test_restore_loads_straight_into_live_objects(tmp_path):
    manager = make_manager(tmp_path)
    model, optimizer = tiny_training()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for epoch in range(2):
        train_one_step(model, optimizer)
        scheduler.step()
        manager.save(model, optimizer, epoch=epoch, metrics={"loss": 1.0}, scheduler=scheduler)
    fresh_model, fresh_optimizer = tiny_training()
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=1, gamma=0.5)
    info = manager.restore(fresh_model, fresh_optimizer, fresh_scheduler)
    assert info.epoch == 1
    assert_same_tree(model.state_dict(), fresh_model.state_dict())
    assert_same_tree(optimizer.state_dict(), fresh_optimizer.state_dict())
    assert_same_tree(scheduler.state_dict(), fresh_scheduler.state_dict())
    assert make_manager(tmp_path / "none").restore(nn.Linear(1, 1)) is None


def test_a_second_manager_sees_every_resave_of_an_epoch(tmp_path):
    """Directory inodes are reused once a replaced checkpoint is deleted; listing must not be fooled."""
    writer = make_manager(tmp_path, save_rng=False)
    reader = make_manager(tmp_path, save_rng=False)
    version = 0
    for round_ in range(24):
        for _ in range(1 + round_ % 3):
            version += 1
            writer.save({"w": torch.full((10,), float(version))}, epoch=2, metrics={"loss": float(version)})
        loaded = reader.load(epoch=2)
        assert loaded["metrics"] == {"loss": float(version)}
        assert torch.equal(loaded["model"]["w"], torch.full((10,), float(version)))
        assert [info.metrics for info in reader.checkpoints()] == [{"loss": float(version)}]


def test_a_checkpoint_restored_from_a_copy_in_place_is_read_afresh(tmp_path):
    """Files copied into an existing checkpoint directory (as the corruption errors advise) are seen."""
    manager = make_manager(tmp_path / "run", save_rng=False)
    manager.save({"w": torch.zeros(3)}, epoch=1, metrics={"loss": 1.0})
    assert manager.load(epoch=1)["metrics"] == {"loss": 1.0}
    backup = make_manager(tmp_path / "backup", save_rng=False)
    backup.save({"w": torch.ones(3)}, epoch=1, metrics={"loss": 0.5})
    for source in sorted((tmp_path / "backup" / "epoch_1").iterdir()):
        shutil.copyfile(source, tmp_path / "run" / "epoch_1" / source.name)
    loaded = manager.load(epoch=1)
    assert loaded["metrics"] == {"loss": 0.5}
    assert torch.equal(loaded["model"]["w"], torch.ones(3))
    assert [info.metrics for info in manager.checkpoints()] == [{"loss": 0.5}]


def test_two_managers_pruning_one_directory_at_once_never_fail_a_committed_save(tmp_path):
    """Retention runs after the commit: a checkpoint another manager already deleted is no error."""
    failures: list[BaseException] = []
    returned: dict[int, list[int]] = {0: [], 1: []}

    def run(offset: int) -> None:
        manager = make_manager(tmp_path, max_checkpoints=1, keep_best=False, save_rng=False)
        for index in range(60):
            epoch = 2 * index + offset
            try:
                manager.save({"w": torch.full((4,), float(epoch))}, epoch=epoch, metrics={})
                returned[offset].append(epoch)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

    threads = [threading.Thread(target=run, args=(offset,)) for offset in (0, 1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, [str(exc) for exc in failures[:3]]
    assert not [w for w in caught if "ignoring" in str(w.message)], "a checkpoint deleted by the other manager was reported"
    assert len(returned[0]) == len(returned[1]) == 60
    reader = make_manager(tmp_path)
    listed = reader.checkpoints()
    assert listed and listed[-1].epoch == 119
    for info in listed:
        assert torch.equal(reader.load(epoch=info.epoch)["model"]["w"], torch.full((4,), float(info.epoch)))


def test_a_save_older_than_the_directory_s_latest_is_kept_and_warned_about(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", max_checkpoints=2, keep_best=False)
    for epoch in (7, 8, 9):
        manager.save({"w": torch.full((2,), float(epoch))}, epoch=epoch)
    with pytest.warns(UserWarning, match="already holds later checkpoints"):
        info = manager.save({"w": torch.zeros(2)}, epoch=0)
    assert info.path.is_dir()
    assert [c.name for c in manager.checkpoints()] == ["epoch_0", "epoch_8", "epoch_9"]
    assert torch.equal(manager.load(epoch=0)["model"]["w"], torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager.save({"w": torch.ones(2)}, epoch=1)
    assert [c.name for c in manager.checkpoints()] == ["epoch_1", "epoch_8", "epoch_9"]
