"""The examples run end to end: interrupted, resumed bitwise identically, promoted, and served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, tmp_path: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES.parent), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--dir", str(tmp_path / "run" / "checkpoints")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.py", "lightning_train.py", "hf_train.py"])
def test_example_resumes_exactly_and_serves_a_promoted_model(name: str, tmp_path: Path) -> None:
    output = run_example(name, tmp_path)
    assert "identical to an uninterrupted run: True" in output
    assert "production is version 0.1.0" in output
