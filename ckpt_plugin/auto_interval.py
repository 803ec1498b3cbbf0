"""The checkpoint interval that wastes least: Young and Daly's ``T = sqrt(2 * C * MTBF)``.

``C`` is what one checkpoint costs the run (the time training was blocked, plus the slowdown of the
steps that overlapped a background write) and ``MTBF`` the mean time between failures. Checkpoint
more often and the saves cost more than they protect; less often and a failure throws away more
work. :class:`AutoInterval` keeps both figures current:

- ``C`` is the median of the recent saves' measured costs, so one slow save does not swing it;
- ``MTBF`` is given (``mtbf="6h"``) or learned from the failures the run has seen: the time
  observed per failure, and ``prior_mtbf`` until the first failure, so a run that has seen none
  yet still has an interval.

The interval is clamped to ``[min_interval, max_interval]`` and re-evaluated after every save and
failure; each change of more than 10% is logged once. Pure arithmetic over the figures it is given:
the caller supplies the clock readings.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .errors import ConfigurationError

LOG = logging.getLogger("ckpt_plugin")
DEFAULT_PRIOR_MTBF = 24 * 3600.0
"""The failure rate assumed before the run has seen one: one a day, as large clusters report."""
RECENT_SAVES = 5
"""How many recent save costs the median of ``C`` is taken over."""
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|d)?\s*$")


def seconds(value: str | float | int, name: str = "duration") -> float:
    """``value`` in seconds: a number of seconds, or a string such as ``"90s"``, ``"15min"``,
    ``"6h"``, ``"2d"``. Raises :class:`ConfigurationError` for anything else, or a value not above 0."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a number of seconds or a string such as '6h', not {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigurationError(
                f"{name} must be a number of seconds or a string such as '90s', '15min', '6h' or '2d', not {value!r}"
            )
        result = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(result) or result <= 0:
        raise ConfigurationError(f"{name} must be above 0 seconds, not {value!r}")
    return result


def young_daly(cost: float, mtbf: float) -> float:
    """The first-order optimal interval between checkpoints, in the units of its arguments."""
    return math.sqrt(2.0 * cost * mtbf)


class AutoInterval:
    """When the next checkpoint is due, by Young and Daly's rule over measured costs.

    Args:
        mtbf: the mean time between failures (seconds, or ``"6h"``), or ``None`` to learn it from
            :meth:`record_failure`.
        min_interval: the shortest interval allowed (default 10 s, which keeps a 1 s save under
            10% of the run even when failures come every few minutes).
        max_interval: the longest interval allowed (default 6 h).
        prior_mtbf: with ``mtbf=None``, the MTBF assumed until the first failure (default 1 day).
    """

    def __init__(
        self,
        mtbf: str | float | None = None,
        *,
        min_interval: str | float = 10.0,
        max_interval: str | float = 6 * 3600.0,
        prior_mtbf: str | float = DEFAULT_PRIOR_MTBF,
    ) -> None:
        self.mtbf_given = None if mtbf is None else seconds(mtbf, "mtbf")
        self.min_interval = seconds(min_interval, "min_interval")
        self.max_interval = seconds(max_interval, "max_interval")
        if self.min_interval > self.max_interval:
            raise ConfigurationError(
                f"min_interval ({self.min_interval:g} s) is above max_interval ({self.max_interval:g} s); swap or widen them"
            )
        self.prior_mtbf = seconds(prior_mtbf, "prior_mtbf")
        self._costs: deque[float] = deque(maxlen=RECENT_SAVES)
        self._failures = 0
        self._observed = 0.0
        self._last_save: float | None = None
        self._logged: float | None = None

    @property
    def cost(self) -> float | None:
        """``C``: the median cost of the recent saves, in seconds; ``None`` before the first."""
        return statistics.median(self._costs) if self._costs else None

    @property
    def failures(self) -> int:
        """The failures counted so far (recorded, learned and seen)."""
        return self._failures

    @property
    def mtbf(self) -> float:
        """The MTBF in force: the one given; else, once the run has failed, the time observed per
        failure; before that, the prior, or the time observed without a failure when it is longer."""
        if self.mtbf_given is not None:
            return self.mtbf_given
        if self._failures == 0 or self._observed <= 0:
            return max(self.prior_mtbf, self._observed)
        return self._observed / self._failures

    @property
    def interval(self) -> float:
        """The interval in force, in seconds; ``min_interval`` until a save has been measured."""
        cost = self.cost
        if cost is None:
            return self.min_interval
        return min(self.max_interval, max(self.min_interval, young_daly(cost, self.mtbf)))

    def due(self, now: float) -> bool:
        """Whether a checkpoint is due at clock reading ``now`` (seconds): the interval has passed
        since the last save (or since :meth:`start`, or the first call)."""
        if self._last_save is None:
            self._last_save = now
            return False
        return now - self._last_save >= self.interval

    def start(self, now: float) -> None:
        """Start (or restart, after a failure) the clock at ``now``."""
        self._last_save = now

    def record_save(self, now: float, blocked: float, interference: float = 0.0) -> None:
        """A save taken at ``now`` cost ``blocked`` seconds of blocked training plus ``interference``
        seconds of slowdown of the steps that overlapped its background write."""
        self.record_taken(now)
        self.record_cost(blocked, interference)

    def record_taken(self, now: float) -> None:
        """A checkpoint of the state at ``now`` was taken: the interval counts from here."""
        self._advance(now)
        self._last_save = now

    def record_cost(self, blocked: float, interference: float = 0.0) -> None:
        """What the last save cost, once it is known (a background write may end later)."""
        if blocked < 0 or interference < 0:
            raise ValueError(f"a save's cost cannot be negative: blocked={blocked}, interference={interference}")
        self._costs.append(blocked + interference)
        self._log_change()

    def record_failure(self, lost_since: float | None = None) -> None:
        """The run failed (a preemption or a crash); the time since :meth:`start` or the last save
        counts as observed, and ``lost_since`` is the clock reading at the failure when known."""
        if lost_since is not None:
            self._advance(lost_since)
            self._last_save = lost_since  # counted; :meth:`start` restarts the clock on resume
        self._failures += 1
        self._log_change()

    def learn(self, failures: int, observed: float) -> None:
        """Take in what earlier runs recorded: ``failures`` failures over ``observed`` seconds."""
        self._failures += failures
        self._observed += observed
        self._log_change()

    def _advance(self, now: float) -> None:
        if self._last_save is not None and now > self._last_save:
            self._observed += now - self._last_save

    def _log_change(self) -> None:
        if self.cost is None:
            return
        interval = self.interval
        if self._logged is None or abs(interval - self._logged) > 0.1 * self._logged:
            LOG.info(
                "checkpoint interval now %.0f s (save cost %.2f s, MTBF %.0f s%s)",
                interval, self.cost, self.mtbf, "" if self.mtbf_given is not None else ", learned",
            )
            self._logged = interval



class StepCosts:
    """The cost ``C`` of each save, measured from the training loop's own steps.

    Call :meth:`step` once per training step with whether a background write was running, and
    :meth:`save_began` / :meth:`save_returned` / :meth:`write_ended` around each save. A save's cost
    is the time it blocked the loop plus its interference: how much longer the steps that
    overlapped its background write took than the median of recent steps that overlapped none.
    """

    def __init__(self, interval: AutoInterval, *, baseline_steps: int = 32) -> None:
        self.interval = interval
        self._quiet: deque[float] = deque(maxlen=baseline_steps)
        self._previous: float | None = None
        self._began: float | None = None
        self._blocked = 0.0
        self._interference = 0.0
        self._writing = False

    def step(self, now: float, writing: bool) -> None:
        """A training step ended at ``now``; ``writing`` says whether a background write overlapped it."""
        if self._previous is not None:
            duration = now - self._previous
            if writing and self._quiet:
                self._interference += max(0.0, duration - statistics.median(self._quiet))
            elif not writing:
                self._quiet.append(duration)
        self._previous = now

    def save_began(self, now: float) -> None:
        """A save was called at ``now``: the checkpoint holds the state of this instant."""
        self._began = now
        self._interference = 0.0
        self.interval.record_taken(now)

    def save_returned(self, now: float, *, in_background: bool) -> None:
        """The save returned to the loop at ``now``; ``in_background`` when its write goes on."""
        began = self._began if self._began is not None else now
        self._blocked = max(0.0, now - began)
        self._previous = now  # the time blocked is not a step's
        self._writing = in_background
        if not in_background:
            self.write_ended(now)

    def write_ended(self, now: float) -> None:
        """The save's write (background or not) ended at ``now``: its cost is known."""
        self._writing = False
        self.interval.record_cost(self._blocked, self._interference)
        self._blocked = self._interference = 0.0
        self._began = None

    @property
    def writing(self) -> bool:
        """Whether a save's background write is still being measured."""
        return self._writing


def learned_from_log(entries: list[dict[str, Any]]) -> tuple[int, float]:
    """The failures and the seconds of training a run's save log records: each save marked
    ``resumed`` is a restart after a failure or a preemption, and the time between consecutive
    saves counts as observed except across a restart (that gap holds the downtime)."""
    failures, observed, previous = 0, 0.0, None
    for entry in entries:
        when = _instant(entry.get("time"))
        if entry.get("resumed"):
            failures += 1
        elif when is not None and previous is not None and when > previous:
            observed += when - previous
        previous = when if when is not None else previous
    return failures, observed


def _instant(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class SaveCadence:
    """``every="auto"`` for one manager: :class:`AutoInterval` fed by :class:`StepCosts`, asked
    once per training step. ``clock`` is ``time.monotonic`` unless a test gives another."""

    def __init__(self, interval: AutoInterval, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.costs = StepCosts(interval)
        self.clock = clock
        self.options: tuple[Any, ...] = ()

    def due(self, writing: bool) -> bool:
        """End a training step; whether a checkpoint is due now. ``writing``: a background save is running."""
        now = self.clock()
        if self.costs.writing and not writing:
            self.costs.write_ended(now)
        self.costs.step(now, writing)
        return self.interval.due(now)

    def save_began(self) -> None:
        self.costs.save_began(self.clock())

    def save_returned(self, in_background: bool) -> None:
        self.costs.save_returned(self.clock(), in_background=in_background)
