"""Asynchronous saves: snapshot isolation, one save in flight, errors, flushing, crash consistency."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_plugin import AsyncSaveError, CheckpointManager, StorageError
from ckpt_plugin._io.staging import StagingBuffer
from ckpt_plugin._storage import faults

ROOT = Path(__file__).resolve().parents[1]


def make_model(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    train_step(model, optimizer)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def clone_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    optim_state = optimizer.state_dict()["state"]
    return (
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        {key: {k: v.clone() for k, v in value.items()} for key, value in optim_state.items()},
    )


def assert_same(loaded: dict, model_state: dict, optim_state: dict) -> None:
    assert loaded["model"].keys() == model_state.keys()
    for name, tensor in model_state.items():
        assert torch.equal(loaded["model"][name], tensor), name
    for key, value in optim_state.items():
        for name, tensor in value.items():
            assert torch.equal(loaded["optimizer"]["state"][key][name], tensor), (key, name)


class Gate:
    """Holds a manager's background writes at their first file until the test releases them, by a
    hook of the fault-injecting backend; counts the saves that reached storage."""

    def __init__(self, manager: CheckpointManager, fail: BaseException | None = None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail = fail
        self.calls = 0
        self._prefixes: set[str] = set()
        self._lock = threading.Lock()
        faults.inject(manager, hook=self)

    def __call__(self, operation: str, key: str) -> None:
        if operation not in ("create", "reuse"):
            return
        with self._lock:  # each save writes under a prefix of its own: its first file is held
            first = os.path.dirname(key) not in self._prefixes
            self._prefixes.add(os.path.dirname(key))
            self.calls += first
        if not first:
            return
        self.entered.set()
        assert self.release.wait(30), "the test never released the background write"
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error


def test_weights_changed_right_after_save_do_not_leak(tmp_path):
    model, optimizer = make_model()
    manager = CheckpointManager(tmp_path, async_save=True)
    gate = Gate(manager)
    expected_model, expected_optim = clone_state(model, optimizer)
    info = manager.save(model=model, optimizer=optimizer, epoch=1, metrics={"loss": 1.0})
    assert gate.entered.wait(30)
    # Training goes on while the write is held: in-place updates and a real optimizer step.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(100.0)
    train_step(model, optimizer)
    gate.release.set()
    manager.wait()
    assert info.path == tmp_path / "epoch_1" and info.epoch == 1 and info.metrics == {"loss": 1.0}
    assert_same(manager.load(epoch=1), expected_model, expected_optim)


def test_async_round_trip_matches_sync(tmp_path):
    model, optimizer = make_model()
    extra = {
        "transposed": torch.arange(12.0).reshape(3, 4).t(),
        "flags": torch.tensor([True, False, True]),
        "half": torch.ones(5, dtype=torch.bfloat16),
        "scalar": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "nested": [(1, 2), {"a": torch.randn(2)}],
    }
    sync = CheckpointManager(tmp_path / "sync")
    sync.save(model=model, optimizer=optimizer, epoch=3, step=5, metrics={"loss": 0.25}, config={"lr": 0.1}, extra=extra)
    with CheckpointManager(tmp_path / "async", async_save=True) as manager:
        manager.save(model=model, optimizer=optimizer, epoch=3, step=5, metrics={"loss": 0.25}, config={"lr": 0.1}, extra=extra)
    expected = sync.load_latest()
    loaded = CheckpointManager(tmp_path / "async").load_latest()
    for key in ("epoch", "step", "metrics", "config"):
        assert loaded[key] == expected[key]
    for key in ("git_hash", "git_dirty", "ckpt_plugin_version"):
        assert loaded["metadata"][key] == expected["metadata"][key]
    for name, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    for name, value in extra.items():
        if isinstance(value, torch.Tensor):
            assert loaded["extra"][name].dtype == value.dtype
            assert torch.equal(loaded["extra"][name], value), name
    assert loaded["extra"]["nested"][0] == (1, 2)
    assert torch.equal(loaded["extra"]["nested"][1]["a"], extra["nested"][1]["a"])


def test_tied_weights_are_staged_once_and_load_strictly(tmp_path):
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    with CheckpointManager(tmp_path, async_save=True, keep_best=False, save_rng=False) as manager:
        manager.save(model=model, epoch=0)
        assert manager._saver.buffer.nbytes < 2 * embedding.weight.numel() * 4
    fresh = nn.ModuleDict({"embedding": nn.Embedding(10, 6), "head": nn.Linear(6, 10, bias=False)})
    fresh["head"].weight = fresh["embedding"].weight
    assert manager.restore(fresh) is not None
    assert torch.equal(fresh["head"].weight, embedding.weight)


@pytest.mark.parametrize("detection", ["checksum", "version"])
def test_incremental_async_saves_link_frozen_shards_and_stay_isolated(tmp_path, detection):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    model[:2].requires_grad_(False)
    optimizer = torch.optim.Adam(model[2].parameters(), lr=0.05)
    manager = CheckpointManager(
        tmp_path, max_checkpoints=None, keep_best=False, incremental=True, change_detection=detection, async_save=True
    )
    train_step(model, optimizer)
    manager.save(model=model, optimizer=optimizer, epoch=1)
    manager.wait()
    train_step(model, optimizer)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    gate = Gate(manager)
    manager.save(model=model, optimizer=optimizer, epoch=2)
    assert gate.entered.wait(30)
    train_step(model, optimizer)  # the trained head changes while epoch 2 is being written
    gate.release.set()
    manager.wait()

    def shard_inode(epoch: int, tensor: str) -> int:
        directory = tmp_path / f"epoch_{epoch}"
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        return os.stat(directory / index["weight_map"][tensor]).st_ino

    assert shard_inode(2, "0.weight") == shard_inode(1, "0.weight")  # frozen: linked, not written
    assert shard_inode(2, "2.weight") != shard_inode(1, "2.weight")
    loaded = manager.load(epoch=2)["model"]
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_at_most_one_save_in_flight(tmp_path):
    model, optimizer = make_model()
    manager = CheckpointManager(tmp_path, async_save=True, max_checkpoints=None, keep_best=False)
    gate = Gate(manager)
    manager.save(model=model, optimizer=optimizer, epoch=0)
    assert gate.entered.wait(30)
    timer = threading.Timer(0.5, gate.release.set)
    timer.start()
    manager.save(model=model, optimizer=optimizer, epoch=1)  # must wait for epoch 0 to finish
    assert gate.release.is_set()
    manager.wait()
    timer.join()
    assert gate.calls == 2
    assert [info.epoch for info in manager.checkpoints()] == [0, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_background_write_runs_at_a_lower_priority_and_says_when_it_runs(tmp_path):
    from ckpt_plugin._io import async_save

    model, optimizer = make_model()
    manager = CheckpointManager(tmp_path, async_save=True, keep_best=False)
    gate = Gate(manager)
    manager.save(model=model, optimizer=optimizer, epoch=0)
    assert gate.entered.wait(30)
    assert manager._saver.writing
    writers = [thread for thread in threading.enumerate() if thread.name.startswith("ckpt-save")]
    assert writers
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    expected = min(19, own + async_save.BACKGROUND_NICENESS)
    assert {os.getpriority(os.PRIO_PROCESS, thread.native_id) for thread in writers} == {expected}
    gate.release.set()
    manager.wait()
    assert not manager._saver.writing
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own, "the caller's priority is untouched"
    manager.close()


def test_staging_buffer_is_reused_and_the_size_of_the_state(tmp_path):
    model, optimizer = make_model()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(
        t.numel() * t.element_size() for s in optimizer.state_dict()["state"].values() for t in s.values()
    )
    manager = CheckpointManager(tmp_path, async_save=True, save_rng=False, keep_best=False)
    manager.save(model=model, optimizer=optimizer, epoch=0)
    buffer = manager._saver.buffer
    first = (buffer.nbytes, buffer._buffer.data_ptr())
    for epoch in (1, 2):
        train_step(model, optimizer)
        manager.save(model=model, optimizer=optimizer, epoch=epoch)
    assert (buffer.nbytes, buffer._buffer.data_ptr()) == first
    padding = 64 * (len(model.state_dict()) + 3 * len(optimizer.state_dict()["state"]))
    assert state_bytes <= buffer.nbytes <= state_bytes + padding
    manager.close()
    assert buffer.nbytes == 0
    manager.save(model=model, optimizer=optimizer, epoch=3)  # still usable after close
    manager.wait()
    assert manager.latest().epoch == 3


@pytest.mark.parametrize("threads", [1, 2])
def test_staging_copies_every_kind_of_tensor(threads):
    big = torch.randn(1024, 1024)  # large enough to be split between two threads
    tensors = {
        "big": big,
        "strided": big[::2, ::3],
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "bool": torch.tensor([True, False]),
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }
    staged = StagingBuffer(threads).stage([tensors, {"again": big}])
    staged.wait()
    copies = {**staged.groups[0], **staged.groups[1]}
    for name, tensor in tensors.items():
        assert copies[name].dtype == tensor.dtype and copies[name].shape == tensor.shape
        assert torch.equal(copies[name], tensor.resolve_conj()), name
        assert copies[name].numel() == 0 or copies[name].data_ptr() != tensor.data_ptr()
    assert torch.equal(copies["again"], big)


def test_background_error_is_raised_at_the_next_save(tmp_path):
    model, optimizer = make_model()
    manager = CheckpointManager(tmp_path, async_save=True, keep_best=False)
    Gate(manager, fail=StorageError(28, "could not write: the disk is full")).release.set()
    manager.save(model=model, optimizer=optimizer, epoch=0)
    with pytest.raises(StorageError, match="disk is full"):
        manager.save(model=model, optimizer=optimizer, epoch=1)
    assert manager.checkpoints() == []  # neither the failed save nor the refused one committed
    manager.save(model=model, optimizer=optimizer, epoch=2)  # the error was reported once
    manager.wait()
    assert [info.epoch for info in manager.checkpoints()] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".saves.jsonl"]  # no staging left behind


@pytest.mark.parametrize("how", ["wait", "close", "context"])
def test_background_error_is_raised_at_wait_close_and_exit(tmp_path, how):
    model, optimizer = make_model()
    manager = CheckpointManager(tmp_path, async_save=True, keep_best=False)
    Gate(manager, fail=RuntimeError("boom")).release.set()
    with pytest.raises(AsyncSaveError, match="boom") as raised:
        if how == "context":
            with manager:
                manager.save(model=model, optimizer=optimizer, epoch=0)
        else:
            manager.save(model=model, optimizer=optimizer, epoch=0)
            getattr(manager, how)()
    assert isinstance(raised.value.__cause__, RuntimeError)
    manager.wait()  # reported once, then cleared


def test_context_exit_does_not_hide_the_original_exception(tmp_path):
    model, _ = make_model()
    with pytest.raises(KeyError, match="foreground"), pytest.warns(UserWarning, match="background"):
        with CheckpointManager(tmp_path, async_save=True, keep_best=False) as manager:
            Gate(manager, fail=RuntimeError("background")).release.set()
            manager.save(model=model, epoch=0)
            raise KeyError("foreground")


def test_loads_wait_for_the_save_in_flight(tmp_path):
    model, optimizer = make_model()
    manager = CheckpointManager(tmp_path, async_save=True, keep_best=False)
    gate = Gate(manager)
    manager.save(model=model, optimizer=optimizer, epoch=4)
    assert manager.checkpoints() == []  # listing does not wait: not committed yet
    threading.Timer(0.2, gate.release.set).start()
    assert manager.load_latest()["epoch"] == 4


def test_sync_manager_has_the_same_surface(tmp_path):
    model, _ = make_model()
    with CheckpointManager(tmp_path, keep_best=False) as manager:
        info = manager.save(model=model, epoch=0)
        manager.wait()
        assert info.files  # a synchronous save returns the committed record
    assert manager.latest().epoch == 0


def test_exit_hook_holds_managers_weakly(tmp_path):
    manager = CheckpointManager(tmp_path, async_save=True, keep_best=False)
    model, _ = make_model()
    manager.save(model=model, epoch=0)
    manager.wait()
    ref = weakref.ref(manager)
    del manager
    # The pool thread drops its last reference to the finished job just after completing it.
    for _ in range(100):
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.05)
    assert ref() is None


CHILD_EXIT = textwrap.dedent(
    """
    import sys, time
    import torch
    from ckpt_plugin import CheckpointManager
    from ckpt_plugin._storage import faults

    held = []
    def slow(operation, key):
        if operation == "create" and not held:
            held.append(key)
            time.sleep(1.0)  # still writing when the main thread ends
    manager = CheckpointManager(sys.argv[1], async_save=True, keep_best=False)
    faults.inject(manager, hook=slow)
    manager.save(model={"w": torch.full((64,), 3.0)}, epoch=7)
    print("returned", flush=True)
    """
)


def test_pending_save_is_flushed_at_interpreter_exit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", CHILD_EXIT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    loaded = CheckpointManager(tmp_path).load_latest()
    assert loaded is not None and loaded["epoch"] == 7 and torch.equal(loaded["model"]["w"], torch.full((64,), 3.0))


CHILD_LOOP = textwrap.dedent(
    """
    import sys
    import torch
    from ckpt_plugin import CheckpointManager

    manager = CheckpointManager(sys.argv[1], async_save=True, max_checkpoints=3, keep_best=False)
    start = int(sys.argv[2])
    weights = {f"w{i}": torch.empty(1024, 1024) for i in range(6)}  # 24 MiB: writes take a while
    for epoch in range(start, start + 1000):
        for tensor in weights.values():
            tensor.fill_(float(epoch))
        manager.save(model=weights, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
        print(f"returned {epoch}", flush=True)
        manager.wait()
        print(f"committed {epoch}", flush=True)
    """
)


@pytest.mark.slow
def test_kill_during_background_write_leaves_previous_checkpoints_intact(tmp_path):
    rng = random.Random(1234)
    committed = -1
    next_epoch = 0
    for _ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_LOOP, str(tmp_path), str(next_epoch)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        target = rng.randint(1, 4)  # kill after this many saves have returned
        returned = 0
        for line in child.stdout:
            kind, epoch = line.split()
            if kind == "committed":
                committed = max(committed, int(epoch))
            elif kind == "returned":
                returned += 1
                if returned == target:
                    threading.Event().wait(rng.uniform(0.0, 0.05))  # somewhere inside the write
                    child.send_signal(signal.SIGKILL)
                    break
        child.wait(timeout=60)
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        fresh = CheckpointManager(tmp_path)
        listed = fresh.checkpoints()
        assert listed, "a kill must never leave the directory without its committed checkpoints"
        assert listed[-1].epoch >= committed
        for info in listed:
            loaded = fresh.load(epoch=info.epoch)  # verifies every checksum
            for tensor in loaded["model"].values():
                assert torch.equal(tensor, torch.full_like(tensor, float(info.epoch))), info.epoch
        next_epoch = listed[-1].epoch + 1
    assert committed >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_is_snapshotted_before_save_returns(tmp_path):
    device = torch.device("cuda")
    model = nn.Linear(256, 256).to(device)
    expected = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    with CheckpointManager(tmp_path, async_save=True, keep_best=False) as manager:
        manager.save(model=model, epoch=0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(0).add_(5)  # queued right after save() returned
        assert manager._saver.buffer.pinned
    loaded = manager.load_latest()
    for name, tensor in expected.items():
        assert torch.equal(loaded["model"][name], tensor)
