"""Tiered checkpoints killed with SIGKILL in fresh interpreters, against the moto S3 server: every
save that returned exists complete in at least one tier, nothing half-uploaded is visible, and the
next process resumes the pending uploads."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_plugin._io.reader import read_info
from ckpt_plugin._reading import read_checkpoint
from ckpt_plugin._storage import open_store

from spawned_workers import TESTS_DIR, SpawnedWorkers
from tiered_workers import state
from core_helpers import assert_same_tree


@pytest.fixture
def workers(s3_env: str) -> Iterator[SpawnedWorkers]:
    spawned = SpawnedWorkers(TESTS_DIR / "tiered_workers.py")  # made after s3_env: the children reach moto
    try:
        yield spawned
    finally:
        spawned.close()


def kill_when(workers: SpawnedWorkers, wanted: set[str]) -> list[str]:
    """Read the child's lines until every one of ``wanted`` was printed, then SIGKILL it."""
    seen: list[str] = []
    while not wanted <= set(seen):
        line = workers.next_line(timeout=120)
        assert not line.startswith("exit"), f"the child ended early: {line} after {seen}"
        seen.append(line)
    assert workers.process is not None
    os.killpg(workers.process.pid, signal.SIGKILL)
    status, _ = workers.wait(timeout=60)
    assert status == signal.SIGKILL
    return seen


def durable_names(url: str) -> list[str]:
    store = open_store(url)
    return sorted(entry.name for entry in store.visible())


@pytest.mark.parametrize("later_saves", [0, 3], ids=["kill-mid-upload", "killed-uploader-while-saves-return"])
def test_a_kill_during_an_upload_then_a_resume_completes_it(
    tmp_path: Path, s3_bucket: str, workers: SpawnedWorkers, later_saves: int
) -> None:
    url = f"s3://{s3_bucket}/run/checkpoints"
    local_dir = str(tmp_path / "local")
    count = 2 + later_saves
    workers.start("save_while_upload_stalls", local_dir, url, count, "epoch_1")
    kill_when(workers, {"uploading epoch_1", *(f"saved {epoch}" for epoch in range(count))})
    assert durable_names(url) == ["epoch_0"]  # the killed upload is not visible
    for epoch in range(1, count):  # every save that returned is complete in local_dir
        info = read_info(Path(local_dir) / f"epoch_{epoch}")
        assert_same_tree(state(epoch), read_checkpoint(info)["model"])
    status, held = workers.run("resume", local_dir, url, timeout=180)
    assert status == 0
    every = [f"epoch_{epoch}" for epoch in range(count)]
    assert held == {"durable": every, "local": [f"epoch_{count - 1}"], "pending": []}
    store = open_store(url)
    newest = read_info(store.location(f"epoch_{count - 1}"), store.backend)
    assert_same_tree(state(count - 1), read_checkpoint(newest)["model"])
