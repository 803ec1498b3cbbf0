"""Step-time overhead of checkpointing a CPU training loop, against every peer, in one run.

    PYTHONPATH=. python benchmarks/overhead.py [--states 100,400] [--every 5,10,50] [--rounds 2]
                                               [--min-steps 30] [--batch 32] [--dir PARENT] [--quick]

A stack of 2090-wide linear layers trained with Adam, sized so that weights plus Adam's two moments
make each state of ``--states`` (MiB). Every step is a forward and backward pass of one batch and an
optimizer step. Each variant runs a window of steps that saves every N steps (N of ``--every``); its
overhead is how much longer its mean step takes than the same loop's without checkpoints:

- ``ours sync``: ``CheckpointManager.save`` in the plain loop;
- ``ours async``: the same with ``async_save=True``;
- ``dcp async``: ``torch.distributed.checkpoint.async_save`` in the plain loop (single process, no
  process group), waiting for the previous save before the next, as its docs ask;
- ``Lightning``: ``ModelCheckpoint(every_n_train_steps=N)`` in a Lightning fit, against the same
  fit without checkpointing;
- ``HF Trainer``: the Trainer's own ``save_strategy="steps"`` against the same Trainer without
  saving (a Trainer-compatible wrapper of the same MLP, ``report_to=[]``, ``use_cpu=True``).

A window starts with a save already in flight (as in steady state) and ends before the last save's
write is waited for, so it holds as many writes as saves. Within every round the variants run in
turn (in reverse order every other round) so that drifting load hits them alike; each figure is
taken against the baseline of its own round, and the median over ``--rounds`` rounds is printed
with the spread. Our overhead is split into time blocked
(inside ``save()``) and interference: the extra time of the steps that overlap a background write,
against the median step of the same window that overlaps none (or of the baseline window, when
every step overlaps one). The CPU model and the load average are printed with each table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import (  # noqa: E402
    MiB,
    build_state,
    existing_dir,
    load_average,
    machine,
    nbytes,
    scratch_dir,
    settle,
    state_tensors,
    StepLog,
    Window,
    whole_number,
)
from _peers import lightning_window, trainer_window  # noqa: E402

from ckpt_plugin import CheckpointManager  # noqa: E402

warnings.filterwarnings("ignore")
HIDDEN = 2090
LAYER_MIB = 3 * (HIDDEN * HIDDEN + HIDDEN) * 4 / MiB
"""MiB of state per layer: its weights and bias and Adam's two moments of each."""


def number_list(text: str) -> list[int]:
    parse = whole_number()
    return [parse(part) for part in text.split(",") if part.strip()]


class Loop:
    """The training loop every plain-loop variant runs: one batch, forward, backward, Adam."""

    def __init__(self, state_mib: int, batch: int) -> None:
        self.layers = max(1, round(state_mib / LAYER_MIB))
        self.model, self.optimizer = build_state(HIDDEN, self.layers)
        self.batch = torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(1))

    @property
    def state_mib(self) -> float:
        return nbytes(state_tensors(self.model, self.optimizer)) / MiB

    def step(self) -> None:
        self.model(self.batch).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def plain_window(
    loop: Loop, steps: int, every: int, save: Callable[[int], None] | None, writing: Callable[[], bool], finish: Callable[[], None]
) -> Window:
    """Run ``steps`` steps of ``loop``, calling ``save`` after every ``every``-th one."""
    log = StepLog()
    if save is not None:
        save(0)  # steady state: a write is in flight as the window opens
    for index in range(1, steps + 1):
        start = time.perf_counter()
        busy = writing()
        loop.step()
        computed = time.perf_counter()
        blocked = 0.0
        if save is not None and index % every == 0:
            save(index)
            blocked = time.perf_counter() - computed
        log.add(computed - start, blocked, busy or writing())
    finish()
    return log.window()


def ours(loop: Loop, root: Path, async_save: bool) -> tuple[Callable[[int], None], Callable[[], bool], Callable[[], None]]:
    manager = CheckpointManager(root, max_checkpoints=2, keep_best=False, save_rng=False, async_save=async_save)
    counter = iter(range(1 << 30))

    def save(step: int) -> None:
        manager.save(model=loop.model, optimizer=loop.optimizer, epoch=0, step=next(counter), metrics={"loss": 0.5})

    def writing() -> bool:
        saver = manager._saver
        return saver is not None and saver.writing

    def finish() -> None:
        manager.close()

    return save, writing, finish


def dcp(loop: Loop, root: Path) -> tuple[Callable[[int], None], Callable[[], bool], Callable[[], None]]:
    import torch.distributed.checkpoint as checkpoint

    pending: list = []
    counter = iter(range(1 << 30))

    def wait() -> None:
        while pending:
            pending.pop().result()

    def save(step: int) -> None:
        wait()
        index = next(counter)
        shutil.rmtree(root / str(index - 2), ignore_errors=True)  # keep two, as ours does
        state = {"model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict()}
        pending.append(checkpoint.async_save(state, checkpoint_id=root / str(index), no_dist=True))

    def writing() -> bool:
        return bool(pending) and not pending[-1].done()

    return save, writing, wait


VARIANTS = ("ours sync", "ours async", "dcp async", "Lightning", "HF Trainer")
BASELINES = {"ours sync": "loop", "ours async": "loop", "dcp async": "loop", "Lightning": "Lightning none", "HF Trainer": "HF none"}


def run_variant(name: str, loop: Loop, steps: int, every: int, root: Path, batch: int) -> Window:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        if name == "loop":
            return plain_window(loop, steps, every, None, lambda: False, lambda: None)
        if name.startswith("ours"):
            return plain_window(loop, steps, every, *ours(loop, root, name.endswith("async")))
        if name == "dcp async":
            return plain_window(loop, steps, every, *dcp(loop, root))
        if name.startswith("Lightning"):
            return lightning_window(loop.layers, HIDDEN, batch, steps, None if name.endswith("none") else every, root)
        return trainer_window(loop.layers, HIDDEN, batch, steps, None if name.endswith("none") else every, root)
    finally:
        settle()
        shutil.rmtree(root, ignore_errors=True)


def window_steps(every: int, minimum: int) -> int:
    """At least ``minimum`` steps and two saves, a whole number of save intervals."""
    return every * max(2, -(-minimum // every))


def measure_state(state_mib: int, args: argparse.Namespace, root: Path) -> dict[tuple[str, int], list[Window]]:
    loop = Loop(state_mib, args.batch)
    longest = max(window_steps(every, args.min_steps) for every in args.every)
    print(f"\n== state {loop.state_mib:.0f} MiB ({loop.layers} layers of {HIDDEN}), batch {args.batch}", flush=True)
    plan = [("loop", 0), ("Lightning none", 0), ("HF none", 0)]
    plan += [(name, every) for every in args.every for name in VARIANTS]
    for name, every in [("loop", 0), ("ours async", args.every[0]), ("Lightning none", 0), ("HF none", 0)]:
        run_variant(name, loop, 3, every or 1, root / "warm", args.batch)  # imports, allocations, page cache
    results: dict[tuple[str, int], list[Window]] = {key: [] for key in plan}
    for round_index in range(args.rounds):
        order = plan if round_index % 2 == 0 else plan[::-1]
        load_before = load_average()
        for name, every in order:
            steps = longest if not every else window_steps(every, args.min_steps)
            results[(name, every)].append(run_variant(name, loop, steps, every or 1, root / "run", args.batch))
        quiet = results[("loop", 0)][-1].mean_step
        print(f"round {round_index + 1}: load average {load_before} before, {load_average()} after; "
              f"plain step {quiet * 1e3:.0f} ms", flush=True)
    return results


def report(state_mib: int, every_list: list[int], results: dict[tuple[str, int], list[Window]]) -> None:
    """Each figure is taken against its baseline of the same round (load drifts between rounds),
    then the median and range over rounds are printed."""

    def per_round(name: str, every: int, figure: Callable[[Window, Window], float]) -> list[float]:
        return [figure(window, base) for window, base in zip(results[(name, every)], results[(BASELINES[name], 0)])]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):+.1f} ({min(values):+.1f}..{max(values):+.1f})"

    print(f"\nstep-time overhead (%) at {state_mib} MiB, median (min..max) of rounds; load average now {load_average()}")
    print(f"  {'variant':<12}" + "".join(f"{'N = ' + str(every):>26}" for every in every_list))
    for name in VARIANTS:
        cells = [cell(per_round(name, every, lambda w, b: 100 * (w.mean_step / b.mean_step - 1))) for every in every_list]
        print(f"  {name:<12}" + "".join(f"{text:>26}" for text in cells))
    print("ours, the overhead split (% of the plain loop's step): blocked in save() / interference of background writes")
    for name in ("ours sync", "ours async"):
        parts = []
        for every in every_list:
            blocked = per_round(name, every, lambda w, b: 100 * w.blocked_per_step / b.mean_step)
            interference = per_round(name, every, lambda w, b: 100 * w.interference_per_step(b.quiet_step) / b.mean_step)
            overlapped = statistics.median(w.overlapped_share for w in results[(name, every)])
            parts.append(f"{cell(blocked)} / {cell(interference)} ({overlapped:.0%} of steps)")
        print(f"  {name:<12}  " + "   ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", type=number_list, default=[100, 400], help="state sizes in MiB (default 100,400)")
    parser.add_argument("--every", type=number_list, default=[5, 10, 50], help="save intervals in steps (default 5,10,50)")
    parser.add_argument("--rounds", type=whole_number(2), default=2)
    parser.add_argument("--min-steps", type=whole_number(2), default=30, help="fewest steps of a window")
    parser.add_argument("--batch", type=whole_number(), default=32)
    parser.add_argument("--dir", type=existing_dir, default=None, help="parent of the scratch directory")
    parser.add_argument("--quick", action="store_true", help="100 MiB, N = 10, 2 rounds of 20 steps")
    args = parser.parse_args()
    if args.quick:
        args.states, args.every, args.rounds, args.min_steps = [100], [10], 2, 20
    print(machine())
    root = scratch_dir(str(args.dir) if args.dir else None)
    try:
        for state_mib in args.states:
            results = measure_state(state_mib, args, root)
            print(machine())
            report(state_mib, args.every, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
