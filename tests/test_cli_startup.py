"""The ``ckpt`` commands that read only metadata start without the heavy libraries: no torch, no
transformers, lightning or matplotlib is imported by ``--help``, ``list``, ``show``, ``versions``,
``history`` or ``verify``; each runs in a fresh interpreter over a real run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_plugin import ArtifactRegistry, CheckpointManager

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "transformers", "lightning", "matplotlib")

# Runs the command in-process, then reports its exit status, what it printed and which heavy
# libraries it imported. numpy is reported but not refused: it is light, and a few storage helpers use it.
PROBE = """
import contextlib, io, json, sys
from ckpt_plugin.cli import app
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    try:
        app(sys.argv[1:], prog_name="ckpt")
    except SystemExit as exc:
        code = exc.code or 0
    else:
        code = 0
heavy = {heavy!r}
print(json.dumps({{"code": code, "stdout": stdout.getvalue(),
                  "imported": [name for name in heavy if name in sys.modules]}}))
""".format(heavy=HEAVY)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three checkpoints, one validated and promoted version, and a second validated version."""
    directory = tmp_path_factory.mktemp("startup") / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=None, metric_for_best="loss")
    model = nn.Linear(3, 2)
    for epoch, loss in enumerate([0.9, 0.4, 0.6]):
        manager.save(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=epoch,
                     metrics={"loss": loss}, config={"width": 3})
    registry = ArtifactRegistry(directory)
    registry.validate(1, "1.0.0")
    registry.promote("1.0.0")
    registry.validate(2, "1.1.0")
    return directory


def run_probe(*args: str) -> dict:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, env=environment)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "command, expected",
    [
        (["--help"], "Inspect, verify"),
        (["list", "{run}"], "production: 1.0.0"),
        (["list", "{run}", "--json"], '"best": true'),
        (["show", "{run}", "best"], "epoch_1"),
        (["show", "{run}", "v1.1.0", "--json"], '"model_parameters": 8'),
        (["versions", "{run}"], "1.1.0"),
        (["history", "{run}"], "promote"),
        (["verify", "{run}"], "checked"),
    ],
)
def test_metadata_commands_do_not_import_torch(run: Path, command: list[str], expected: str) -> None:
    report = run_probe(*(part.format(run=run) for part in command))
    assert report["code"] == 0, report
    assert expected in report["stdout"]
    assert [name for name in report["imported"] if name != "numpy"] == [], f"{command} imported {report['imported']}"


def test_a_command_that_reads_tensors_still_works_in_a_fresh_interpreter(run: Path) -> None:
    report = run_probe("diff", str(run), "0", "1", "--json")
    assert report["code"] == 0 and json.loads(report["stdout"])["changed"] == 0
    assert "torch" in report["imported"]


def test_the_torch_free_dtype_tables_agree_with_torch() -> None:
    from ckpt_plugin._format import tensorformat

    for code, name in tensorformat._DTYPE_NAMES.items():
        dtype = getattr(torch, name, None)
        if dtype is not None:
            assert tensorformat._ITEM_SIZES[code] == dtype.itemsize, code
            assert tensorformat.dtype_of(code) is dtype and tensorformat.dtype_code(dtype, "t") == code
    assert set(tensorformat._ITEM_SIZES) == set(tensorformat._DTYPE_NAMES)


def test_importing_the_package_loads_its_machinery_on_first_use() -> None:
    code = ("import sys, ckpt_plugin; assert 'ckpt_plugin.manager' not in sys.modules; "
            "from ckpt_plugin import CheckpointManager, ArtifactRegistry, CheckpointInfo, capture_rng_state; "
            "assert ckpt_plugin.CheckpointManager is CheckpointManager; print(sorted(set(ckpt_plugin.__all__) - set(dir(ckpt_plugin))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("args, message", [(["--rounds", "2"], "--rounds: expected a whole number of at least 3, got 2"),
                                           (["--count", "0"], "--count: expected a whole number of at least 1, got 0"),
                                           (["--dir", "/nonexistent/place"], "is not an existing directory")])
def test_the_startup_benchmark_refuses_bad_arguments_before_measuring(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "cli_startup.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.slow
def test_the_startup_benchmark_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "cli_startup.py"), "--count", "20", "--rounds", "3",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert "ckpt --help - python -c pass:" in done.stdout and "ckpt list over 20 checkpoints:" in done.stdout
    assert "load average" in done.stdout and list(tmp_path.iterdir()) == []
