"""``every="auto"`` against every fixed interval, in a simulated run with failures.

    PYTHONPATH=. python benchmarks/autopilot.py [--trials 200] [--seed 0] [--mib 100]

First it measures, on this host, what a checkpoint costs: the median time a synchronous
``CheckpointManager.save`` of a model + Adam state of about ``--mib`` MiB blocks the loop, and the
time ``load_latest`` takes to bring it back (the restart cost). Then, for failures drawn from an
exponential distribution with an MTBF of 10 minutes, 1 hour and 1 day, it simulates a run of fixed
useful work under:

- ``auto``: :class:`ckpt_plugin.auto_interval.AutoInterval` with its defaults and no MTBF given: it
  learns the MTBF from the failures it sees, starting from its prior of one a day, and the cost
  from the saves it makes (each save costs one of the measured save times, drawn at random);
- fixed intervals, a sweep from 5 s to 12 h.

Waste is the wall time beyond the useful work: checkpoint cost, lost work and restarts. Every
policy meets the same failure times in a trial (common random numbers). The table gives each
MTBF's best fixed interval and ``auto``'s waste as a ratio to it; the goal is at most 1.10.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
from _common import build_state, load_average, machine, whole_number

from ckpt_plugin import CheckpointManager
from ckpt_plugin.auto_interval import AutoInterval

MTBFS = {"10 min": 600.0, "1 h": 3600.0, "1 day": 86400.0}
FIXED = [5 * 1.5**k for k in range(22)]  # 5 s ... ~12 h


def measure_costs(mib: int, saves: int) -> tuple[list[float], float]:
    """Measured blocked times of synchronous saves, and the median restore time, in seconds."""
    hidden = int(math.sqrt(mib * 2**20 / 4 / 3 / 4))
    model, optimizer = build_state(hidden=hidden, layers=4)
    blocked, restores = [], []
    with tempfile.TemporaryDirectory() as directory:
        manager = CheckpointManager(directory, max_checkpoints=2)
        for epoch in range(saves + 1):
            began = time.perf_counter()
            manager.save(model, optimizer, epoch=epoch)
            if epoch:  # the first save warms the writer up
                blocked.append(time.perf_counter() - began)
        for _ in range(3):
            began = time.perf_counter()
            state = manager.load_latest()
            restores.append(time.perf_counter() - began)
            del state
    return blocked, statistics.median(restores)


class Fixed:
    def __init__(self, interval: float) -> None:
        self.interval = interval

    def saved(self, now: float, cost: float) -> None:
        pass

    def failed(self, at: float, resumed: float) -> None:
        pass


class Auto:
    def __init__(self) -> None:
        self.rule = AutoInterval()
        self.rule.start(0.0)

    @property
    def interval(self) -> float:
        return self.rule.interval

    def saved(self, now: float, cost: float) -> None:
        self.rule.record_save(now - cost, blocked=cost)

    def failed(self, at: float, resumed: float) -> None:
        self.rule.record_failure(lost_since=at)
        self.rule.start(resumed)


def simulate(policy: Fixed | Auto, work: float, mtbf: float, costs: list[float], restart: float, seed: int) -> float:
    """The waste (wall time beyond ``work``) of one run; infinite when it cannot finish in 100x ``work``."""
    draw = random.Random(seed)
    now = done = progress = 0.0
    upcoming = failure_times(mtbf, restart, seed)
    next_failure = next(upcoming)
    while done < work:
        if now > 100 * work:
            return math.inf
        run = min(policy.interval - progress, work - done - progress)
        if now + run >= next_failure:
            policy.failed(next_failure, next_failure + restart)
            now, progress, next_failure = next_failure + restart, 0.0, next(upcoming)
            continue
        now += run
        progress += run
        if done + progress >= work:
            break
        cost = draw.choice(costs)
        if now + cost >= next_failure:
            policy.failed(next_failure, next_failure + restart)
            now, progress, next_failure = next_failure + restart, 0.0, next(upcoming)
            continue
        now += cost
        done, progress = done + progress, 0.0
        policy.saved(now, cost)
    return now - work


def failure_times(mtbf: float, restart: float, seed: int) -> Iterator[float]:
    """Failure instants: exponential gaps of mean ``mtbf`` from each resume; the same for every
    policy given the same ``seed``."""
    draw = random.Random(seed ^ 0x5EED)
    now = 0.0
    while True:
        now += draw.expovariate(1.0 / mtbf)
        yield now
        now += restart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=whole_number(), default=200)
    parser.add_argument("--seed", type=whole_number(0), default=0)
    parser.add_argument("--mib", type=whole_number(), default=100)
    parser.add_argument("--saves", type=whole_number(), default=7)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(machine(), "| load", load_average())
    costs, restart = measure_costs(args.mib, args.saves)
    print(f"measured: save blocks {statistics.median(costs):.3f} s (median of {len(costs)}, "
          f"{min(costs):.3f}-{max(costs):.3f}), restore {restart:.3f} s, state ~{args.mib} MiB")
    print(f"{'MTBF':>8} {'work':>7} {'best fixed':>11} {'its waste':>10} {'auto waste':>11} {'auto/best':>10} {'auto T (end)':>13}")
    for label, mtbf in MTBFS.items():
        work = max(2 * 86400.0, 30 * mtbf)
        waste: dict[str, list[float]] = {}
        intervals: list[float] = []
        for trial in range(args.trials):
            seed = args.seed * 1_000_003 + trial
            for interval in FIXED:
                waste.setdefault(f"{interval}", []).append(simulate(Fixed(interval), work, mtbf, costs, restart, seed))
            auto = Auto()
            waste.setdefault("auto", []).append(simulate(auto, work, mtbf, costs, restart, seed))
            intervals.append(auto.interval)
        mean = {name: statistics.fmean(values) for name, values in waste.items()}
        best = min(FIXED, key=lambda interval: mean[f"{interval}"])
        ratio = mean["auto"] / mean[f"{best}"]
        print(f"{label:>8} {work / 3600:>6.0f}h {best:>10.0f}s {mean[f'{best}'] / 60:>9.1f}m {mean['auto'] / 60:>10.1f}m "
              f"{ratio:>10.3f} {statistics.median(intervals):>12.0f}s")


if __name__ == "__main__":
    main()
