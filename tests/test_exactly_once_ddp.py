"""Each sample exactly once per epoch across a preemption of a DDP run (2 gloo ranks on CPU).

Every sample carries an id and each rank records the ids of its steps. A run of two epochs is
preempted with SIGTERM (``save_on_preemption``) at a step drawn at random per case and resumed in
new processes. Per epoch, the ids of both ranks together are each sample exactly once, and each
rank's steps equal those of the uninterrupted run. The ranks are processes of their own
(tests/exactly_once_ddp_worker.py): Lightning starts its second rank itself, the Trainer's ranks
are started by ``torch.distributed.run``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdata")
pytestmark = pytest.mark.timeout(1800)  # three runs of two ranks a test, on a shared machine

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "exactly_once_ddp_worker.py"
SAMPLES, BATCH, RANKS = 48, 4, 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(framework: str, output: Path, mode: str, processes: int = RANKS, step: int | None = None,
        sampler: str = "default") -> list[dict]:
    """Run ``mode`` with ``processes`` ranks and return each rank's report, by rank."""
    output.mkdir(parents=True, exist_ok=True)
    arguments = [framework, str(output), mode, str(processes), sampler] + ([] if step is None else [str(step)])
    port = free_port()
    if framework == "hf":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port), str(WORKER), *arguments]
    else:
        command = [sys.executable, str(WORKER), *arguments]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run(command, env=env, cwd=output, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((output / f"{mode}-rank{rank}.json").read_text()) for rank in range(processes)]


def epochs(steps: list[list[int]], per_rank: int) -> list[list[int]]:
    ids = [sample for step in steps for sample in step]
    return [ids[start : start + per_rank] for start in range(0, len(ids), per_rank)]


def assert_each_sample_once_per_epoch(ranks: list[list[list[int]]]) -> None:
    """``ranks``: each rank's steps over the whole run; per epoch their ids together are every sample once."""
    per_rank = SAMPLES // len(ranks)
    split = [epochs(steps, per_rank) for steps in ranks]
    assert len({len(epochs_of_rank) for epochs_of_rank in split}) == 1
    for epoch in zip(*split):
        assert sorted(sample for ids in epoch for sample in ids) == list(range(SAMPLES))


@pytest.mark.parametrize(("framework", "sampler"), [("lightning", "distributed"), ("lightning", "resumable"), ("hf", "default")])
def test_a_preempted_ddp_run_sees_each_sample_once_per_epoch_in_the_uninterrupted_order(tmp_path, framework, sampler):
    steps_per_epoch = SAMPLES // BATCH // RANKS
    step = random.Random(f"ddp-{framework}-{sampler}").randint(2, steps_per_epoch - 2)
    full = run(framework, tmp_path / "full", "full", sampler=sampler)
    preempted = run(framework, tmp_path / "run", "preempt", step=step, sampler=sampler)
    resumed = run(framework, tmp_path / "run", "resume", sampler=sampler)

    assert_each_sample_once_per_epoch([report["steps"] for report in full])
    for rank in range(RANKS):
        assert any("received SIGTERM" in message for message in preempted[rank]["warnings"]) or rank > 0
        assert not any("replays" in message for message in resumed[rank]["warnings"])
        assert step <= len(preempted[rank]["steps"]) < steps_per_epoch
        assert preempted[rank]["steps"] + resumed[rank]["steps"] == full[rank]["steps"]  # each rank's order
    assert_each_sample_once_per_epoch([preempted[rank]["steps"] + resumed[rank]["steps"] for rank in range(RANKS)])


def split_epochs(steps: list[list[int]], first: int, per_epoch: int) -> list[list[int]]:
    """A rank's ids by epoch, the first epoch holding ``first`` of them."""
    ids = [sample for step in steps for sample in step]
    return [ids[:first]] + [ids[start : start + per_epoch] for start in range(first, len(ids), per_epoch)]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_lightning_resumes_an_epoch_at_another_world_size_with_each_sample_once(tmp_path, before, after):
    """A ResumableDistributedSampler splits the rest of the interrupted epoch over the new ranks."""
    steps_per_epoch = SAMPLES // BATCH // before
    step = random.Random(f"resize-{before}-{after}").randint(2, steps_per_epoch - 2)
    preempted = run("lightning", tmp_path, "preempt", processes=before, step=step, sampler="resumable")
    resumed = run("lightning", tmp_path, "resume", processes=after, sampler="resumable")

    trained = [sample for report in preempted for step_ids in report["steps"] for sample in step_ids]
    assert all(step <= len(report["steps"]) < steps_per_epoch for report in preempted)
    left = (SAMPLES - len(trained)) // after
    resumed_epochs = [split_epochs(report["steps"], left, SAMPLES // after) for report in resumed]
    assert [len(epochs_of_rank) for epochs_of_rank in resumed_epochs] == [2] * after
    first = trained + [sample for epochs_of_rank in resumed_epochs for sample in epochs_of_rank[0]]
    assert sorted(first) == list(range(SAMPLES))  # no repeat, no drop across the change
    assert sorted(sample for epochs_of_rank in resumed_epochs for sample in epochs_of_rank[1]) == list(range(SAMPLES))
    assert not any("replays" in message for report in resumed for message in report["warnings"])


def test_lightning_says_when_ddp_shards_a_sampler_whose_order_a_resume_cannot_draw_again(tmp_path):
    """StatefulDataLoader(shuffle=True) under DDP: Lightning wraps torchdata's RandomSampler in a
    DistributedSamplerWrapper, which keeps no position; the resumed epoch repeats and misses samples."""
    run("lightning", tmp_path, "preempt", step=2, sampler="default")
    resumed = run("lightning", tmp_path, "resume", sampler="default")
    assert any("DistributedSamplerWrapper" in message and "ResumableDistributedSampler" in message
               for message in resumed[0]["warnings"])
