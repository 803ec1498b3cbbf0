"""Which checkpoints to keep: small policies that each mark what they preserve. No I/O.

A policy is any object with ``should_preserve(checkpoints) -> list[bool]``, given the checkpoints
oldest first. A checkpoint is deleted only when no policy preserves it, and the newest one is
always preserved, so retention can never delete the only loadable checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

MODES = ("min", "max")


class RetentionEntry(Protocol):
    """What retention needs to know of a checkpoint."""

    @property
    def epoch(self) -> int: ...

    @property
    def step(self) -> int | None: ...

    @property
    def metrics(self) -> Mapping[str, Any]: ...


class RetentionPolicy(Protocol):
    def should_preserve(self, checkpoints: Sequence[RetentionEntry]) -> list[bool]: ...


def order_key(epoch: int, step: int | None) -> tuple[int, int]:
    """Checkpoints sort by epoch, then step; a checkpoint without a step sorts first in its epoch."""
    return (epoch, -1 if step is None else step)


def metric_value(entry: RetentionEntry, metric: str) -> float | None:
    """The entry's value for ``metric`` as a float, or None if it is missing, non-numeric, NaN, or a
    whole number too large for a float (``10**400`` in a document someone edited): such a
    checkpoint is never ranked, and never stops the ranking of the others."""
    return as_float(entry.metrics.get(metric))


def as_float(value: Any) -> float | None:
    """``value`` as a float for ranking, or None if it is not a number, is NaN or overflows a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return None if math.isnan(value) else value


def best_index(checkpoints: Sequence[RetentionEntry], metric: str, mode: str) -> int | None:
    """The index of the best checkpoint by ``metric`` (the earliest on ties), or None if none has it."""
    order = ranked(checkpoints, metric, mode)
    return order[0] if order else None


@dataclass(frozen=True)
class KeepLatest:
    """Preserve the ``count`` most recent checkpoints."""

    count: int

    def should_preserve(self, checkpoints: Sequence[RetentionEntry]) -> list[bool]:
        cutoff = len(checkpoints) - self.count
        return [index >= cutoff for index in range(len(checkpoints))]


def ranked(checkpoints: Sequence[RetentionEntry], metric: str, mode: str) -> list[int]:
    """Indices of the checkpoints that record ``metric``, best first (the earlier first on ties)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    scored = [(value, index) for index, entry in enumerate(checkpoints) if (value := metric_value(entry, metric)) is not None]
    scored.sort(key=lambda pair: (pair[0] if mode == "min" else -pair[0], pair[1]))
    return [index for _, index in scored]


@dataclass(frozen=True)
class KeepTopK:
    """Preserve the ``k`` best checkpoints by ``metric`` in ``mode`` ("min" or "max").

    Checkpoints without the metric, or with NaN for it, are never among them; on ties the earlier
    checkpoint ranks first. Lightning's ``save_top_k`` and Orbax's ``best_fn`` with ``max_to_keep``.
    """

    metric: str
    mode: str = "min"
    k: int = 1

    def should_preserve(self, checkpoints: Sequence[RetentionEntry]) -> list[bool]:
        top = set(ranked(checkpoints, self.metric, self.mode)[: self.k])
        return [index in top for index in range(len(checkpoints))]


@dataclass(frozen=True)
class KeepBest(KeepTopK):
    """Preserve the best checkpoint by ``metric`` in ``mode``: ``KeepTopK`` with ``k=1``."""

    k: int = 1


def policies_for(
    max_checkpoints: int | None, keep_best: bool, metric: str | None, mode: str, keep_top_k: int | None = None
) -> list[RetentionPolicy]:
    """The policies a manager's options describe. An empty list keeps everything.

    ``keep_top_k`` keeps the k best by ``metric`` besides the ``max_checkpoints`` most recent;
    ``keep_best`` alone means ``keep_top_k=1``.
    """
    if max_checkpoints is None:
        return []
    policies: list[RetentionPolicy] = [KeepLatest(max_checkpoints)]
    k = keep_top_k if keep_top_k is not None else (1 if keep_best else 0)
    if k > 0 and metric is not None:
        policies.append(KeepTopK(metric, mode, k))
    return policies


def to_delete(
    checkpoints: Sequence[RetentionEntry],
    policies: Sequence[RetentionPolicy],
    protected: tuple[int, int] | None = None,
) -> list[RetentionEntry]:
    """The checkpoints no policy preserves. ``checkpoints`` must be ordered oldest first.

    ``protected`` is the ``order_key`` of a checkpoint that must survive regardless (the one a save
    just wrote, even when older epochs than it are what the directory's other checkpoints hold).
    """
    if not policies or not checkpoints:
        return []
    keep = [False] * len(checkpoints)
    for policy in policies:
        keep = [kept or preserved for kept, preserved in zip(keep, policy.should_preserve(checkpoints), strict=True)]
    keep[-1] = True
    return [
        entry
        for entry, kept in zip(checkpoints, keep)
        if not kept and order_key(entry.epoch, entry.step) != protected
    ]
