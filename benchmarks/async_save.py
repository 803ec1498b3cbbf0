"""How long an asynchronous save blocks training, against the copy floor and torch.save.

    PYTHONPATH=. python benchmarks/async_save.py [--rounds 7] [--dir PARENT]

On the same ~400 MiB model + Adam state, in one run, each figure the median of ``--rounds``
rounds after one warm-up round:

- floor: a bare ``copy_`` of every tensor of the state into warm, pre-allocated buffers;
- the staging buffer's own copy of the state with ``memcpy`` on one and on two threads and with
  ``Tensor.copy_``, to show which beats the floor on this CPU (the default buffer times the last
  two on its first saves and keeps the faster);
- blocked: the time ``CheckpointManager(async_save=True).save()`` takes to return, with the
  previous save finished (as it is when saves are further apart than one write). On a GPU this
  includes waiting for the device-to-host copy, so it is an upper bound there;
- the background write that follows it, and a bare ``torch.save`` of the same state;
- how much a training-like workload slows down while a background write runs;
- the staging buffer's size, and the extra memory of a steady-state async save (the rise of the
  resident set's high-water mark, and the peak of torch allocations seen by the profiler).

Target: blocked <= 1.2x the floor. Where CUDA is available the state lives on the GPU, the floor
copies into pinned host buffers, and the figures are measured there too.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import torch
from _common import (
    MiB,
    build_state,
    existing_dir,
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

from ckpt_plugin import CheckpointManager
from ckpt_plugin._io.staging import StagingBuffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=whole_number(3), default=7)
    parser.add_argument(
        "--dir", type=existing_dir, default=None, help="parent of the scratch directory (default: the system temp dir)"
    )
    parser.add_argument("--hidden", type=whole_number(), default=2090)
    parser.add_argument("--layers", type=whole_number(), default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    model, optimizer = build_state(args.hidden, args.layers)
    if device.type != "cpu":
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(torch.randn(4, args.hidden, device=device)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tensors = state_tensors(model, optimizer)
    state_bytes = nbytes(tensors)
    root = scratch_dir(args.dir)
    print(machine())
    print(f"state on {device}: {len(tensors)} tensors, {state_bytes / MiB:.1f} MiB; files in {root}")

    pinned = device.type == "cuda"
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in tensors]

    def sync_device() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def floor() -> None:
        for buffer, tensor in zip(buffers, tensors):
            buffer.copy_(tensor, non_blocking=pinned)
        sync_device()

    named = {str(index): tensor for index, tensor in enumerate(tensors)}
    staging = {
        "memcpy1": StagingBuffer(1, "memcpy"),
        "memcpy2": StagingBuffer(2, "memcpy"),
        "copy_": StagingBuffer(method="copy_"),
    }

    def stage_with(how: str) -> None:
        staging[how].stage([named]).wait()

    torch_file = root / "torch.pt"

    def torch_save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, torch_file)

    manager = CheckpointManager(root / "ckpt", max_checkpoints=2, keep_best=False, save_rng=False, async_save=True)
    counter = iter(range(1_000_000))

    def async_save() -> None:
        manager.save(model=model, optimizer=optimizer, epoch=next(counter), metrics={"loss": 0.5})
        sync_device()

    def flush_and_settle() -> None:
        manager.wait()
        settle()

    work = torch.randn(1024, 1024)

    def training_step() -> None:
        for _ in range(20):
            work @ work

    rounds = args.rounds
    first_start = time.perf_counter()
    async_save()
    t_first = time.perf_counter() - first_start
    flush_and_settle()
    load_before = load_average()
    times = interleaved_times(
        {
            "floor": floor,
            "stage1": lambda: stage_with("memcpy1"),
            "stage2": lambda: stage_with("memcpy2"),
            "stage_copy": lambda: stage_with("copy_"),
            "torch": torch_save,
            "blocked": async_save,
        },
        rounds,
        before=flush_and_settle,
    )
    load_after = load_average()
    measured = {name: statistics.median(values) for name, values in times.items()}
    t_floor, t_stage1, t_stage2, t_stage_copy, t_torch, t_blocked = (
        measured[k] for k in ("floor", "stage1", "stage2", "stage_copy", "torch", "blocked")
    )
    method = manager._saver.buffer.method if manager._saver is not None else "?"
    staging.clear()
    manager.wait()

    # A background write that follows a save: timed from save() to the end of wait().
    writes = []
    for _ in range(rounds):
        settle()
        start = time.perf_counter()
        async_save()
        manager.wait()
        writes.append(time.perf_counter() - start)
    t_write = statistics.median(writes)

    # A training-like workload alone, then while background writes run.
    t_step = median_time(training_step, rounds)
    during = []
    for _ in range(rounds):
        manager.wait()
        settle()
        async_save()
        start = time.perf_counter()
        training_step()
        during.append(time.perf_counter() - start)
    manager.wait()
    t_step_during = statistics.median(during)

    settle()
    extra = peak_extra_rss(async_save)
    manager.wait()
    settle()
    extra_torch = peak_torch_bytes(lambda: (async_save(), manager.wait()))
    buffer_bytes = manager._saver.buffer.nbytes if manager._saver is not None else 0
    manager.close()

    labels = {
        "floor": "floor: Tensor.copy_ into warm buffers",
        "stage1": "staging copy, memcpy on 1 thread",
        "stage2": "staging copy, memcpy on 2 threads",
        "stage_copy": "staging copy, Tensor.copy_",
        "torch": "torch.save",
        "blocked": f"async save blocked (kept method: {method})",
    }
    print(f"\nmedian (min-max) of {rounds} interleaved rounds; load average {load_before} before, {load_after} after:")
    width = max(len(label) for label in labels.values())
    for name, values in times.items():
        print(f"  {labels[name].ljust(width)}  {spread(values):>20}  {measured[name] / t_floor:.2f}x floor")
    print(
        f"\nmedians of {rounds} rounds: floor {t_floor * 1e3:.1f} ms, staging copy {t_stage1 * 1e3:.1f} ms "
        f"(1 thread) / {t_stage2 * 1e3:.1f} ms (2 threads), "
        f"async save blocked {t_blocked * 1e3:.1f} ms (first save, allocating the buffer: {t_first * 1e3:.1f} ms), "
        f"save + background write {t_write * 1e3:.0f} ms, torch.save {t_torch * 1e3:.0f} ms"
    )
    print_table(
        "async save (ratios, lower is better)",
        [
            ("blocked / floor (copy_ into warm buffers)", f"{t_blocked / t_floor:.2f}x", "<= 1.2"),
            ("blocked / torch.save", f"{t_blocked / t_torch:.3f}x", "reported"),
            ("floor / torch.save", f"{t_floor / t_torch:.3f}x", "reported (~0.1)"),
            ("staging copy, 1 thread / floor", f"{t_stage1 / t_floor:.2f}x", "reported"),
            ("staging copy, 2 threads / floor", f"{t_stage2 / t_floor:.2f}x", "reported"),
            ("staging copy, Tensor.copy_ / floor", f"{t_stage_copy / t_floor:.2f}x", "reported (~1)"),
            ("save + background write / torch.save", f"{t_write / t_torch:.2f}x", "reported"),
            ("training step during a write / alone", f"{t_step_during / t_step:.2f}x", "reported"),
            ("staging buffer / state size", f"{buffer_bytes / state_bytes:.3f}x", "<= 1 buffer"),
            ("extra peak RSS of a steady-state save", f"{extra / MiB:.1f} MiB", "reported"),
            ("peak torch allocations, save + write (profiler)", f"{extra_torch / MiB:.1f} MiB", "reported"),
        ],
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
