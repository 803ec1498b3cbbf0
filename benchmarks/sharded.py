"""Sharded save and restore at world size 2: the manager against ``torch.distributed.checkpoint``.

    PYTHONPATH=. python benchmarks/sharded.py [--mib 400] [--rounds 5] [--dir /path/on/the/disk]

Two ranks (gloo, spawned) each hold half of an FSDP2-sharded stack of linear layers and its Adam
state, about ``--mib`` MiB in all. In every round, in alternating order:

- save: ``manager.save(model, optimizer, ...)`` (safetensors per rank, checksums, JSON layout,
  atomic commit) against ``dcp.save`` with its ``FileSystemWriter`` (pickled ``.metadata``);
- restore: ``manager.restore(model, optimizer)`` (checksums verified) against ``dcp.load`` with its
  ``FileSystemReader``, both followed by ``set_state_dict`` as the manager does.

Each side is timed on rank 0 between two barriers, so the figure is the time of the slower rank.
Dirty pages are flushed before every measurement, and before every restore both sides' files are
evicted from the page cache (``posix_fadvise(DONTNEED)``), so both read from the disk, as after a
job restart (the manager may write large files with direct I/O, which leaves nothing cached). Prints
the medians, their ratios (target: <= 1.0), the bytes each rank wrote against total / world size,
and the CPU model. The first round is an untimed warm-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, scratch_dir, settle  # noqa: E402

WORLD = 2


def build(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An FSDP2-sharded stack of linear layers and Adam after one step: ``mib`` MiB of state in all."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = 8
    hidden = int(((mib * 1024**2 / 12) / layers) ** 0.5)  # fp32 weights + two Adam moments
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(hidden, hidden) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, hidden)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def evict(*directories: Path) -> None:
    """Drop the files of ``directories`` from the page cache, so that a read comes from the disk.

    Saves may write with direct I/O (no page cache) or through it; evicting both sides' files
    makes the restores compare alike, as after a job restart."""
    settle()
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def timed(fn, cold: tuple[Path, ...] = ()) -> float:  # type: ignore[no-untyped-def]
    if dist.get_rank() == 0:
        settle()
        evict(*cold)
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def rank_bytes(directory: Path, pattern: str) -> list[int]:
    return [sum(p.stat().st_size for p in directory.glob(pattern.format(rank=rank))) for rank in range(WORLD)]


def worker(rank: int, rendezvous: str, root: str, mib: int, rounds: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ckpt_plugin import CheckpointManager

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=600))
    model, optimizer = build(mib)
    total = sum(t.numel() * t.element_size() for t in model.parameters()) * 3  # global sizes: weights and two moments
    manager = CheckpointManager(Path(root) / "ours", max_checkpoints=None, keep_best=False, save_rng=False)
    theirs = Path(root) / "dcp"
    times: dict[str, list[float]] = {"save ours": [], "save dcp": [], "restore ours": [], "restore dcp": []}
    written: dict[str, list[int]] = {}

    def save_dcp() -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=dcp.FileSystemWriter(theirs))

    def restore_dcp() -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, storage_reader=dcp.FileSystemReader(theirs))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    for round_index in range(rounds + 1):
        if rank == 0:
            shutil.rmtree(theirs, ignore_errors=True)
            for info in manager.checkpoints():
                shutil.rmtree(info.path)
        dist.barrier()
        saves = {"save ours": lambda: manager.save(model, optimizer, epoch=round_index), "save dcp": save_dcp}
        restores = {"restore ours": lambda: manager.restore(model, optimizer, which=round_index, restore_rng=False),
                    "restore dcp": restore_dcp}
        for group in (saves, restores):
            order = list(group) if round_index % 2 == 0 else list(reversed(group))
            for name in order:
                elapsed = timed(group[name], cold=(Path(root) / "ours", theirs) if group is restores else ())
                if round_index:
                    times[name].append(elapsed)
        if rank == 0 and round_index == rounds:
            ours = Path(root) / "ours" / f"epoch_{round_index}"
            written["ours"] = [a + b for a, b in zip(rank_bytes(ours, "model-r{rank}-*"), rank_bytes(ours, "optim-r{rank}-*"))]
            written["dcp"] = rank_bytes(theirs, "__{rank}_*.distcp")
            written["ours all"] = [sum(p.stat().st_size for p in ours.iterdir())]
            written["dcp all"] = [sum(p.stat().st_size for p in theirs.iterdir())]
    if rank == 0:
        median = {name: statistics.median(values) for name, values in times.items()}
        print(machine())
        print(f"world size {WORLD}, {total / 1024**2:.0f} MiB of model and Adam state, {rounds} rounds after a warm-up")
        print("medians: " + ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in median.items()))
        share = total / WORLD
        rows = [
            ("save / dcp.save (FileSystemWriter)", f"{median['save ours'] / median['save dcp']:.2f}x", "<= 1.0"),
            ("restore / dcp.load (FileSystemReader)", f"{median['restore ours'] / median['restore dcp']:.2f}x", "<= 1.0"),
        ]
        rows += [(f"bytes written by rank {r} / (total / world)", f"{b / share:.3f}x", "~1.0")
                 for r, b in enumerate(written["ours"])]
        rows += [(f"dcp: bytes of rank {r} / (total / world)", f"{b / share:.3f}x", "reported")
                 for r, b in enumerate(written["dcp"])]
        rows.append(("whole checkpoint / dcp's", f"{written['ours all'][0] / written['dcp all'][0]:.3f}x", "reported"))
        print_table("sharded checkpoints at world size 2 (ratios, lower is better)", rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=400, help="total state size in MiB (default 400)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    options = parser.parse_args()
    root = scratch_dir(options.dir)
    try:
        mp.start_processes(worker, args=(str(root / ".rendezvous"), str(root), options.mib, options.rounds),
                           nprocs=WORLD, start_method="spawn", join=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
