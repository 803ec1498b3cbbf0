"""The benchmarks refuse, with a usage error, arguments they cannot run with: before measuring anything."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_common():  # type: ignore[no-untyped-def]
    if str(BENCHMARKS) not in sys.path:  # as when a benchmark runs: its folder is on the path
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_benchmark_takes_an_unchecked_number():
    unchecked = []
    for script in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(), str(script))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                for keyword in node.keywords:
                    if keyword.arg == "type" and isinstance(keyword.value, ast.Name) and keyword.value.id in ("int", "float"):
                        unchecked.append(f"{script.name}: {ast.unparse(node.args[0])}")
    assert unchecked == [], "use _common.whole_number (or another checking type) for these options"


def test_whole_number_and_existing_dir(tmp_path):
    common = load_common()
    args = sys.modules["_args"]
    assert args.number_between(0.0, 1.0)("0.25") == 0.25
    assert common.whole_number()("3") == 3 and common.whole_number(0)("0") == 0
    assert common.whole_number(3, or_zero=True)("0") == 0 and common.whole_number(4, multiple_of=4)("8") == 8
    for parse, text, message in [
        (common.whole_number(), "0", "expected a whole number of at least 1, got 0"),
        (common.whole_number(), "2.5", "expected a whole number of at least 1, got '2.5'"),
        (common.whole_number(3, or_zero=True), "2", r"at least 3 \(or 0\), got 2"),
        (common.whole_number(4, multiple_of=4), "6", "that is a multiple of 4, got 6"),
        (common.existing_dir, str(tmp_path / "missing"), "is not an existing directory"),
        (args.number_between(0.0, 1.0), "1.5", "expected a number from 0.0 to 1.0, got 1.5"),
        (args.number_between(0.0, 1.0), "nan", "got nan"),
        (args.number_between(0.0), "-0.2", "at least 0.0, got -0.2"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    assert common.existing_dir(str(tmp_path)) == tmp_path


@pytest.mark.slow
def test_lightning_overhead_refuses_too_few_hook_epochs_before_it_measures(tmp_path):
    pytest.importorskip("lightning")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "lightning_overhead.py"), "--hook-epochs", "3", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "argument --hook-epochs: expected a whole number of at least 7, got 3" in done.stderr
    assert not list(tmp_path.iterdir()), "nothing was measured"
