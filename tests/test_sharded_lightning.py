"""The Lightning callback under ModelParallelStrategy (FSDP2): two CPU processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

pytest.importorskip("lightning")

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("where", ["local", "s3"])
def test_fit_resumes_a_sharded_run_exactly(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    base = f"s3://{request.getfixturevalue('s3_bucket')}" if where == "s3" else None  # the ranks inherit the AWS_* environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "lightning_sharded_script.py"), str(tmp_path), *([base] if base else [])],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    straight = safetensors.torch.load_file(str(tmp_path / "straight.safetensors"))
    resumed = safetensors.torch.load_file(str(tmp_path / "resumed.safetensors"))
    first = safetensors.torch.load_file(str(tmp_path / "first.safetensors"))
    assert straight.keys() == resumed.keys() and any(key.startswith("optim/") for key in straight)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight), "the resumed run diverged"
    assert any(not torch.equal(straight[key], first[key]) for key in straight)
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("straight", "first", "resumed")}
    assert reports["resumed"] == {**reports["straight"]}
    assert reports["first"]["checkpoints"] == ["epoch_0_step_4", "epoch_1_step_8"]
    from ckpt_plugin import CheckpointManager

    manager = CheckpointManager(f"{base}/run" if base else tmp_path / "run")
    latest = manager.latest()
    assert latest is not None and latest.name == "epoch_3_step_16"
    assert sorted(name for name in latest.files if "-r" in name and name.endswith(".safetensors")) == [
        "model-r0-of-2.safetensors", "model-r1-of-2.safetensors", "optim-r0-of-2.safetensors", "optim-r1-of-2.safetensors",
    ]
    loaded = manager.load_latest()
    assert all(torch.equal(loaded["model"][key.removeprefix("model/")], value)
               for key, value in straight.items() if key.startswith("model/"))
    assert loaded["extra"]["lightning"]["epoch"] == 3
