"""A kill at any instant of a validation, promotion or rollback leaves a history that matches what
took effect: no event of a change that did not happen, none missing for one that did.

A fresh interpreter (:mod:`crash_workers`) makes the change and SIGKILLs itself just before its
N-th file-system call, for every N from well before the change takes effect to the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_plugin import ArtifactRegistry, CheckpointManager

from spawned_workers import SpawnedWorkers

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

CALLS_BEFORE_HISTORY = 14
"""Crash points before the history is opened: they cover the change taking effect (the rename into
place, which may not be an intercepted call) and what is written before it."""


@pytest.fixture(scope="module")
def workers():
    spawned = SpawnedWorkers()
    yield spawned
    spawned.close()


def make_template(root: Path) -> None:
    manager = CheckpointManager(root / "checkpoints", max_checkpoints=None, save_rng=False)
    for epoch in range(3):
        manager.save(model={"w": torch.full((64, 32), float(epoch))}, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    registry = ArtifactRegistry(root / "checkpoints")
    registry.validate(0, "1.0.0")
    registry.validate(1, "1.0.1")
    registry.promote("1.0.0")


def changes(history: list[dict]) -> list[tuple[str, str]]:
    return [(event["event"], event["version"]) for event in history if event["event"] != "validate"]


def assert_history_matches_state(registry: ArtifactRegistry, action: str) -> None:
    history = registry.history()
    validated = [event["version"] for event in history if event["event"] == "validate"]
    assert validated == registry.versions(), f"validate events {validated} but versions {registry.versions()}"
    production = registry.production()["version"]
    expected = [("promote", "1.0.0")]
    if action == "promote" and production == "1.0.1":
        expected.append(("promote", "1.0.1"))
    if action == "rollback":
        expected.append(("promote", "1.0.1"))
        if production == "1.0.0":
            expected.append(("rollback", "1.0.0"))
    assert changes(history) == expected, f"production is {production} but the history says {changes(history)}"


def history_index(calls: list[list[str]]) -> int:
    """The number (1-based) of the call that opens the history to append the change's event."""
    for number, call in enumerate(calls, 1):
        if call[0] == "open" and call[-1] == "history.jsonl":
            return number
    raise AssertionError(f"the change did not append to the history: {calls}")


def dry_run(workers, tmp_path: Path, action: str) -> tuple[Path, list[list[str]]]:
    """A template registry, and the file-system calls ``action`` makes on a copy of it uninterrupted."""
    template = tmp_path / "template"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_template(template)
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    status, calls = workers.run("registry_change_and_crash", str(probe), action, None)
    assert status == 0, f"the change failed without a crash: {status}"
    return template, calls


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("action", ["validate", "promote", "rollback"])
def test_a_kill_between_a_change_and_its_history_event_loses_nothing(workers, tmp_path, action):
    template, calls = dry_run(workers, tmp_path, action)
    first = max(1, history_index(calls) - CALLS_BEFORE_HISTORY)
    crashes = 0
    for crash_at in range(first, len(calls) + 2):
        root = tmp_path / f"crash_{crash_at}"
        shutil.copytree(template, root)
        status, _ = workers.run("registry_change_and_crash", str(root), action, crash_at)
        assert status == 0 or os.WIFSIGNALED(status), f"crash point {crash_at}: the change failed ({status})"
        crashes += os.WIFSIGNALED(status)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry = ArtifactRegistry(root / "checkpoints")
            assert_history_matches_state(registry, action)
            before = registry.history()
            registry.promote(registry.production()["version"])  # the next change settles what the kill left
            assert registry.history() == before, f"crash point {crash_at}: settling changed the history"
            assert_history_matches_state(registry, action)
        shutil.rmtree(root)
    assert crashes >= len(calls) - first - 2, "the child was not killed at the crash points"


def temporaries(calls: list[list[str]]) -> list[int]:
    """The numbers (1-based) of the calls that end a temporary's life: the link of the intent's
    temporary file into place and its unlink, and the removal of a probe directory."""
    return [number for number, call in enumerate(calls, 1) if len(call) > 1 and call[1].startswith(".tmp.") and (
        (call[0] in ("link", "unlink") and call[1].endswith("history-intent.json"))
        or (call[0] == "rmdir" and call[1].endswith((".probe", ".production"))))]


@pytest.mark.slow
@pytest.mark.parametrize("action", ["validate", "promote", "rollback"])
def test_a_kill_while_a_temporary_exists_leaves_none_after_the_next_change(workers, tmp_path, action):
    """The intent is published through a temporary file beside it, and writability is proven by a
    probe directory in validated/ and beside production/. A writer killed while one of them exists
    leaves it for the next change to remove, wherever it is."""
    template, calls = dry_run(workers, tmp_path, action)
    crash_points = temporaries(calls)
    assert len(crash_points) >= 3 + (action != "validate"), f"the change made no temporaries: {calls}"
    for crash_at in crash_points:
        root = tmp_path / f"crash_{crash_at}"
        shutil.copytree(template, root)
        status, _ = workers.run("registry_change_and_crash", str(root), action, crash_at)
        assert os.WIFSIGNALED(status), f"crash point {crash_at}: the child was not killed ({status})"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry = ArtifactRegistry(root / "checkpoints")
            registry.promote(registry.production()["version"])  # the next change cleans up after dead writers
            assert_history_matches_state(registry, action)
        left = sorted(name for place in (root, root / "validated") for name in os.listdir(place) if name.startswith(".tmp."))
        assert left == [], f"crash point {crash_at} ({calls[crash_at - 1]}): a temporary stayed after the next change"
