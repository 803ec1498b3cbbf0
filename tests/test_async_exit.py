"""An asynchronous save whose ``save()`` returned is on disk after the script simply ends.

Each case runs a fresh interpreter that saves with ``async_save=True`` and ends without ``wait()``
or ``close()``. The fault-injecting backend holds every file's creation for a while, so the write
is still running when the main thread ends and the interpreter starts to stop its thread pools.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckpt_plugin import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    from ckpt_plugin import CheckpointManager
    from ckpt_plugin._storage.faults import inject

    path, megabytes, delay, seed, fail = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

    def hold(operation, key):
        if operation == "create":
            time.sleep(delay)  # the main thread ends meanwhile

    manager = CheckpointManager(path, async_save=True, keep_best=False, save_rng=False)
    inject(manager, hook=hold, fail_on={"create": 1} if fail == "fail" else None)
    weights = torch.randn(megabytes * 2**18, generator=torch.Generator().manual_seed(seed))
    manager.save(model={"w": weights}, epoch=seed)
    print("returned", flush=True)
    """
)

CASES = [(megabytes, delay) for delay in (0.0, 0.3) for megabytes in (8, 16, 32, 8, 32)]


def run_child(path: Path, megabytes: int, delay: float, seed: int, fail: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(megabytes), str(delay), str(seed), "fail" if fail else "ok"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize(("megabytes", "delay"), CASES, ids=[f"{m}MB-delay{d}-{i}" for i, (m, d) in enumerate(CASES)])
def test_a_returned_async_save_survives_a_plain_interpreter_exit(tmp_path, megabytes, delay):
    seed = megabytes + int(delay * 10)
    done = run_child(tmp_path, megabytes, delay, seed)
    assert done.returncode == 0, done.stderr
    assert "returned" in done.stdout
    assert "cannot schedule" not in done.stderr, done.stderr
    loaded = CheckpointManager(tmp_path).load_latest()
    assert loaded is not None, f"the returned save was lost; child stderr:\n{done.stderr}"
    expected = torch.randn(megabytes * 2**18, generator=torch.Generator().manual_seed(seed))
    assert loaded["epoch"] == seed
    assert torch.equal(loaded["model"]["w"], expected)


def test_an_async_save_that_fails_at_exit_gives_a_failing_status_and_prints_the_error(tmp_path):
    done = run_child(tmp_path, 8, 0.3, 1, fail=True)
    assert "returned" in done.stdout
    assert done.returncode != 0, done.stderr
    assert "no space left on the device (injected)" in done.stderr
    assert CheckpointManager(tmp_path).load_latest() is None


CHILD_SAVES_IN_EXIT_HOOK = textwrap.dedent(
    """
    import atexit, sys
    import torch
    from ckpt_plugin import CheckpointManager

    path, async_save = sys.argv[1], sys.argv[2] == "async"
    manager = CheckpointManager(path, async_save=async_save, keep_best=False, save_rng=False)

    @atexit.register
    def save_on_the_way_out():  # after the interpreter stopped its thread pools
        weights = torch.randn(8 * 2**18, generator=torch.Generator().manual_seed(5))
        manager.save(model={"w": weights}, epoch=5)
        print("returned", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_save_made_by_an_exit_hook_is_written_without_thread_pools(tmp_path, mode):
    done = subprocess.run(
        [sys.executable, "-c", CHILD_SAVES_IN_EXIT_HOOK, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "returned" in done.stdout, done.stderr
    loaded = CheckpointManager(tmp_path).load_latest()
    assert loaded is not None, done.stderr
    assert torch.equal(loaded["model"]["w"], torch.randn(8 * 2**18, generator=torch.Generator().manual_seed(5)))
