"""Sharded save and restore at world size 2: the manager against ``torch.distributed.checkpoint``.

    PYTHONPATH=. python benchmarks/sharded.py [--mib 400] [--rounds 5] [--dir /path/on/the/disk] [--remote]

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

With ``--remote`` both sides write to S3 instead: a moto server in its own process on this machine,
over HTTP (``moto[server]`` and ``s3fs``, the dev extra). The manager saves to and restores from
``s3://bench-sharded/ours`` (each rank's multipart uploads under one transaction prefix, the
coordinator's manifest last; ranged GETs, checksums verified) and DCP uses its fsspec pair,
``FsspecWriter`` / ``FsspecReader``, on ``s3://bench-sharded/dcp``. There is no page cache to evict.
"""

from __future__ import annotations

import argparse
import fnmatch
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
from _common import evict, existing_dir, machine, print_table, scratch_dir, settle, start_server, whole_number  # noqa: E402

WORLD = 2
BUCKET = "bench-sharded"


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


def timed(fn, cold: tuple[Path, ...] = ()) -> float:  # type: ignore[no-untyped-def]
    if dist.get_rank() == 0:
        settle()
        evict(*cold)
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


class Place:
    """Where both sides write, with what DCP needs there: a local directory, or S3 (``remote``)."""

    def __init__(self, root: str, remote: bool) -> None:
        self.remote = remote
        if remote:
            import fsspec
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

            self.fs = fsspec.filesystem("s3")
            self.ours, self.theirs = f"s3://{BUCKET}/ours", f"s3://{BUCKET}/dcp"
            self.writer, self.reader = FsspecWriter, FsspecReader
        else:
            import torch.distributed.checkpoint as dcp

            self.ours, self.theirs = str(Path(root) / "ours"), str(Path(root) / "dcp")
            self.writer, self.reader = dcp.FileSystemWriter, dcp.FileSystemReader

    def clear(self) -> None:
        """Remove both sides' checkpoints."""
        if self.remote:
            for location in (self.ours, self.theirs):
                if self.fs.exists(location):
                    self.fs.rm(location, recursive=True)
                self.fs.invalidate_cache()
        else:
            shutil.rmtree(self.ours, ignore_errors=True)
            shutil.rmtree(self.theirs, ignore_errors=True)

    def cold(self) -> tuple[Path, ...]:
        """Directories to evict from the page cache before a restore (none remotely)."""
        return () if self.remote else (Path(self.ours), Path(self.theirs))

    def sizes(self, location: str) -> dict[str, int]:
        """The size of every file directly in ``location``, by name."""
        if self.remote:
            self.fs.invalidate_cache()
            return {info["name"].rsplit("/", 1)[-1]: int(info["size"]) for info in self.fs.ls(location, detail=True)}
        return {path.name: path.stat().st_size for path in Path(location).iterdir()}


def rank_bytes(sizes: dict[str, int], pattern: str) -> list[int]:
    return [sum(size for name, size in sizes.items() if fnmatch.fnmatch(name, pattern.format(rank=rank))) for rank in range(WORLD)]


def worker(rank: int, rendezvous: str, root: str, mib: int, rounds: int, remote: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ckpt_plugin import CheckpointManager

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=600))
    model, optimizer = build(mib)
    total = sum(t.numel() * t.element_size() for t in model.parameters()) * 3  # global sizes: weights and two moments
    place = Place(root, remote)
    manager = CheckpointManager(place.ours, max_checkpoints=None, keep_best=False, save_rng=False)
    times: dict[str, list[float]] = {"save ours": [], "save dcp": [], "restore ours": [], "restore dcp": []}
    written: dict[str, list[int]] = {}

    def save_dcp() -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=place.writer(place.theirs))

    def restore_dcp() -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, storage_reader=place.reader(place.theirs))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    for round_index in range(rounds + 1):
        if rank == 0:
            place.clear()
        dist.barrier()
        saves = {"save ours": lambda: manager.save(model, optimizer, epoch=round_index), "save dcp": save_dcp}
        restores = {"restore ours": lambda: manager.restore(model, optimizer, which=round_index, restore_rng=False),
                    "restore dcp": restore_dcp}
        for group in (saves, restores):
            order = list(group) if round_index % 2 == 0 else list(reversed(group))
            for name in order:
                elapsed = timed(group[name], cold=place.cold() if group is restores else ())
                if round_index:
                    times[name].append(elapsed)
        if rank == 0 and round_index == rounds:
            ours = place.sizes(manager.latest().location)
            theirs = place.sizes(place.theirs)
            written["ours"] = [a + b for a, b in zip(rank_bytes(ours, "model-r{rank}-*"), rank_bytes(ours, "optim-r{rank}-*"))]
            written["dcp"] = rank_bytes(theirs, "__{rank}_*.distcp")
            written["ours all"] = [sum(ours.values())]
            written["dcp all"] = [sum(theirs.values())]
    if rank == 0:
        median = {name: statistics.median(values) for name, values in times.items()}
        print(machine())
        where = f"S3 (moto over HTTP, {os.environ.get('AWS_ENDPOINT_URL')})" if remote else "the local disk"
        print(f"world size {WORLD}, {total / 1024**2:.0f} MiB of model and Adam state on {where}, "
              f"{rounds} rounds after a warm-up")
        print("medians: " + ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in median.items()))
        share = total / WORLD
        writer, reader = place.writer.__name__, place.reader.__name__
        rows = [
            (f"save / dcp.save ({writer})", f"{median['save ours'] / median['save dcp']:.2f}x", "<= 1.0"),
            (f"restore / dcp.load ({reader})", f"{median['restore ours'] / median['restore dcp']:.2f}x", "<= 1.0"),
        ]
        rows += [(f"bytes written by rank {r} / (total / world)", f"{b / share:.3f}x", "~1.0")
                 for r, b in enumerate(written["ours"])]
        rows += [(f"dcp: bytes of rank {r} / (total / world)", f"{b / share:.3f}x", "reported")
                 for r, b in enumerate(written["dcp"])]
        rows.append(("whole checkpoint / dcp's", f"{written['ours all'][0] / written['dcp all'][0]:.3f}x", "reported"))
        print_table(f"sharded checkpoints at world size 2 on {'S3' if remote else 'disk'} (ratios, lower is better)", rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=whole_number(), default=400, help="total state size in MiB (default 400)")
    parser.add_argument("--rounds", type=whole_number(), default=5, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--dir", type=existing_dir, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--remote", action="store_true", help="write to S3 (a moto server started here) instead")
    options = parser.parse_args()
    root = scratch_dir(options.dir)
    server = None
    try:
        if options.remote:
            server, _ = start_server(BUCKET)  # sets the AWS_* environment, which the ranks inherit
        mp.start_processes(worker, args=(str(root / ".rendezvous"), str(root), options.mib, options.rounds, options.remote),
                           nprocs=WORLD, start_method="spawn", join=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
