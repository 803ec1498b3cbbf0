"""Two processes that save the same epoch at the same instant both finish, and one save wins whole."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from ckpt_plugin import CheckpointManager

REPO_ROOT = Path(__file__).resolve().parents[1]

SAVER = textwrap.dedent(
    """
    import os, sys, time, warnings
    import torch
    from ckpt_plugin import CheckpointManager

    warnings.simplefilter("ignore")
    directory, writer, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    manager = CheckpointManager(directory, max_checkpoints=None)
    model = {"w": torch.full((256, 256), float(writer)), "b": torch.full((3,), float(writer))}
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    for _ in range(5):
        manager.save(model=model, epoch=7, metrics={"loss": float(writer)}, extra={"writer": writer})
    print("done", flush=True)
    """
)


def test_two_processes_saving_one_epoch_at_once_both_complete(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    directory, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writers = [subprocess.Popen([sys.executable, str(script), str(directory), str(writer), str(go)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for writer in (1, 2)]
    try:
        for writer in writers:
            assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        go.touch()
        outcomes = [writer.communicate(timeout=120) for writer in writers]
    finally:
        for writer in writers:
            writer.kill()
    for writer, (stdout, stderr) in zip(writers, outcomes):
        assert writer.returncode == 0, stderr
        assert stdout.strip() == "done"
    manager = CheckpointManager(directory, max_checkpoints=None)
    assert [info.epoch for info in manager.checkpoints()] == [7]
    loaded = manager.load(epoch=7)
    writer = loaded["extra"]["writer"]
    assert writer in (1, 2)
    assert loaded["metrics"] == {"loss": float(writer)}
    assert torch.equal(loaded["model"]["w"], torch.full((256, 256), float(writer)))
    assert torch.equal(loaded["model"]["b"], torch.full((3,), float(writer)))
    hidden = [name for name in os.listdir(directory) if name.startswith(".") and (directory / name).is_dir()]
    assert hidden == [], f"leftovers of the two writers: {hidden}"
