"""How fast the ``ckpt`` command starts: ``--help`` and ``list`` over 1,000 checkpoints, against ``python -c pass``.

    PYTHONPATH=. python benchmarks/cli_startup.py [--count 1000] [--rounds 9] [--dir PARENT]

Each command runs in a new process, exactly as the ``ckpt`` console script runs it (same
interpreter, ``from ckpt_plugin.cli import main``). A round runs every command once, taking turns,
so drifting load on a shared machine hits them alike; the figures are the median, minimum and
maximum over ``--rounds`` rounds after an untimed warm-up round. The CPU time (user + system) of
each process is given too: a busy machine inflates it much less than wall time.

The checkpoints are built cheaply: one real save of a tiny model, then copies of its directory
whose ``metadata.json`` is rewritten with their own epoch, step and metrics (an HF-style run: the
ranking metric, a user metric and the runtime counters). ``list`` is timed twice: as a user runs it
(the directory's listing cache, ``.listing.json``, written by an earlier listing) and cold (the
cache deleted before each run, so all 1,000 ``metadata.json`` files are parsed).

Targets: ``ckpt --help`` within 0.3 s of ``python -c pass``, and ``ckpt list`` over 1,000
checkpoints within 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine

HELP_TARGET_S = 0.3
LIST_TARGET_S = 1.0
CKPT = "import sys; from ckpt_plugin.cli import main; sys.argv[0] = 'ckpt'; sys.exit(main())"
"""What the ``ckpt`` console script runs."""


def populate(root: Path, count: int) -> Path:
    """``count`` checkpoints of a tiny model under ``root/checkpoints``."""
    import torch
    from torch import nn

    from ckpt_plugin import CheckpointManager
    from ckpt_plugin._checkpoint import METADATA_CHECKSUM_KEY, METADATA_FILE, checkpoint_name, metadata_checksum

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    manager = CheckpointManager(root / "checkpoints", max_checkpoints=None, metric_for_best="eval_loss")
    info = manager.save(model, epoch=0, step=0, metrics={"eval_loss": 2.0})
    template = json.loads((info.path / METADATA_FILE).read_text())
    for index in range(1, count):
        step = 10 * index
        target = root / "checkpoints" / checkpoint_name(index, step)
        shutil.copytree(info.path, target)
        metrics = {"eval_loss": 2.0 / (1 + index % 97), "eval_accuracy": index / count, "eval_runtime": 1.5,
                   "eval_samples_per_second": 400.0, "eval_steps_per_second": 50.0, "epoch": float(index)}
        metadata = dict(template, epoch=index, step=step, metrics=metrics)
        metadata[METADATA_CHECKSUM_KEY] = metadata_checksum(metadata)
        (target / METADATA_FILE).write_text(json.dumps(metadata, separators=(",", ":")))
    return root / "checkpoints"


def timed(command: list[str], before: object = None) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``command``, which must succeed."""
    if callable(before):
        before()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
    return wall, (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)


def at_least(minimum: int):  # noqa: ANN201 - an argparse type
    """An argparse type: a whole number of at least ``minimum``, refused before anything runs."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {value}")
        return value

    return parse


def directory(text: str) -> Path:
    """An argparse type: an existing directory."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not an existing directory")
    return Path(text)


def summary(samples: list[float]) -> str:
    return f"{statistics.median(samples):6.3f} s ({min(samples):.3f}-{max(samples):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=at_least(1), default=1000, help="checkpoints in the listed directory")
    parser.add_argument("--rounds", type=at_least(3), default=9, help="timed rounds after the warm-up")
    parser.add_argument("--dir", type=directory, default=None, help="where to put the scratch directory")
    args = parser.parse_args()
    print(machine())
    python = sys.executable
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        run = populate(Path(scratch), args.count)
        cache = run / ".listing.json"
        commands = {
            "python -c pass": ([python, "-c", "pass"], None),
            "ckpt --help": ([python, "-c", CKPT, "--help"], None),
            f"ckpt list ({args.count}, cached)": ([python, "-c", CKPT, "list", str(run)], None),
            f"ckpt list ({args.count}, cold)": ([python, "-c", CKPT, "list", str(run)], lambda: cache.unlink(missing_ok=True)),
        }
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        for round_index in range(args.rounds + 1):
            for name, (command, before) in commands.items():
                wall, cpu = timed(command, before)
                if round_index:
                    walls[name].append(wall)
                    cpus[name].append(cpu)
        # the cold runs left the cache rewritten, so the cached runs of the next round found one
        print(f"median (min-max) of {args.rounds} rounds after a warm-up; each command in a new process")
        print(f"{'command':<28}{'wall':>26}{'cpu':>26}{'wall - pass':>14}")
        base = statistics.median(walls["python -c pass"])
        for name in commands:
            extra = statistics.median(walls[name]) - base
            print(f"{name:<28}{summary(walls[name]):>26}{summary(cpus[name]):>26}{extra:>12.3f} s")
        help_extra = statistics.median(walls["ckpt --help"]) - base
        listed = statistics.median(walls[f"ckpt list ({args.count}, cached)"])
        print(f"ckpt --help - python -c pass: {help_extra:.3f} s (target {HELP_TARGET_S} s: "
              f"{'met' if help_extra <= HELP_TARGET_S else 'missed'})")
        print(f"ckpt list over {args.count} checkpoints: {listed:.3f} s (target {LIST_TARGET_S} s: "
              f"{'met' if listed <= LIST_TARGET_S else 'missed'})")
    print(f"load average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
