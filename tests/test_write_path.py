"""The fast write path: direct-I/O tensor files, background deletion, adaptive staging copies."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from core_helpers import hidden_dirs, visible_names
from safetensors.torch import load_file

from ckpt_plugin import CheckpointManager, StorageError
from ckpt_plugin._io.files import verify_file, write_tensor_file
from ckpt_plugin._io.staging import TRIALS, StagingBuffer
from ckpt_plugin._storage import directio, trash

REPO_ROOT = Path(__file__).resolve().parents[1]


def odd_sized_tensors() -> dict[str, torch.Tensor]:
    """More than one direct-I/O buffer of data, ending off any block boundary, with small tensors in between."""
    return {
        "big": torch.randn(3_000_001),
        "int8": torch.arange(13, dtype=torch.int8),
        "transposed": torch.randn(1001, 3).t(),
        "half": torch.randn(777, dtype=torch.float16),
    }


def assert_round_trip(path: Path, tensors: dict[str, torch.Tensor], record) -> None:
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    assert path.stat().st_size == record.size
    verify_file(path, record)


# ------------------------------------------------------------------ direct I/O


def test_a_large_file_goes_through_direct_io_and_reads_back_exactly(tmp_path, monkeypatch):
    used = []
    real_enable = directio.enable
    monkeypatch.setattr(directio, "enable", lambda fd: used.append(real_enable(fd)) or used[-1])
    tensors = odd_sized_tensors()
    record = write_tensor_file(tmp_path / "a.safetensors", tensors)
    assert used, "a file this large must try direct I/O"
    assert_round_trip(tmp_path / "a.safetensors", tensors, record)
    assert record.size % directio.ALIGNMENT != 0  # the padding of the last block was cut off


def test_direct_and_buffered_writes_make_the_same_file(tmp_path, monkeypatch):
    tensors = odd_sized_tensors()
    direct = write_tensor_file(tmp_path / "direct.safetensors", tensors)
    monkeypatch.setattr(directio, "enable", lambda fd: False)  # a file system without direct I/O
    buffered = write_tensor_file(tmp_path / "buffered.safetensors", tensors)
    assert direct == buffered
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()


def test_a_direct_write_the_file_system_rejects_midway_is_finished_buffered(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def picky_pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", picky_pwrite)
    tensors = odd_sized_tensors()
    record = write_tensor_file(tmp_path / "a.safetensors", tensors)
    assert len(calls) > 2
    assert_round_trip(tmp_path / "a.safetensors", tensors, record)


def test_a_failed_direct_write_is_a_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, max_checkpoints=2, keep_best=False, save_rng=False)
    manager.save({"w": torch.randn(2_000_000)}, epoch=0)
    before = (tmp_path / "epoch_0" / "model.safetensors").read_bytes()

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(StorageError, match="disk is full"):
        manager.save({"w": torch.randn(2_000_000)}, epoch=1)
    monkeypatch.undo()
    assert visible_names(tmp_path) == ["epoch_0"]
    assert hidden_dirs(tmp_path) == []
    assert (tmp_path / "epoch_0" / "model.safetensors").read_bytes() == before


def test_the_direct_io_buffers_are_reused_not_accumulated(tmp_path):
    for index in range(2 * directio.KEPT_BUFFER_SETS + 1):
        write_tensor_file(tmp_path / f"{index}.safetensors", {"w": torch.randn(2_000_000)})
    assert 1 <= len(directio._spare) <= directio.KEPT_BUFFER_SETS


# ------------------------------------------------------------------ background deletion


class HeldDeletion:
    """Holds the background deletion until released, recording what it was given."""

    def __init__(self, monkeypatch) -> None:
        self.release = threading.Event()
        self.started: list[Path] = []
        real = trash.remove_now

        def held(path: Path) -> None:
            self.started.append(path)
            assert self.release.wait(30), "the test never released the deletion"
            real(path)

        monkeypatch.setattr(trash, "remove_now", held)


@pytest.fixture
def held(monkeypatch):
    holder = HeldDeletion(monkeypatch)
    yield holder
    holder.release.set()  # even when the test failed, so that no later test finds the thread stuck
    assert trash.drain(30)


def test_a_pruned_checkpoint_leaves_the_listing_before_its_files_are_deleted(tmp_path, held):
    manager = CheckpointManager(tmp_path, max_checkpoints=1, keep_best=False, save_rng=False)
    manager.save({"w": torch.zeros(8)}, epoch=0)
    manager.save({"w": torch.ones(8)}, epoch=1)
    assert [info.epoch for info in manager.checkpoints()] == [1]
    deadline = time.monotonic() + 10
    while not held.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [path.name.split(".")[-1] for path in held.started] == ["epoch_0"]
    assert [name.startswith(".trash.") for name in hidden_dirs(tmp_path)] == [True]
    # Another manager lists only epoch_1, and its recovery may finish the deletion itself.
    assert [info.epoch for info in CheckpointManager(tmp_path, max_checkpoints=1).checkpoints()] == [1]
    held.release.set()
    manager.wait()
    assert hidden_dirs(tmp_path) == []
    assert visible_names(tmp_path) == ["epoch_1"]


def test_background_deletion_is_bounded(tmp_path, held):
    made = []
    for index in range(trash.MAX_PENDING + 3):
        path = tmp_path / f".trash.{index}.epoch_{index}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
        made.append(path)
    # The first goes to the held thread; the next MAX_PENDING wait; one more cannot wait and is
    # deleted by its caller (held too, so it calls from a helper thread).
    trash.dispose(made[0])
    deadline = time.monotonic() + 10
    while len(held.started) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    for path in made[1 : trash.MAX_PENDING + 1]:
        trash.dispose(path)
    overflow = threading.Thread(target=trash.dispose, args=(made[-2],), daemon=True)
    overflow.start()
    deadline = time.monotonic() + 10
    while len(held.started) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held.started[-1] == made[-2], "a directory beyond the bound must be deleted by its caller"
    assert overflow.is_alive()
    held.release.set()
    overflow.join(30)
    assert trash.drain(30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [made[-1].name]


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time, warnings
    import torch
    from ckpt_plugin import CheckpointManager
    from ckpt_plugin._storage import trash

    warnings.simplefilter("ignore")
    real = trash.remove_now
    mode = sys.argv[2]
    def slow(path):
        if mode == "crash":
            threading.Event().wait()  # never finishes: the process is killed meanwhile
        time.sleep(0.5)
        real(path)
    trash.remove_now = slow
    manager = CheckpointManager(sys.argv[1], max_checkpoints=1, keep_best=False, save_rng=False)
    for epoch in range(3):
        manager.save({"w": torch.full((1000,), float(epoch))}, epoch=epoch)
    print("saved", flush=True)
    if mode == "crash":
        threading.Event().wait()
    """
)


def run_script(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "saver.py"
    script.write_text(CRASH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), mode],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_a_deletion_cut_short_by_kill_9_is_finished_by_the_next_manager(tmp_path):
    process = run_script(tmp_path, "crash")
    try:
        line = process.stdout.readline()
        assert line.strip() == "saved", line
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    directory = tmp_path / "ckpt"
    assert visible_names(directory) == ["epoch_2"]
    assert any(name.startswith(".trash.") for name in hidden_dirs(directory)), "nothing was left to recover"
    manager = CheckpointManager(directory, max_checkpoints=1, keep_best=False)
    assert hidden_dirs(directory) == []
    assert torch.equal(manager.load_latest()["model"]["w"], torch.full((1000,), 2.0))


def test_interpreter_exit_waits_for_background_deletions(tmp_path):
    process = run_script(tmp_path, "exit")
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 0 and output.strip() == "saved"
    assert visible_names(tmp_path / "ckpt") == ["epoch_2"]
    assert hidden_dirs(tmp_path / "ckpt") == []


DIRECT_SAVER = textwrap.dedent(
    """
    import sys, warnings
    import torch
    from ckpt_plugin import CheckpointManager

    warnings.simplefilter("ignore")
    manager = CheckpointManager(sys.argv[1], max_checkpoints=2, keep_best=False, save_rng=False)
    version = 0
    while True:  # each file is large enough for direct I/O; killed at some point by the test
        manager.save({"w": torch.full((3_000_000,), float(version))}, epoch=version, extra={"version": version})
        print("saved", version, flush=True)
        version += 1
    """
)


def test_kill_9_during_direct_io_saves_leaves_every_listed_checkpoint_whole(tmp_path):
    script = tmp_path / "direct_saver.py"
    script.write_text(DIRECT_SAVER)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    directory = tmp_path / "ckpt"
    returned = -1
    for delay in (0.0, 0.013, 0.041):
        process = subprocess.Popen([sys.executable, str(script), str(directory)], stdout=subprocess.PIPE,
                                   text=True, env=env)
        try:
            line = process.stdout.readline()
            assert line.startswith("saved"), line
            returned = max(returned, int(line.split()[1]))
            time.sleep(delay)  # somewhere inside the next save
            process.send_signal(signal.SIGKILL)
            rest, _ = process.communicate(timeout=30)
            returned = max([returned, *(int(done.split()[1]) for done in rest.split("\n") if done)])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        manager = CheckpointManager(directory, max_checkpoints=2, keep_best=False)
        assert hidden_dirs(directory) == []
        listed = manager.checkpoints()
        assert listed and listed[-1].epoch >= returned
        for info in listed:
            loaded = manager.load(epoch=info.epoch)
            assert torch.equal(loaded["model"]["w"], torch.full((3_000_000,), float(loaded["extra"]["version"])))


# ------------------------------------------------------------------ staging copies


@pytest.mark.parametrize("method", ["memcpy", "copy_"])
def test_both_copy_methods_stage_exact_copies(method):
    tensors = {"big": torch.randn(1024, 1024), "t": torch.randn(30, 20).t(), "i": torch.arange(5)}
    staged = StagingBuffer(method=method).stage([tensors])
    for name, tensor in tensors.items():
        assert torch.equal(staged.groups[0][name], tensor)
        assert staged.groups[0][name].data_ptr() != tensor.data_ptr()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the default buffer only times methods on more than one core")
def test_the_default_staging_buffer_times_both_methods_and_keeps_the_faster():
    buffer = StagingBuffer()
    tensors = {"w": torch.randn(1 << 20)}
    buffer.stage([tensors])  # allocates the buffer: not timed
    used = []
    for _ in range(2 * TRIALS):
        used.append(buffer.method)
        buffer.stage([tensors])
    assert sorted(used) == sorted(["memcpy", "copy_"] * TRIALS)
    buffer._trials = {"memcpy": [2e-10, 3e-10], "copy_": [1e-10, 5e-10]}
    assert buffer.method == "copy_"
    buffer._trials = {"memcpy": [0.5e-10, 3e-10], "copy_": [1e-10, 5e-10]}
    assert buffer.method == "memcpy"
    with pytest.raises(ValueError, match="method"):
        StagingBuffer(method="dma")


# ------------------------------------------------------------------ the storage seam


def test_route_storage_moves_a_whole_save_through_the_wrapper_and_back_to_disk(tmp_path):
    from ckpt_plugin._storage.faults import FaultyBackend

    manager = CheckpointManager(tmp_path / "run")
    spy = manager.route_storage(lambda backend: FaultyBackend(backend))
    model = torch.nn.Linear(3, 2)
    manager.save(model, epoch=0)
    assert spy.calls["create"] >= 3 and spy.calls["close"] == spy.calls["create"], spy.calls  # every file, metadata.json too
    assert torch.equal(CheckpointManager(tmp_path / "run").load(0)["model"]["weight"], model.weight)
