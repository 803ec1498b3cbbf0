"""kill -9 at any instant leaves every listed checkpoint loadable and never hides a returned save.

Two complementary tests:

* Random kills: a child process saves in a loop and reports each save that returned; it is
  killed with SIGKILL at random moments, many times, over one directory. After each kill a fresh
  manager must load every listed checkpoint, with the content of its epoch, and the latest must
  be at least the last save that returned. Leftover staging directories are cleaned up.
* Every crash point: a forked child kills itself with SIGKILL just before or just after the N-th
  file-system call of one save, for every N, both for a new epoch and for a re-saved one.

To keep process start-up out of the loop, the saving processes are forked from a parent that has
already imported torch.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_plugin import CheckpointManager

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

REPO_ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import os, sys, warnings
    import torch
    from ckpt_plugin import CheckpointManager

    warnings.simplefilter("ignore")

    def state(version):
        value = float(version)
        model = {"w": torch.full((512, 1024), value), "b": torch.full((7,), value, dtype=torch.float64)}
        optimizer = {"state": {0: {"m": torch.full((512, 1024), value), "step": torch.tensor(value)}},
                     "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}
        return model, optimizer

    def work(mode, directory):
        manager = CheckpointManager(directory, max_checkpoints=3, keep_best=True, metric_for_best="loss", mode="min")
        if mode == "append":
            latest = manager.latest()
            version = 0 if latest is None else latest.epoch + 1
        else:
            checkpoint = manager.load_latest()
            version = 0 if checkpoint is None else checkpoint["extra"]["version"] + 1
        while True:
            model, optimizer = state(version)
            epoch = version if mode == "append" else 0
            manager.save(model=model, optimizer=optimizer, epoch=epoch,
                         metrics={"loss": 1.0 / (version + 1)}, extra={"version": version})
            os.write(1, f"saved {version}\\n".encode())
            version += 1

    for line in sys.stdin:
        mode, directory = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                work(mode, directory)
            finally:
                os._exit(1)
        os.write(1, f"pid {pid}\\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(1, f"exit {status}\\n".encode())
    """
)


class SaverParent:
    """A process that forks saving workers on request and reports what they print."""

    def __init__(self, script: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.process = subprocess.Popen([sys.executable, "-u", str(script)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def next_line(self, timeout: float = 60.0) -> str:
        return self.lines.get(timeout=timeout)

    def start(self, mode: str, directory: Path) -> int:
        self.process.stdin.write(f"{mode} {directory}\n")
        self.process.stdin.flush()
        saved = []
        while True:
            line = self.next_line()
            if line.startswith("pid "):
                return int(line.split()[1])
            saved.append(line)  # pragma: no cover - nothing is printed before the pid

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def saver(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(WORKER)
    parent = SaverParent(script)
    yield parent
    parent.close()


def kill_at_random(saver: SaverParent, mode: str, directory: Path, rng: random.Random) -> list[int]:
    """Start a worker, kill it with SIGKILL at a random moment, return the versions it saved."""
    pid = saver.start(mode, directory)
    saved: list[int] = []
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.0, 0.05))  # often in the middle of the first save
    else:
        wanted = rng.randint(1, 3)
        while len(saved) < wanted:
            line = saver.next_line()
            assert line.startswith("saved "), f"the worker stopped on its own: {line}"
            saved.append(int(line.split()[1]))
        time.sleep(rng.uniform(0.0, 0.04))
    os.kill(pid, signal.SIGKILL)
    while True:
        line = saver.next_line()
        if line.startswith("exit"):
            assert os.WIFSIGNALED(int(line.split()[1])), f"the worker was not killed: {line}"
            return saved
        assert line.startswith("saved "), line
        saved.append(int(line.split()[1]))


def fresh_manager(directory: Path) -> CheckpointManager:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh manager must find nothing odd in the directory
        return CheckpointManager(directory, max_checkpoints=3, keep_best=True, metric_for_best="loss")


def assert_consistent(checkpoint: dict, version: int) -> None:
    """Every part of the checkpoint comes from the same save (never a torn mix)."""
    assert checkpoint["extra"]["version"] == version
    assert checkpoint["metrics"] == {"loss": 1.0 / (version + 1)}
    assert torch.equal(checkpoint["model"]["w"], torch.full((512, 1024), float(version)))
    assert torch.equal(checkpoint["model"]["b"], torch.full((7,), float(version), dtype=torch.float64))
    assert torch.equal(checkpoint["optimizer"]["state"][0]["m"], torch.full((512, 1024), float(version)))


def assert_no_leftovers(directory: Path) -> None:
    hidden = [name for name in os.listdir(directory) if name.startswith(".") and (directory / name).is_dir()]
    assert hidden == [], f"leftovers of killed writers were not cleaned up: {hidden}"


@pytest.mark.slow
def test_random_kill_9_while_saving_new_epochs(saver, tmp_path):
    directory = tmp_path / "run"
    rng = random.Random(20261126)
    last_returned = -1
    kills = interrupted = 0
    observer = fresh_manager(directory)
    while kills < 24:
        saved = kill_at_random(saver, "append", directory, rng)
        kills += 1
        if saved:
            assert saved == list(range(saved[0], saved[-1] + 1))
            # A save can commit and be killed before it reports, so the next run may start later.
            assert saved[0] > last_returned, "the worker did not resume after the last returned save"
            last_returned = saved[-1]
        interrupted += bool(directory.exists() and any(n.startswith(".") for n in os.listdir(directory)))
        # A manager that was already open (so did not clean up) ignores what the killed writer left.
        for info in observer.checkpoints():
            assert_consistent(observer.load(epoch=info.epoch, step=info.step), info.epoch)
        manager = fresh_manager(directory)
        listed = manager.checkpoints()
        if last_returned >= 0:
            assert listed and listed[-1].epoch >= last_returned, (
                f"kill {kills}: the save of epoch {last_returned} returned but the latest is "
                f"{listed[-1].epoch if listed else None}"
            )
        for info in listed:
            assert_consistent(manager.load(epoch=info.epoch), info.epoch)
        assert len(listed) <= 5
        assert_no_leftovers(directory)
    print(f"{kills} kills, {interrupted} in the middle of a save, last returned epoch {last_returned}")
    assert kills >= 20 and last_returned >= 10, "the kills did not interrupt enough saves"


@pytest.mark.slow
def test_random_kill_9_while_resaving_the_same_epoch(saver, tmp_path):
    directory = tmp_path / "replace"
    rng = random.Random(7)
    last_returned = -1
    for kill in range(20):
        saved = kill_at_random(saver, "replace", directory, rng)
        if saved:
            last_returned = saved[-1]
        manager = fresh_manager(directory)
        listed = manager.checkpoints()
        if last_returned < 0:
            assert len(listed) <= 1
            continue
        assert [info.name for info in listed] == ["epoch_0"], f"kill {kill}: listed {listed}"
        checkpoint = manager.load(epoch=0)
        assert checkpoint["extra"]["version"] >= last_returned
        assert_consistent(checkpoint, checkpoint["extra"]["version"])
        last_returned = checkpoint["extra"]["version"]
        assert_no_leftovers(directory)
        assert [name for name in os.listdir(directory) if not name.startswith(".")] == ["epoch_0"]
    assert last_returned >= 10


# ------------------------------------------------------------------ every crash point of one save

INTERCEPTED = ("open", "write", "pwrite", "writev", "fsync", "fdatasync", "close", "mkdir", "rename",
               "replace", "unlink", "rmdir", "ftruncate", "link", "symlink")


def state_of(version: int) -> tuple[dict, dict]:
    value = float(version)
    model = {"w": torch.full((64, 64), value), "tied": torch.full((3,), value)}
    model["tied_again"] = model["tied"]
    optimizer = {"state": {0: {"m": torch.full((64, 64), value)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return model, optimizer


def save_version(manager: CheckpointManager, version: int, epoch: int) -> None:
    model, optimizer = state_of(version)
    manager.save(model=model, optimizer=optimizer, epoch=epoch, metrics={"loss": LOSSES.get(version, 0.2)},
                 extra={"version": version})


LOSSES = {0: 0.1, 1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 13: 0.05}


def open_manager(directory: Path) -> CheckpointManager:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CheckpointManager(directory, max_checkpoints=3, keep_best=True, metric_for_best="loss", mode="min",
                                 save_rng=False)


def run_in_child(directory: Path, version: int, epoch: int, crash_at: int | None, after: bool) -> tuple[int, int]:
    """Fork a child that saves and SIGKILLs itself at the ``crash_at``-th intercepted call.

    Returns ``(exit status, calls made)``; the count is reported through a pipe when no crash happens.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            manager = open_manager(directory)
            calls = [0]
            real = {name: getattr(os, name) for name in INTERCEPTED if hasattr(os, name)}
            raw_write = os.write

            def wrap(name, function):
                def intercepted(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == crash_at and not after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    result = function(*args, **kwargs)
                    if calls[0] == crash_at and after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return result
                return intercepted

            for name, function in real.items():
                setattr(os, name, wrap(name, function))
            save_version(manager, version, epoch)
            for name, function in real.items():
                setattr(os, name, function)
            raw_write(write_end, str(calls[0]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        reported = reader.read()
    _, status = os.waitpid(pid, 0)
    return status, int(reported or b"0")


def check_after_crash(directory: Path, old_versions: dict[int, int], new_epoch: int, new_version: int,
                      may_be_pruned: set[int]) -> None:
    manager = open_manager(directory)
    assert_no_leftovers(directory)
    listed = {info.epoch: info for info in manager.checkpoints()}
    for epoch, info in listed.items():
        checkpoint = manager.load(epoch=epoch)
        version = checkpoint["extra"]["version"]
        model, optimizer = state_of(version)
        assert torch.equal(checkpoint["model"]["w"], model["w"]) and torch.equal(checkpoint["model"]["tied"], model["tied"])
        assert torch.equal(checkpoint["optimizer"]["state"][0]["m"], optimizer["state"][0]["m"])
        expected = {old_versions.get(epoch), new_version if epoch == new_epoch else None} - {None}
        assert version in expected, f"epoch {epoch} holds version {version}, expected one of {expected}"
    committed = new_epoch in listed and listed[new_epoch].metrics == {"loss": LOSSES.get(new_version, 0.2)}
    required = set(old_versions) - (may_be_pruned if committed else set())
    assert required <= set(listed), f"lost checkpoints {sorted(required - set(listed))} (committed={committed})"


@pytest.mark.parametrize("scenario", ["new_epoch", "resave_epoch"])
def test_kill_9_at_every_file_system_call_of_a_save(tmp_path, scenario):
    template = tmp_path / "template"
    manager = open_manager(template)
    for version in range(4):
        save_version(manager, version, epoch=version)
    old_versions = {0: 0, 1: 1, 2: 2, 3: 3}
    if scenario == "new_epoch":
        new_epoch, new_version, may_be_pruned = 4, 4, {1}  # keeps 2, 3, 4 and the best, 0
    else:
        new_epoch, new_version, may_be_pruned = 3, 13, {0}  # 13 becomes the best: keeps 1, 2, 3

    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    status, total = run_in_child(probe, new_version, new_epoch, None, False)
    assert status == 0 and total > 10, f"the save made only {total} intercepted calls"

    crashes = 0
    for crash_at in range(1, total + 1):
        for after in (False, True):
            directory = tmp_path / f"crash_{crash_at}_{int(after)}"
            shutil.copytree(template, directory)
            status, _ = run_in_child(directory, new_version, new_epoch, crash_at, after)
            if os.WIFSIGNALED(status):
                crashes += 1
            check_after_crash(directory, old_versions, new_epoch, new_version, may_be_pruned)
            shutil.rmtree(directory)
    assert crashes >= total, "the child was not killed at the crash points"
