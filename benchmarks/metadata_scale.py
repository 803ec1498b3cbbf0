"""Metadata at scale: listing, best-checkpoint selection and retention over 1,000 checkpoints.

    PYTHONPATH=. python benchmarks/metadata_scale.py [--count 1000] [--rounds 5]

One real checkpoint of a small model is saved (with a config of 60 keys and the full provenance,
as a Hugging Face run records them); the other ``--count - 1`` are copies of its directory whose
``metadata.json`` is rewritten with their own epoch and metrics. Each operation is timed in a new
process (a fresh manager over the directory: nothing cached) and again in the same process
(warm), as the median of ``--rounds`` rounds after a warm-up. The budget is 100 ms each. The new-process
figures also give the CPU time, which a busy machine does not inflate the way it does wall time.

- ``checkpoints()``: list every checkpoint, oldest first;
- ``best()``: pick the best by a metric, which is what ``load_best`` does before it reads one;
- ``load_best()``: the selection plus loading that checkpoint, in a process that has imported torch
  (as any caller that loads tensors has; ``import ckpt_plugin`` does not import it, and the first
  tensor read would otherwise pay for it: its time is printed beside). Importing torch leaves a
  full garbage collection due (about 100 ms: it walks every object torch created), which the next
  code to allocate pays, whatever it is; a trainer has paid it long before it loads a checkpoint,
  so the child collects once before the timer;
- retention: what a save runs after its commit with ``max_checkpoints=count``: list, decide, and
  delete the one checkpoint too many.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import existing_dir, machine, whole_number

BUDGET_MS = 100.0

CHILD = r"""
import gc, json, sys, time, shutil
from pathlib import Path
from ckpt_plugin import CheckpointManager
root, op, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch_import = 0.0
if op == "load_best":  # a caller that loads tensors has imported torch; ckpt_plugin imports it only then
    begun = time.perf_counter()
    import torch
    gc.collect()  # the full collection torch's import leaves due, which a running trainer has long paid
    torch_import = time.perf_counter() - begun
if op == "retention":
    spare = root.parent / "spare"
    target = root / f"epoch_{count}"
    if not target.exists():
        shutil.copytree(spare, target)
start, cpu = time.perf_counter(), time.process_time()
manager = CheckpointManager(root, max_checkpoints=count, metric_for_best="loss", mode="min")
if op == "checkpoints":
    found = len(manager.checkpoints())
elif op == "best":
    found = manager.best().epoch
elif op == "load_best":
    found = manager.load_best()["epoch"]
else:
    manager.apply_retention()
    found = len(manager.checkpoints())
print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu, "found": found,
                  "torch_import": torch_import}))
"""


def populate(root: Path, count: int) -> Path:
    import torch
    from torch import nn

    from ckpt_plugin import CheckpointManager
    from ckpt_plugin._checkpoint import METADATA_CHECKSUM_KEY, METADATA_FILE, metadata_checksum

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters())
    config = {f"option_{i}": (i * 0.5 if i % 3 else f"value-{i}") for i in range(60)}
    manager = CheckpointManager(root / "run", max_checkpoints=None)
    info = manager.save(model, optimizer, epoch=0, metrics={"loss": 2.0, "accuracy": 0.1}, config=config)
    template = json.loads((info.path / METADATA_FILE).read_text())
    for epoch in range(1, count + 1):
        target = root / "run" / f"epoch_{epoch}" if epoch < count else root / "spare"
        shutil.copytree(info.path, target)
        metadata = dict(template, epoch=epoch, metrics={"loss": 2.0 / (1 + epoch % 97), "accuracy": epoch / count})
        metadata[METADATA_CHECKSUM_KEY] = metadata_checksum(metadata)
        (target / METADATA_FILE).write_text(json.dumps(metadata, separators=(",", ":")))
    return root / "run"


def fresh(run: Path, op: str, count: int, rounds: int) -> tuple[float, float, float]:
    """Median wall and CPU seconds of ``op`` in a new process, and of the ``import torch`` before it."""
    times, cpu, torch_import = [], [], []
    for round_index in range(rounds + 1):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(run), op, str(count)], capture_output=True, text=True, check=True
        )
        if round_index:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            times.append(result["seconds"])
            cpu.append(result["cpu"])
            torch_import.append(result["torch_import"])
    return statistics.median(times), statistics.median(cpu), statistics.median(torch_import)


def warm(run: Path, op: str, count: int, rounds: int) -> float:
    from ckpt_plugin import CheckpointManager

    manager = CheckpointManager(run, max_checkpoints=count, metric_for_best="loss", mode="min")
    manager.checkpoints()
    times = []
    for round_index in range(rounds + 1):
        if op == "retention":
            target = run / f"epoch_{count}"
            if not target.exists():
                shutil.copytree(run.parent / "spare", target)
        start = time.perf_counter()
        if op == "checkpoints":
            manager.checkpoints()
        elif op == "best":
            manager.best()
        elif op == "load_best":
            manager.load_best()
        else:
            manager.apply_retention()
        if round_index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=whole_number(), default=1000)
    parser.add_argument("--rounds", type=whole_number(3), default=5)
    parser.add_argument("--dir", type=existing_dir, default=None)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run = populate(Path(tmp), args.count)
        print(f"{args.count} checkpoints; median of {args.rounds} rounds after a warm-up; budget {BUDGET_MS:.0f} ms")
        print(f"{'operation':<14}{'new process':>14}{'(cpu)':>11}{'of budget':>11}{'warm':>10}{'of budget':>11}")
        for op in ("checkpoints", "best", "load_best", "retention"):
            cold_s, cold_cpu, torch_s = fresh(run, op, args.count, args.rounds)
            warm_s = warm(run, op, args.count, args.rounds)
            print(
                f"{op:<14}{cold_s * 1000:>11.1f} ms{cold_cpu * 1000:>8.1f} ms{cold_s * 1000 / BUDGET_MS:>11.2f}"
                f"{warm_s * 1000:>7.1f} ms{warm_s * 1000 / BUDGET_MS:>11.2f}"
            )
            if torch_s:
                print(f"{'':<14}(after `import torch` and a full garbage collection, not timed: {torch_s * 1000:.0f} ms)")
        print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
