"""kill -9 at any instant leaves every listed checkpoint loadable and never hides a returned save.

Two complementary tests:

* Random kills: a child process saves in a loop and reports each save that returned; it is
  killed with SIGKILL at random moments, many times, over one directory. After each kill a fresh
  manager must load every listed checkpoint, with the content of its epoch, and the latest must
  be at least the last save that returned. Leftover staging directories are cleaned up.
* Every crash point: a child kills itself with SIGKILL just before or just after the N-th
  file-system call of one save, for every N, both for a new epoch and for a re-saved one.

Every saving process is a fresh interpreter (:mod:`spawned_workers`); nothing is forked, so no child
inherits a locked OpenMP pool.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_plugin import CheckpointManager

import crash_workers
from spawned_workers import SpawnedWorkers

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

@pytest.fixture(scope="module")
def saver():
    workers = SpawnedWorkers()
    yield workers
    workers.close()


def kill_at_random(saver: SpawnedWorkers, mode: str, directory: Path, rng: random.Random) -> list[int]:
    """Start a worker, kill it with SIGKILL at a random moment, return the versions it saved."""
    pid = saver.start("save_forever", mode, str(directory))
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
        ended = saver.parse_exit(line)
        if ended is not None:
            assert os.WIFSIGNALED(ended[0]), f"the worker was not killed: {line}"
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


def test_a_kill_while_the_listing_cache_is_written_leaves_nothing_after_the_next_open(saver, tmp_path):
    directory = tmp_path / "run"
    manager = fresh_manager(directory)
    save_version(manager, 0, epoch=0)
    status, _ = saver.run("save_listing_and_crash", str(directory))
    assert os.WIFSIGNALED(status), f"the child was not killed ({status})"
    assert any(name.startswith(".") and name != ".saves.jsonl" for name in os.listdir(directory)), "no temporary to clean up"
    fresh_manager(directory)
    assert sorted(name for name in os.listdir(directory) if name.startswith(".")) == [".saves.jsonl"]


# ------------------------------------------------------------------ every crash point of one save

def state_of(version: int) -> tuple[dict, dict]:
    return crash_workers.small_state(version)


def open_manager(directory: Path) -> CheckpointManager:
    return crash_workers.open_manager(str(directory))


def save_version(manager: CheckpointManager, version: int, epoch: int) -> None:
    crash_workers.save_version(manager, version, epoch)


LOSSES = crash_workers.LOSSES


def run_in_child(saver: SpawnedWorkers, directory: Path, version: int, epoch: int, crash_at: int | None,
                 after: bool) -> tuple[int, int]:
    """Save in a child that SIGKILLs itself at the ``crash_at``-th intercepted call.

    Returns ``(wait status, calls made)``; the count is reported only when no crash happens.
    """
    status, calls = saver.run("save_and_crash", str(directory), version, epoch, crash_at, after)
    return status, calls or 0


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


@pytest.mark.slow
@pytest.mark.timeout(900)  # a fresh interpreter for each of ~100 crash points
@pytest.mark.parametrize("scenario", ["new_epoch", "resave_epoch"])
def test_kill_9_at_every_file_system_call_of_a_save(saver, tmp_path, scenario):
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
    status, total = run_in_child(saver, probe, new_version, new_epoch, None, False)
    assert status == 0 and total > 10, f"the save made only {total} intercepted calls"

    crashes = 0
    beside = SpawnedWorkers()  # the crash after the call runs beside the crash before it
    try:
        for crash_at in range(1, total + 1):
            directories = [tmp_path / f"crash_{crash_at}_{int(after)}" for after in (False, True)]
            for directory, workers, after in zip(directories, (saver, beside), (False, True)):
                shutil.copytree(template, directory)
                workers.launch("save_and_crash", str(directory), new_version, new_epoch, crash_at, after)
            for directory, workers in zip(directories, (saver, beside)):
                status, _ = workers.wait()
                crashes += os.WIFSIGNALED(status)
                check_after_crash(directory, old_versions, new_epoch, new_version, may_be_pruned)
                shutil.rmtree(directory)
    finally:
        beside.close()
    assert crashes >= total, "the child was not killed at the crash points"
