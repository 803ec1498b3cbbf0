"""Restore speed: ``manager.restore`` against ``torch.load(weights_only=True)`` + ``load_state_dict``.

    PYTHONPATH=. python benchmarks/restore.py [--mib 400] [--rounds 5]

The state is a stack of linear layers plus Adam's two moments, about ``--mib`` MiB in all. Both
sides read the same state from warm files (the page cache holds both after the warm-up round):
``torch.save`` of ``{"model", "optimizer"}`` state dicts on one side, a ckpt_plugin checkpoint on
the other (which also verifies an xxh3 checksum of every byte it reads). Three cases are measured:

- ``fresh optimizer``: the resume case, a new optimizer whose state does not exist yet;
- ``live optimizer``: the optimizer already holds state tensors of the right shapes;
- ``cold, live``: the same, with both sides' files dropped from the page cache
  (``posix_fadvise(DONTNEED)``) before each restore, as after a crash and restart (a save with
  direct I/O leaves nothing cached either).

Each round also times the read floor: the checkpoint's files read into buffers that already exist,
two ``preadv`` calls in flight as the manager's reader has, nothing hashed or parsed. No restore that reads every byte from the
page cache can take less; on a warm cache it is mostly memory bandwidth, which both sides share.

Each case runs one warm-up round and then ``--rounds`` rounds, alternating the two sides, and
prints the medians of wall time and their ratio, then of CPU time (all threads, user and system),
which a machine busy with other work inflates less than wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import evict, machine, whole_number
from torch import nn

from ckpt_plugin import CheckpointManager


def build(mib: int, width: int = 2048) -> nn.Module:
    layer_mib = width * width * 4 / 2**20
    layers = max(1, round(mib / 3 / layer_mib))
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def trained(mib: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build(mib)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 2048)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def state_mib(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    tensors = list(model.state_dict().values()) + [t for s in optimizer.state.values() for t in s.values()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def baseline(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def read_floor(buffers: dict[Path, memoryview], pool: ThreadPoolExecutor) -> None:
    """Read every file of the checkpoint into its buffer in 8 MiB pieces, two reads in flight."""
    descriptors = {path: os.open(path, os.O_RDONLY) for path in buffers}
    try:
        pieces = [
            (descriptors[path], buffer[offset : offset + (8 << 20)], offset)
            for path, buffer in buffers.items()
            for offset in range(0, len(buffer), 8 << 20)
        ]
        list(pool.map(lambda piece: os.preadv(piece[0], [piece[1]], piece[2]), pieces))
    finally:
        for fd in descriptors.values():
            os.close(fd)


def measure(args: argparse.Namespace, root: Path, live_state: bool, cold: bool = False) -> dict[str, float]:
    source_model, source_optimizer = trained(args.mib)
    root.mkdir(parents=True)
    torch_file = root / "state.pt"
    torch.save({"model": source_model.state_dict(), "optimizer": source_optimizer.state_dict()}, torch_file)
    manager = CheckpointManager(root / "checkpoints", max_checkpoints=None)
    info = manager.save(source_model, source_optimizer, epoch=1, metrics={"loss": 1.0})
    buffers = {path: memoryview(bytearray(path.stat().st_size)) for path in sorted(info.path.iterdir()) if path.is_file()}
    expected = {k: v.clone() for k, v in source_model.state_dict().items()}
    del source_model, source_optimizer

    model, optimizer = trained(args.mib)
    sides = ("torch", "ckpt_plugin", "floor")
    pool = ThreadPoolExecutor(2)
    timings: dict[str, list[float]] = {key: [] for side in sides for key in (side, f"{side}_cpu")}
    for round_index in range(args.rounds + 1):
        order = sides if round_index % 2 else sides[::-1]
        for side in order:
            if not live_state:
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            if cold:
                evict(torch_file, info.path)
            start, cpu = time.perf_counter(), time.process_time()
            if side == "torch":
                baseline(torch_file, model, optimizer)
            elif side == "floor":
                read_floor(buffers, pool)
            else:
                manager.restore(model, optimizer, restore_rng=False)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            if round_index:
                timings[side].append(elapsed)
                timings[f"{side}_cpu"].append(cpu)
    pool.shutdown()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    return {key: statistics.median(values) for key, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=whole_number(), default=400, help="approximate size of model + Adam state")
    parser.add_argument("--rounds", type=whole_number(3), default=5)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the files (default: a temporary directory)"
    )
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        model, optimizer = trained(args.mib)
        size = state_mib(model, optimizer)
        del model, optimizer
        print(
            f"state: {size:.0f} MiB (model + Adam), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"median of {args.rounds} rounds after a warm-up"
        )
        print(
            f"{'case':<17}{'torch.load+load_state_dict':>28}{'manager.restore':>17}{'ratio':>7}"
            f"{'cpu: torch':>12}{'ours':>8}{'ratio':>7}{'read floor':>12}{'torch/floor':>13}{'ours/floor':>12}"
        )
        cases = (("fresh optimizer", False, False), ("live optimizer", True, False), ("cold, live", True, True))
        for label, live, cold in cases:
            r = measure(args, root / label.replace(" ", "_").replace(",", ""), live, cold)
            print(
                f"{label:<17}{r['torch'] * 1000:>25.0f} ms{r['ckpt_plugin'] * 1000:>14.0f} ms"
                f"{r['ckpt_plugin'] / r['torch']:>7.2f}{r['torch_cpu'] * 1000:>9.0f} ms"
                f"{r['ckpt_plugin_cpu'] * 1000:>5.0f} ms{r['ckpt_plugin_cpu'] / r['torch_cpu']:>7.2f}"
                f"{r['floor'] * 1000:>9.0f} ms{r['torch'] / r['floor']:>13.2f}{r['ckpt_plugin'] / r['floor']:>12.2f}"
            )
        print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
