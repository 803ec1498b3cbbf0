"""Sync save and load of a ~400 MiB model + Adam state, against torch.save / torch.load.

    PYTHONPATH=. python benchmarks/save_load.py [--rounds 9] [--dir PARENT]

Every figure is a ratio to the real alternative measured in the same run on the same state, the
median of ``--rounds`` interleaved rounds after one warm-up round; each save's median and range
(min-max) are printed too:

- sync ``CheckpointManager.save`` / (``torch.save`` + fsync of its file)    target <= 1.0,
  with ``max_checkpoints=2`` (every save prunes one) and keeping every checkpoint
- the floors: a raw write of the same bytes + fsync through the page cache, and the same with
  direct I/O (what the disk alone costs)
- sync ``CheckpointManager.save`` / bare ``torch.save``                      (reported)
- ``manager.restore`` (checksums verified) / (``torch.load(weights_only=True)`` + ``load_state_dict``)
                                                                              target <= 0.8
- the checksum's share of the sync save time: xxh3 over every byte written, timed alone (its
  CPU cost), and the wall time a save loses to it (a save with hashing switched off, compared)
- extra peak memory during a sync save, against largest tensor + 64 MiB: the rise of the resident
  set's high-water mark, and the peak of torch allocations seen by the profiler

Before every timed save the background deletion of pruned checkpoints is let finish and dirty
pages are flushed (``os.sync``), so no write pays for another's; the deletion's own time is
reported (it runs on a background thread, off the save's path).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import time
from unittest import mock

import torch
import xxhash
from _common import (
    MiB,
    build_state,
    existing_dir,
    fsync_file,
    interleaved_medians,
    interleaved_times,
    load_average,
    machine,
    median_time,
    nbytes,
    peak_extra_rss,
    peak_torch_bytes,
    print_table,
    scratch_dir,
    settle,
    spread,
    state_tensors,
    whole_number,
)

import ckpt_plugin._storage.local
from ckpt_plugin import CheckpointManager
from ckpt_plugin._io.files import tensor_bytes
from ckpt_plugin._storage import trash


class NullHasher:
    """Stands in for xxh3 to time a save without its checksum (never used for a real checkpoint)."""

    def update(self, data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(3), default=9)
    parser.add_argument(
        "--dir", type=existing_dir, default=None, help="parent of the scratch directory (default: the system temp dir)"
    )
    parser.add_argument("--hidden", type=whole_number(), default=2090)
    parser.add_argument("--layers", type=whole_number(), default=8)
    args = parser.parse_args()

    model, optimizer = build_state(args.hidden, args.layers)
    tensors = state_tensors(model, optimizer)
    state_bytes = nbytes(tensors)
    largest = max(t.numel() * t.element_size() for t in tensors)
    root = scratch_dir(args.dir)
    print(machine())
    print(f"state: {len(tensors)} tensors, {state_bytes / MiB:.1f} MiB, largest {largest / MiB:.1f} MiB; files in {root}")

    manager = CheckpointManager(root / "ckpt", max_checkpoints=2, keep_best=False, save_rng=False)
    torch_file = root / "torch.pt"
    counter = iter(range(1_000_000))

    def torch_state() -> dict[str, object]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "metrics": {"loss": 0.5}}

    def torch_save() -> None:
        torch.save(torch_state(), torch_file)

    def torch_save_fsync() -> None:
        torch.save(torch_state(), torch_file)
        fsync_file(torch_file)

    def ours_save() -> None:
        manager.save(model=model, optimizer=optimizer, epoch=next(counter), metrics={"loss": 0.5})

    keeper = CheckpointManager(root / "keep", max_checkpoints=None, keep_best=False, save_rng=False)

    def ours_keep_all() -> None:
        keeper.save(model=model, optimizer=optimizer, epoch=next(counter), metrics={"loss": 0.5})

    raw_file = root / "raw.bin"

    def raw_write(flags: int) -> None:
        raw_file.unlink(missing_ok=True)
        fd = os.open(raw_file, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        try:
            for view in aligned_views:
                os.write(fd, view)
            os.fsync(fd)
        finally:
            os.close(fd)

    def torch_load() -> None:
        loaded = torch.load(torch_file, weights_only=True)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])

    def ours_load() -> None:
        manager.restore(model, optimizer, which="latest")

    views = [tensor_bytes(t) for t in tensors]
    # The same bytes in 8 MiB page-aligned pieces, as direct I/O needs (the buffered floor uses them too).
    everything = mmap.mmap(-1, -(-state_bytes // (8 * MiB)) * 8 * MiB)
    position = 0
    for view in views:
        everything[position : position + len(view)] = view
        position += len(view)
    aligned_views = [memoryview(everything)[start : start + 8 * MiB] for start in range(0, len(everything), 8 * MiB)]

    def hash_all() -> None:
        hasher = xxhash.xxh3_64()
        for view in views:
            hasher.update(view)
        hasher.hexdigest()

    unhashed = CheckpointManager(root / "unhashed", max_checkpoints=2, keep_best=False, save_rng=False)

    def save_unhashed() -> None:
        with mock.patch.object(ckpt_plugin._storage.local, "new_hasher", NullHasher):
            unhashed.save(model=model, optimizer=optimizer, epoch=next(counter), metrics={"loss": 0.5})

    rounds = args.rounds
    deletions: list[float] = []
    manager_pruned = [False]

    def settle_after_saves() -> None:
        start = time.perf_counter()
        trash.drain()
        if manager_pruned[0]:
            deletions.append(time.perf_counter() - start)
            manager_pruned[0] = False
        settle()

    def ours_save_noting_prune() -> None:
        ours_save()
        manager_pruned[0] = True

    direct = getattr(os, "O_DIRECT", 0)
    save_fns = {
        "raw": lambda: raw_write(0),
        **({"raw_direct": lambda: raw_write(direct)} if direct else {}),
        "torch": torch_save,
        "torch_fsync": torch_save_fsync,
        "ours": ours_save_noting_prune,
        "ours_keep": ours_keep_all,
        "unhashed": save_unhashed,
    }
    load_before = load_average()
    save_times = interleaved_times(save_fns, rounds, before=settle_after_saves)
    load_after = load_average()
    settle_after_saves()
    saves = {name: statistics.median(values) for name, values in save_times.items()}
    t_torch, t_torch_fsync, t_ours, t_unhashed = (saves[k] for k in ("torch", "torch_fsync", "ours", "unhashed"))
    t_keep, t_raw = saves["ours_keep"], saves["raw"]
    loads = interleaved_medians({"torch": torch_load, "ours": ours_load}, rounds)
    t_torch_load, t_ours_load = loads["torch"], loads["ours"]
    t_hash = median_time(hash_all, rounds)
    probe = peak_extra_rss(lambda: torch.ones(32 * MiB, dtype=torch.uint8))
    probe_torch = peak_torch_bytes(lambda: torch.ones(32 * MiB, dtype=torch.uint8))
    settle()
    extra_ours = peak_extra_rss(ours_save)
    settle()
    torch_ours = peak_torch_bytes(ours_save)
    settle()
    extra_torch = peak_extra_rss(torch_save)
    limit = largest + 64 * MiB

    labels = {
        "raw": "raw write of the same bytes + fsync (page cache)",
        "raw_direct": "raw write of the same bytes + fsync (direct I/O)",
        "torch": "torch.save",
        "torch_fsync": "torch.save + fsync",
        "ours": "manager.save, max_checkpoints=2 (prunes)",
        "ours_keep": "manager.save, keeping every checkpoint",
        "unhashed": "manager.save without checksums",
    }
    print(f"\nsaves, median (min-max) of {rounds} interleaved rounds; load average {load_before} before, {load_after} after:")
    width = max(len(label) for label in labels.values())
    for name, values in save_times.items():
        print(f"  {labels[name].ljust(width)}  {spread(values):>22}  {saves[name] / t_torch_fsync:.2f}x torch.save + fsync")
    if deletions:
        print(f"  {'background deletion of the pruned checkpoint'.ljust(width)}  {spread(deletions):>22}  (off the save's path)")
    print(
        f"\nmedians of {rounds} rounds: torch.save {t_torch * 1e3:.0f} ms, torch.save+fsync {t_torch_fsync * 1e3:.0f} ms, "
        f"manager.save {t_ours * 1e3:.0f} ms; torch.load+load_state_dict {t_torch_load * 1e3:.0f} ms, "
        f"manager.restore {t_ours_load * 1e3:.0f} ms; xxh3 of the state {t_hash * 1e3:.0f} ms"
    )
    print_table(
        "sync save and load (ratios, lower is better)",
        [
            ("save / (torch.save + fsync)", f"{t_ours / t_torch_fsync:.2f}x", "<= 1.0"),
            ("  same, keeping every checkpoint", f"{t_keep / t_torch_fsync:.2f}x", "<= 1.0"),
            ("  floor: raw write + fsync / (torch.save + fsync)", f"{t_raw / t_torch_fsync:.2f}x", "reported"),
            ("save / raw write + fsync (page cache)", f"{t_ours / t_raw:.2f}x", "~1 or below"),
            ("save / torch.save (no fsync)", f"{t_ours / t_torch:.2f}x", "reported"),
            ("restore (verified) / (torch.load + load_state_dict)", f"{t_ours_load / t_torch_load:.2f}x", "<= 0.8"),
            ("checksum: xxh3 of the state alone / save", f"{t_hash / t_ours:.1%}", "CPU cost"),
            ("checksum: save time it adds (vs no hashing)", f"{(t_ours - t_unhashed) / t_ours:.1%}", "wall share"),
            ("extra peak RSS during save", f"{extra_ours / MiB:.1f} MiB", f"<= {limit / MiB:.1f} MiB (largest + 64)"),
            ("  same for torch.save", f"{extra_torch / MiB:.1f} MiB", "reported"),
            ("peak torch allocations during save (profiler)", f"{torch_ours / MiB:.1f} MiB", f"<= {limit / MiB:.1f} MiB"),
            ("  probe check: 32 MiB allocation, RSS / profiler", f"{probe / MiB:.1f} / {probe_torch / MiB:.1f} MiB", "~32 (RSS misses reused memory)"),
        ],
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
