"""Clear errors, nothing partial, nothing lost: bad options, bad metrics, full disks, unwritable
directories, foreign files, damaged checkpoints, and no pickle anywhere."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from core_helpers import full_state, hidden_dirs, save_full, snapshot_tree, visible_names
from spawned_workers import SpawnedWorkers

import ckpt_plugin
from ckpt_plugin import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    EncodingError,
    ForeignFileError,
    StorageError,
)
from ckpt_plugin._storage import faults, trash

PACKAGE_DIR = Path(ckpt_plugin.__file__).resolve().parent


def manager_at(path, **options) -> CheckpointManager:
    options.setdefault("max_checkpoints", None)
    options.setdefault("keep_best", False)
    return CheckpointManager(path, **options)


def assert_intact(directory: Path, before: dict[str, bytes]) -> None:
    """Nothing was added, removed or changed, and every checkpoint still loads."""
    assert trash.drain(30)  # what the earlier saves pruned is deleted in the background
    assert hidden_dirs(directory) == [], f"partial leftovers: {hidden_dirs(directory)}"
    assert snapshot_tree(directory) == before
    manager = manager_at(directory)
    for info in manager.checkpoints():
        manager.load(epoch=info.epoch, step=info.step)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("mode", ["minimum", "MAX", "", "auto"])  # None is the default, "min"
def test_unknown_mode_is_a_configuration_error(tmp_path, mode):
    with pytest.raises(ConfigurationError, match=r"min.*max") as caught:
        CheckpointManager(tmp_path, mode=mode)
    assert isinstance(caught.value, CheckpointError)
    assert not any(tmp_path.iterdir()), "a rejected manager must not write anything"


@pytest.mark.parametrize("value", [0, -1, -5, 1.5, 2.0, "3", True, False])
def test_invalid_max_checkpoints_is_a_configuration_error(tmp_path, value):
    with pytest.raises(ConfigurationError, match="max_checkpoints"):
        CheckpointManager(tmp_path, max_checkpoints=value)


@pytest.mark.parametrize("value", [1, 3, None])
def test_valid_max_checkpoints(tmp_path, value):
    assert CheckpointManager(tmp_path, max_checkpoints=value).max_checkpoints == value


@pytest.mark.parametrize("epoch", [-1, 1.5, "3", None, True])
def test_invalid_epoch_is_an_error_and_writes_nothing(tmp_path, epoch):
    manager = manager_at(tmp_path)
    with pytest.raises(CheckpointError):
        manager.save({"w": torch.zeros(1)}, epoch=epoch, metrics={})
    assert not tmp_path.exists() or visible_names(tmp_path) == []


# ------------------------------------------------------------------ metrics


def test_missing_metric_for_keep_best_warns_once_and_is_never_best(tmp_path):
    manager = CheckpointManager(tmp_path, max_checkpoints=1, keep_best=True, metric_for_best="loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager.save({"w": torch.zeros(1)}, epoch=0, metrics={"loss": 0.5})
        manager.save({"w": torch.zeros(1)}, epoch=1, metrics={"acc": 0.1})
        manager.save({"w": torch.zeros(1)}, epoch=2, metrics={})
        manager.save({"w": torch.zeros(1)}, epoch=3, metrics={"acc": 0.3})
    relevant = [w for w in caught if "loss" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert issubclass(relevant[0].category, UserWarning)
    assert "loss" in str(relevant[0].message) and "never" in str(relevant[0].message)
    # epoch 0 is the only candidate for best; epoch 3 is the newest; 1 and 2 were pruned.
    assert [info.epoch for info in manager.checkpoints()] == [0, 3]
    assert manager.best().epoch == 0


def test_one_element_tensor_metrics_become_floats(tmp_path):
    manager = manager_at(tmp_path)
    info = manager.save({"w": torch.zeros(1)}, epoch=0, metrics={
        "loss": torch.tensor([0.25]), "acc": torch.tensor(0.5, requires_grad=True), "np": np.float32(0.75),
        "np64": np.float64(0.125), "npint": np.int64(7),
        "count": 3, "nested": torch.tensor([[2.0]]),
    })
    loaded = manager.load(epoch=0)["metrics"]
    for metrics in (info.metrics, loaded):
        assert metrics["loss"] == 0.25 and type(metrics["loss"]) is float
        assert metrics["acc"] == 0.5 and type(metrics["acc"]) is float
        assert metrics["np"] == 0.75 and type(metrics["np"]) is float
        assert metrics["nested"] == 2.0 and type(metrics["nested"]) is float
        assert metrics["count"] == 3
        assert metrics["np64"] == 0.125 and type(metrics["np64"]) is float
        assert metrics["npint"] == 7 and type(metrics["npint"]) is int
    raw = json.loads((tmp_path / "epoch_0" / "metadata.json").read_text())
    assert all(type(value) in (int, float) for value in raw["metrics"].values()), raw["metrics"]


@pytest.mark.parametrize("value", [torch.tensor([0.1, 0.2]), torch.zeros(0), [0.5], "0.5", {"a": 1}, np.zeros(3), None])
def test_non_scalar_metric_is_an_encoding_error(tmp_path, value):
    manager = manager_at(tmp_path)
    manager.save({"w": torch.zeros(1)}, epoch=0, metrics={"loss": 1.0})
    before = snapshot_tree(tmp_path)
    with pytest.raises(EncodingError, match="loss"):
        manager.save({"w": torch.zeros(1)}, epoch=1, metrics={"loss": value})
    assert_intact(tmp_path, before)


def test_unstorable_tensor_is_an_encoding_error_and_leaves_nothing(tmp_path):
    manager = manager_at(tmp_path)
    save_full(manager, 0)
    before = snapshot_tree(tmp_path)
    with pytest.raises(EncodingError, match="complex128|safetensors"):
        manager.save({"w": torch.zeros(2, dtype=torch.complex128)}, epoch=1, metrics={})
    with pytest.raises(EncodingError, match=r"extra\['sparse'\]"):
        manager.save({"w": torch.zeros(1)}, epoch=1, metrics={}, extra={"sparse": torch.eye(3).to_sparse()})
    assert_intact(tmp_path, before)


# ------------------------------------------------------------------ unwritable directories, full disks


def test_directory_under_a_regular_file_is_a_storage_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    manager = manager_at(blocker / "checkpoints")
    assert manager.load_latest() is None
    with pytest.raises(StorageError) as caught:
        manager.save({"w": torch.zeros(1)}, epoch=0, metrics={})
    message = str(caught.value)
    assert "not_a_dir" in message and "directory" in message, message
    assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, OSError)
    assert blocker.read_text() == "a file"


def test_checkpoint_dir_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(CheckpointError, match="file"):
        CheckpointManager(path)


@pytest.mark.parametrize("budget", [0, 40, 3_000, 12_000, 20_000])
def test_full_disk_mid_write_is_a_storage_error_and_leaves_nothing(tmp_path, budget):
    manager = manager_at(tmp_path, max_checkpoints=2, keep_best=True)
    for epoch in range(3):
        save_full(manager, epoch)
    before = snapshot_tree(tmp_path)
    real = manager.route_storage(lambda backend: backend)
    disk = faults.inject(manager, fail_after_bytes=budget, error=lambda key: _enospc(key))
    with pytest.raises(StorageError) as caught:
        save_full(manager, 3)
    manager.route_storage(lambda faulty: real)  # room again
    assert disk.triggered
    assert caught.value.errno == errno.ENOSPC
    assert "full" in str(caught.value) and str(tmp_path) in str(caught.value), str(caught.value)
    assert_intact(tmp_path, before)
    save_full(manager, 3)  # once there is room again, saving works
    assert manager.latest().epoch == 3


def _enospc(key: str) -> StorageError:
    from ckpt_plugin._storage.local import _storage_error

    return _storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "write", key)


@pytest.mark.parametrize("budget", [0, 12_000])
def test_an_interrupt_mid_write_leaves_nothing(tmp_path, budget):
    manager = manager_at(tmp_path, max_checkpoints=2, keep_best=True)
    for epoch in range(3):
        save_full(manager, epoch)
    before = snapshot_tree(tmp_path)
    faults.inject(manager, fail_after_bytes=budget, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_full(manager, 3)
    assert_intact(tmp_path, before)


@pytest.fixture(scope="module")
def workers():
    spawned = SpawnedWorkers()
    yield spawned
    spawned.close()


@pytest.mark.parametrize("limit", [0, 1_000, 5_000])
def test_file_size_limit_mid_write_is_a_storage_error_and_leaves_nothing(tmp_path, workers, limit):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size, whatever call the writer uses."""
    manager = manager_at(tmp_path, max_checkpoints=2, keep_best=True)
    for epoch in range(3):
        save_full(manager, epoch)
    before = snapshot_tree(tmp_path)
    status, outcome = workers.run("save_under_file_size_limit", str(tmp_path), limit)
    assert status == 0, f"the saving child died: wait status {status}"
    name, error_number, message = outcome
    assert name == "StorageError", outcome
    assert error_number == errno.EFBIG
    assert "full" in message or "quota" in message or "size" in message, message
    assert_intact(tmp_path, before)


# ------------------------------------------------------------------ foreign files


def test_foreign_files_are_ignored_and_never_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.log").write_text("log")
    (tmp_path / "epoch_x").mkdir()
    (tmp_path / "epoch_9").mkdir()
    (tmp_path / "epoch_9" / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / "epoch_10").write_text("a file named like a checkpoint")
    (tmp_path / ".DS_Store").write_bytes(b"finder")
    foreign = snapshot_tree(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(tmp_path, max_checkpoints=1, keep_best=False)
        for epoch in range(4):
            manager.save({"w": torch.full((2,), float(epoch))}, epoch=epoch, metrics={})
        listed = [info.epoch for info in manager.checkpoints()]
        again = CheckpointManager(tmp_path, max_checkpoints=1, keep_best=False)
        listed_again = [info.epoch for info in again.checkpoints()]
    assert listed == [3] and listed_again == [3]
    after = snapshot_tree(tmp_path)
    for name, content in foreign.items():
        assert after.get(name) == content, f"foreign file {name} was changed or deleted"
    assert (tmp_path / "epoch_x").is_dir()
    assert (tmp_path / ".DS_Store").read_bytes() == b"finder"


def test_foreign_directory_with_a_checkpoint_name_is_never_overwritten(tmp_path):
    (tmp_path / "epoch_5").mkdir()
    (tmp_path / "epoch_5" / "precious.txt").write_text("data")
    before = snapshot_tree(tmp_path)
    manager = manager_at(tmp_path)
    with pytest.raises(ForeignFileError, match="epoch_5"):
        manager.save({"w": torch.zeros(1)}, epoch=5, metrics={})
    assert snapshot_tree(tmp_path) == before
    assert hidden_dirs(tmp_path) == []


def test_foreign_directory_with_its_own_metadata_json_is_never_overwritten(tmp_path):
    target = tmp_path / "epoch_7"
    target.mkdir()
    (target / "metadata.json").write_text(json.dumps({"author": "another tool", "epoch": 7}))
    (target / "precious.bin").write_bytes(b"\x01\x02\x03")
    before = snapshot_tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = manager_at(tmp_path)
        with pytest.raises(ForeignFileError, match="epoch_7"):
            manager.save({"w": torch.zeros(1)}, epoch=7, metrics={})
        assert manager.checkpoints() == []
    assert snapshot_tree(tmp_path) == before
    assert hidden_dirs(tmp_path) == []


# ------------------------------------------------------------------ damaged checkpoints


def saved_checkpoint(tmp_path) -> Path:
    manager = manager_at(tmp_path / "ckpts")
    save_full(manager, 0)
    path = tmp_path / "ckpts" / "epoch_0"
    names = sorted(p.name for p in path.iterdir())
    assert {"model.safetensors", "optimizer.safetensors", "metadata.json"} <= set(names), names
    return path


def load_fresh(directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return manager_at(directory).load(epoch=0)


def files_of(path: Path, which: str) -> list[str]:
    names = sorted(p.name for p in path.iterdir())
    return ["metadata.json"] if which == "metadata.json" else [name for name in names if name != "metadata.json"]


FILE_KINDS = ["data files", "metadata.json"]


@pytest.mark.parametrize("which", FILE_KINDS)
@pytest.mark.parametrize("where", [0, 9, 0.5, -1])
def test_a_flipped_byte_in_any_file_is_a_corrupt_checkpoint_error_naming_it(tmp_path, where, which):
    path = saved_checkpoint(tmp_path)
    for name in files_of(path, which):
        file = path / name
        original = file.read_bytes()
        data = bytearray(original)
        index = int(len(data) * where) if isinstance(where, float) else where % len(data)
        data[index] ^= 0x01
        file.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError) as caught:
            load_fresh(path.parent)
        assert name in str(caught.value), f"flipping byte {index} of {name}: {caught.value}"
        file.write_bytes(original)
    load_fresh(path.parent)  # restored: loads again


@pytest.mark.parametrize("which", FILE_KINDS)
@pytest.mark.parametrize("keep", [0, 1, 0.5, -1])
def test_a_truncated_file_is_a_corrupt_checkpoint_error_naming_it(tmp_path, keep, which):
    path = saved_checkpoint(tmp_path)
    for name in files_of(path, which):
        file = path / name
        original = file.read_bytes()
        size = int(len(original) * keep) if isinstance(keep, float) else keep % len(original)
        file.write_bytes(original[:size])
        with pytest.raises(CorruptCheckpointError) as caught:
            load_fresh(path.parent)
        assert name in str(caught.value), f"truncating {name} to {size} bytes: {caught.value}"
        file.write_bytes(original)


@pytest.mark.parametrize("which", FILE_KINDS)
def test_a_missing_file_is_a_corrupt_checkpoint_error_naming_it(tmp_path, which):
    path = saved_checkpoint(tmp_path)
    for name in files_of(path, which):
        file = path / name
        original = file.read_bytes()
        file.unlink()
        with pytest.raises(CheckpointError) as caught:
            load_fresh(path.parent)
        assert name in str(caught.value), f"removing {name}: {caught.value}"
        file.write_bytes(original)


def test_a_damaged_checkpoint_is_never_deleted_by_retention(tmp_path):
    manager = manager_at(tmp_path, max_checkpoints=1)
    manager.save({"w": torch.zeros(1)}, epoch=0, metrics={})
    damaged = tmp_path / "epoch_0" / "metadata.json"
    damaged.write_bytes(damaged.read_bytes()[:-5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = manager_at(tmp_path, max_checkpoints=1)
        manager.save({"w": torch.zeros(1)}, epoch=1, metrics={})
        manager.save({"w": torch.zeros(1)}, epoch=2, metrics={})
    assert damaged.is_file()
    assert [info.epoch for info in manager.checkpoints()] == [2]


# ------------------------------------------------------------------ no pickle


PICKLE_MARKERS = [b"\x80\x02", b"\x80\x03", b"\x80\x04\x95", b"\x80\x05\x95", b"PK\x03\x04", b"torch._utils",
                  b"_rebuild_tensor", b"collections\nOrderedDict", b"cnumpy", b"numpy.core.multiarray"]


def test_no_pickle_on_disk(tmp_path):
    manager = manager_at(tmp_path)
    model, optimizer, scheduler = full_state()
    np.random.seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.arange(parameter.numel(), dtype=parameter.dtype).reshape(parameter.shape) / 64)
    manager.save(model=model, optimizer=optimizer, scheduler=scheduler, epoch=0, metrics={"loss": 0.1},
                 config={"name": "run"}, extra={"array": np.arange(6), "bytes": b"\x80\x04", "tuple": (1, 2)})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for file in files:
        data = file.read_bytes()
        if file.suffix == ".json":
            json.loads(data)
        elif file.suffix == ".jsonl":  # the save log: one JSON object a line
            assert all(isinstance(json.loads(line), dict) for line in data.splitlines())
        elif file.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + header_len])
            assert isinstance(header, dict)
            with safetensors.safe_open(str(file), framework="pt") as handle:
                assert set(handle.keys()) == set(header) - {"__metadata__"}
            data = data[: 8 + header_len]  # tensor bytes are raw numbers, not code
        else:
            pytest.fail(f"unexpected file {file.name}: only JSON and safetensors are written")
        for marker in PICKLE_MARKERS:
            assert marker not in data, f"{file.name} contains {marker!r}"


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def test_no_pickle_or_torch_load_in_the_package_source():
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert sources
    for source in sources:
        text = source.read_text()
        tree = ast.parse(text, filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
                assert not names & FORBIDDEN_MODULES, f"{source.name}:{node.lineno} imports {names & FORBIDDEN_MODULES}"
            elif isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")[0]
                assert module not in FORBIDDEN_MODULES, f"{source.name}:{node.lineno} imports from {module}"
                if module == "torch":
                    imported = {alias.name for alias in node.names}
                    assert "load" not in imported, f"{source.name}:{node.lineno} imports torch.load"
            elif isinstance(node, ast.Attribute) and node.attr == "load":
                base = node.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    pytest.fail(f"{source.name}:{node.lineno} calls torch.{node.attr}")
            elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                pytest.fail(f"{source.name}:{node.lineno} passes allow_pickle")
        assert not re.search(r"\bpickle\.loads?\(|\btorch\.load\(", text), source.name


def test_keep_top_k_options_and_a_metric_never_recorded(tmp_path):
    with pytest.raises(ConfigurationError, match="keep_top_k=3 .* metric_for_best is None; pass metric_for_best or drop keep_top_k"):
        CheckpointManager(tmp_path, keep_top_k=3, metric_for_best=None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="keep_top_k must be a whole number"):
            CheckpointManager(tmp_path, keep_top_k=bad)
    manager = CheckpointManager(tmp_path, max_checkpoints=1, keep_top_k=2, metric_for_best="val_loss", save_rng=False)
    assert (manager.keep_top_k, manager.keep_best) == (2, True)
    with pytest.raises(ConfigurationError, match=r"metric_for_best='val_loss'.*recorded: acc, loss"):
        manager.save(model={"w": torch.zeros(1)}, epoch=0, metrics={"loss": 1.0, "acc": 0.5})
    assert manager.checkpoints() == []
    for epoch, value in enumerate([0.5, 0.2, 0.9, 0.3, 0.8]):
        manager.save(model={"w": torch.zeros(1)}, epoch=epoch, metrics={"val_loss": value})
    assert [info.epoch for info in manager.checkpoints()] == [1, 3, 4]  # the two best and the latest
    with pytest.warns(UserWarning, match="never the best"):  # only the first save must record it
        manager.save(model={"w": torch.zeros(1)}, epoch=5, metrics={})
    assert CheckpointManager(tmp_path, keep_best=False).keep_top_k == 0
