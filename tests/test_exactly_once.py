"""Each sample exactly once per epoch across a preemption, in the uninterrupted run's order.

Every sample carries an id and the model records the ids of each step. A run of two epochs is
preempted with SIGTERM (``save_on_preemption``) at a step drawn at random per case, or at the first
epoch's last step (the callbacks then save at the epoch's end), and resumed in a new process; the
steps of both processes together must equal those of an uninterrupted run. Each run is a process
of its own (tests/exactly_once_worker.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdata")
pytestmark = pytest.mark.timeout(1800)  # three training processes a test, on a shared machine

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "exactly_once_worker.py"
SAMPLES, BATCH = 48, 4
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


CASES = [
    ("hf", "map", 0),
    ("hf", "map", 2),
    ("hf", "iterable", 0),
    ("hf", "iterable", 2),
    pytest.param("hf", "hf_iterable", 0, marks=pytest.mark.skipif(not HAS_DATASETS, reason="needs datasets")),
    ("lightning", "map", 0),
    ("lightning", "map", 2),
    ("lightning", "sized_iterable", 2),
    ("lightning", "iterable", 0),  # no length: Lightning reads a batch ahead, the callback saves the position before it
    ("lightning", "iterable", 2),
]
EPOCH_END_CASES = [
    ("lightning", "map", 0),  # torchdata's RandomSampler draws each epoch from a generator of its own
    ("lightning", "map", 2),
    ("hf", "map", 2),
]


def run(framework: str, kind: str, workers: int, output: Path, mode: str, step: int | None = None) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(WORKER), framework, kind, str(workers), str(output), mode]
    command += [] if step is None else [str(step)]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((output / f"{mode}.json").read_text())


def epochs(steps: list[list[int]], kind: str) -> list[list[int]]:
    ids = [sample for step in steps for sample in step]
    return [ids[start : start + SAMPLES] for start in range(0, len(ids), SAMPLES)]


def preempt_and_resume(tmp_path: Path, framework: str, kind: str, workers: int, step: int) -> tuple[dict, dict, dict]:
    full = run(framework, kind, workers, tmp_path, "full")
    preempted = run(framework, kind, workers, tmp_path, "preempt", step)
    resumed = run(framework, kind, workers, tmp_path, "resume")
    assert any("received SIGTERM" in message for message in preempted["warnings"])
    assert not any("replays" in message or "batch ahead" in message for message in resumed["warnings"])
    for epoch in epochs(full["steps"], kind):
        assert sorted(epoch) == list(range(SAMPLES))
    return full, preempted, resumed


def assert_exactly_once_in_order(full: dict, preempted: dict, resumed: dict, kind: str) -> None:
    joined = preempted["steps"] + resumed["steps"]
    for epoch in epochs(joined, kind):
        assert sorted(epoch) == list(range(SAMPLES))  # exactly once per epoch
    assert joined == full["steps"]  # and in the same order


@pytest.mark.parametrize(("framework", "kind", "workers"), CASES)
def test_a_preempted_run_sees_each_sample_once_per_epoch_in_the_uninterrupted_order(tmp_path, framework, kind, workers):
    steps_per_epoch = SAMPLES // BATCH
    step = random.Random(f"{framework}-{kind}-{workers}").randint(2, steps_per_epoch - 2)
    full, preempted, resumed = preempt_and_resume(tmp_path, framework, kind, workers, step)
    assert step <= len(preempted["steps"]) < steps_per_epoch
    assert_exactly_once_in_order(full, preempted, resumed, kind)


@pytest.mark.parametrize(("framework", "kind", "workers"), EPOCH_END_CASES)
def test_a_run_stopped_at_an_epochs_end_resumes_the_next_epoch_in_the_uninterrupted_order(tmp_path, framework, kind, workers):
    steps_per_epoch = SAMPLES // BATCH
    full, preempted, resumed = preempt_and_resume(tmp_path, framework, kind, workers, steps_per_epoch)
    assert len(preempted["steps"]) == steps_per_epoch  # saved at the first epoch's end, and stopped there
    assert_exactly_once_in_order(full, preempted, resumed, kind)
