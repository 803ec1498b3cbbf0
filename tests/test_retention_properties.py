"""Property tests for retention: on the pure policies, and on a real manager's directory.

Whatever the sequence of saves, metrics (missing and NaN included), ``max_checkpoints`` and
``keep_top_k`` (``keep_best`` is ``keep_top_k=1``): the k best are never deleted, the newest and
the ``max_checkpoints`` most recent are always kept, ``None`` keeps everything, and nothing else
survives.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_plugin import CheckpointManager
from ckpt_plugin import _retention as retention


@dataclass(frozen=True)
class Entry:
    epoch: int
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, -1 if self.step is None else self.step)


METRIC = "loss"

metric_values = st.one_of(
    st.none(),  # the metric is missing
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([float("nan"), 0.0, -0.0, 1.0]),
)
saves = st.lists(
    st.tuples(st.integers(0, 12), st.one_of(st.none(), st.integers(0, 3)), metric_values),
    min_size=1,
    max_size=25,
)
max_values = st.one_of(st.none(), st.integers(1, 5))


def usable(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def best_value(entries, mode: str) -> float | None:
    values = [v for v in (usable(e.metrics.get(METRIC)) for e in entries) if v is not None]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def top_k_values(entries, mode: str, k: int) -> list[float]:
    """The ``k`` best usable values among ``entries``, best first (duplicates count separately)."""
    values = sorted(v for v in (usable(e.metrics.get(METRIC)) for e in entries) if v is not None)
    return (values if mode == "min" else values[::-1])[:k]


def check_invariants(before, after, max_checkpoints, top_k, mode, just_saved=None) -> None:
    """``before``: every checkpoint right after a save committed; ``after``: those retention kept;
    ``just_saved``: the key of the checkpoint that save wrote, which must survive as well;
    ``top_k``: how many of the best by the metric must survive (0: none, 1: ``keep_best``)."""
    before_keys = sorted(e.key for e in before)
    after_keys = sorted(e.key for e in after)
    assert set(after_keys) <= set(before_keys), "retention invented a checkpoint"
    if just_saved is not None:
        assert just_saved in after_keys, "the checkpoint a save just wrote was deleted"
    if max_checkpoints is None:
        assert after_keys == before_keys, "max_checkpoints=None must keep every checkpoint"
        return
    assert before_keys[-1] in after_keys, "the newest checkpoint was deleted"
    recent = set(before_keys[-max_checkpoints:])
    assert recent <= set(after_keys), "one of the max_checkpoints most recent was deleted"
    best = top_k_values(before, mode, top_k)
    if best:
        # The k best values all survive: as many survivors reach the k-th best value as there are
        # values at least that good, up to k, and everything strictly better survives.
        kth = best[-1]
        better = (lambda v: v < kth) if mode == "min" else (lambda v: v > kth)
        at_least = (lambda v: v <= kth) if mode == "min" else (lambda v: v >= kth)
        survivors = [v for v in (usable(e.metrics.get(METRIC)) for e in after) if v is not None]
        assert sum(at_least(v) for v in survivors) >= len(best), "one of the top-k checkpoints was deleted"
        strictly = [e.key for e in before if (v := usable(e.metrics.get(METRIC))) is not None and better(v)]
        assert set(strictly) <= set(after_keys), "a checkpoint better than the k-th best was deleted"
    protected = recent | {just_saved}
    extra = [e for e in after if e.key not in protected]
    assert len(extra) <= len(best), "a checkpoint neither recent nor among the top-k survived"
    for entry in extra:
        value = usable(entry.metrics.get(METRIC))
        assert value is not None and at_least(value), "a checkpoint neither recent nor among the top-k survived"
    older_save = just_saved is not None and just_saved not in recent
    assert len(after) <= max_checkpoints + top_k + (1 if older_save else 0)


def simulate(history, max_checkpoints, top_k, mode):
    """Apply the pure retention policies to a sequence of saves, checking invariants each time."""
    policies = retention.policies_for(max_checkpoints, top_k > 0, METRIC, mode, top_k or None)
    current: list[Entry] = []
    every_save: list[Entry] = []
    for epoch, step, value in history:
        metrics = {} if value is None else {METRIC: value}
        entry = Entry(epoch, step, metrics)
        every_save.append(entry)
        current = sorted([e for e in current if e.key != entry.key] + [entry], key=lambda e: e.key)
        doomed = retention.to_delete(current, policies, entry.key)
        after = [e for e in current if all(e is not d for d in doomed)]
        check_invariants(current, after, max_checkpoints, top_k, mode, entry.key)
        current = after
    return current, every_save


top_ks = st.integers(0, 4)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(history=saves, max_checkpoints=max_values, top_k=top_ks, mode=st.sampled_from(["min", "max"]))
def test_pure_retention_invariants(history, max_checkpoints, top_k, mode):
    final, every_save = simulate(history, max_checkpoints, top_k, mode)
    names = [e.key for e in every_save]
    if top_k and max_checkpoints is not None and len(set(names)) == len(names):
        # Without re-saves, the k best of the whole run are never lost.
        best = top_k_values(every_save, mode, top_k)
        assert sorted(top_k_values(final, mode, top_k)) == sorted(best)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(history=saves, max_checkpoints=max_values, mode=st.sampled_from(["min", "max"]))
def test_keep_best_is_keep_top_k_1(history, max_checkpoints, mode):
    entries = sorted({Entry(e, s, {} if v is None else {METRIC: v}) for e, s, v in history}, key=lambda e: e.key)
    as_best = retention.policies_for(max_checkpoints, True, METRIC, mode)
    as_top_1 = retention.policies_for(max_checkpoints, False, METRIC, mode, keep_top_k=1)
    assert retention.to_delete(entries, as_best) == retention.to_delete(entries, as_top_1)


@settings(derandomize=True)
@given(entries=st.lists(metric_values, max_size=12), mode=st.sampled_from(["min", "max"]))
def test_best_index_ignores_missing_and_nan(entries, mode):
    checkpoints = [Entry(i, None, {} if v is None else {METRIC: v}) for i, v in enumerate(entries)]
    index = retention.best_index(checkpoints, METRIC, mode)
    best = best_value(checkpoints, mode)
    if best is None:
        assert index is None
    else:
        assert usable(checkpoints[index].metrics[METRIC]) == best


def test_retention_never_deletes_the_only_checkpoint():
    policies = retention.policies_for(1, True, METRIC, "min")
    assert retention.to_delete([Entry(0, None, {})], policies) == []
    assert retention.to_delete([], policies) == []
    assert retention.policies_for(None, True, METRIC, "min") == []


# ------------------------------------------------------------------ the same on a real directory


def listed(manager: CheckpointManager) -> list[Entry]:
    return [Entry(info.epoch, info.step, dict(info.metrics)) for info in manager.checkpoints()]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(st.tuples(st.integers(0, 6), st.one_of(st.none(), st.integers(0, 1)), metric_values),
                     min_size=1, max_size=8),
    max_checkpoints=max_values,
    top_k=top_ks,
    mode=st.sampled_from(["min", "max"]),
)
def test_manager_directory_obeys_retention(history, max_checkpoints, top_k, mode):
    state = {"w": torch.zeros(2)}
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(directory, max_checkpoints=max_checkpoints, keep_best=top_k > 0,
                                    metric_for_best=METRIC, mode=mode, save_rng=False,
                                    keep_top_k=top_k or None, require_metric=False)
        for epoch, step, value in history:
            before = listed(manager)
            metrics = {} if value is None else {METRIC: value}
            manager.save(model=state, epoch=epoch, step=step, metrics=metrics)
            entry = Entry(epoch, step, metrics)
            committed = sorted([e for e in before if e.key != entry.key] + [entry], key=lambda e: e.key)
            after = listed(manager)
            check_invariants(committed, after, max_checkpoints, top_k, mode, entry.key)
            # A second manager over the same directory agrees, and every listed checkpoint loads.
            other = CheckpointManager(directory, max_checkpoints=None, keep_best=False, save_rng=False)
            assert [e.key for e in listed(other)] == [e.key for e in after]
        for info in manager.checkpoints():
            assert torch.equal(manager.load(epoch=info.epoch, step=info.step)["model"]["w"], state["w"])
