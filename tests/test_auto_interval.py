"""``every="auto"``'s arithmetic: Young and Daly's interval over measured costs and learned MTBF."""

from __future__ import annotations

import logging
import math

import pytest

from ckpt_plugin.auto_interval import AutoInterval, StepCosts, seconds, young_daly
from ckpt_plugin.errors import ConfigurationError


@pytest.mark.parametrize(("text", "expected"), [("90s", 90), ("15min", 900), ("6h", 21600), ("2d", 172800), (" 1.5 h ", 5400), (30, 30)])
def test_durations_read_in_seconds(text: object, expected: float) -> None:
    assert seconds(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["6 hours", "-1h", "0", "", True, float("nan"), "h"])
def test_bad_durations_are_refused_with_the_forms_accepted(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="mtbf must be"):
        seconds(bad, "mtbf")  # type: ignore[arg-type]


def test_the_interval_follows_young_and_daly_and_the_median_cost() -> None:
    auto = AutoInterval("6h", min_interval=1, max_interval="1d")
    assert auto.interval == 1  # nothing measured yet: save soon, to learn the cost
    for cost in (2.0, 2.0, 50.0):  # one slow save does not swing the median
        auto.record_save(0.0, blocked=cost)
    assert auto.interval == pytest.approx(math.sqrt(2 * 2.0 * 21600))
    assert young_daly(2.0, 21600) == pytest.approx(auto.interval)


def test_the_interval_is_clamped() -> None:
    auto = AutoInterval("1d", min_interval="10min", max_interval="30min")
    auto.record_save(0.0, blocked=100.0)
    assert auto.interval == 1800
    auto = AutoInterval("10min", min_interval="10min", max_interval="30min")
    auto.record_save(0.0, blocked=0.01)
    assert auto.interval == 600
    with pytest.raises(ConfigurationError, match="min_interval"):
        AutoInterval(min_interval="2h", max_interval="1h")


def test_mtbf_is_learned_from_failures_after_the_prior() -> None:
    auto = AutoInterval(prior_mtbf="1d")
    assert auto.mtbf == 86400
    auto.learn(failures=0, observed=2 * 86400.0)  # two days without a failure: at least that
    assert auto.mtbf == 2 * 86400
    auto = AutoInterval(prior_mtbf="1d")
    auto.learn(failures=9, observed=5400.0)  # nine failures in 90 minutes
    assert auto.mtbf == pytest.approx(600)
    auto.start(0.0)
    auto.record_save(300.0, blocked=1.0)
    auto.record_failure(lost_since=400.0)
    assert auto.mtbf == pytest.approx((5400 + 400) / 10)
    auto.start(410.0)  # resumed: the restart is not observed time
    auto.record_save(420.0, blocked=1.0)
    assert auto.mtbf == pytest.approx((5400 + 400 + 10) / 10)


def test_due_counts_from_the_last_checkpoint_taken() -> None:
    auto = AutoInterval("1h", min_interval=10, max_interval="1d")
    assert not auto.due(100.0)  # the first call starts the clock
    assert not auto.due(105.0)
    assert auto.due(110.0)
    auto.record_save(110.0, blocked=2.0)
    interval = auto.interval
    assert not auto.due(110.0 + interval - 1)
    assert auto.due(110.0 + interval)


def test_interference_is_the_slowdown_of_steps_that_overlapped_a_write() -> None:
    auto = AutoInterval("1h", min_interval=0.001)
    costs = StepCosts(auto)
    now = 0.0
    for _ in range(10):  # quiet steps of 1 s
        now += 1.0
        costs.step(now, writing=False)
    costs.save_began(now)
    now += 0.5
    costs.save_returned(now, in_background=True)
    assert costs.writing
    for _ in range(4):  # four steps of 1.25 s while the write runs: 1 s of interference
        now += 1.25
        costs.step(now, writing=True)
    costs.write_ended(now)
    assert not costs.writing
    assert auto.cost == pytest.approx(0.5 + 1.0)


def test_a_synchronous_save_costs_its_blocked_time() -> None:
    auto = AutoInterval("1h", min_interval=0.001)
    costs = StepCosts(auto)
    costs.step(0.0, writing=False)
    costs.save_began(1.0)
    costs.save_returned(4.0, in_background=False)
    assert auto.cost == pytest.approx(3.0)


def test_each_change_of_interval_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    auto = AutoInterval("1h", min_interval=1)
    with caplog.at_level(logging.INFO, logger="ckpt_plugin"):
        auto.record_save(0.0, blocked=1.0)
        auto.record_save(10.0, blocked=1.0)
        auto.record_save(20.0, blocked=1.01)
        auto.record_save(30.0, blocked=9.0)
        auto.record_save(40.0, blocked=9.0)
        auto.record_save(50.0, blocked=9.0)  # the median moves with the third slow save
    changes = [r.getMessage() for r in caplog.records if "checkpoint interval" in r.getMessage()]
    assert len(changes) == 2, changes


def test_the_save_log_records_restarts_and_the_time_between_them() -> None:
    from ckpt_plugin.auto_interval import learned_from_log

    entries = [
        {"time": "2026-01-01T00:00:00+00:00"},
        {"time": "2026-01-01T00:10:00+00:00"},
        {"time": "2026-01-01T05:00:00+00:00", "resumed": True},  # the gap holds the downtime
        {"time": "2026-01-01T05:20:00+00:00"},
        {"time": None},
    ]
    assert learned_from_log(entries) == (1, 1800.0)


def test_manager_due_measures_saves_and_learns_restarts_from_the_log(tmp_path) -> None:
    import torch

    from ckpt_plugin import CheckpointManager
    from ckpt_plugin import _savelog as savelog

    model = torch.nn.Linear(4, 2)
    manager = CheckpointManager(tmp_path, max_checkpoints=2)
    manager.save(model, epoch=0)
    assert manager.due(0, mtbf="1h", min_interval=0.001, max_interval=1000) is False  # the first call starts the clock
    rule = manager.auto_interval
    assert rule is not None and rule.cost is None
    manager.save(model, epoch=1)
    assert rule.cost is not None and rule.cost > 0  # the save was measured
    assert rule.mtbf == 3600

    resumed = CheckpointManager(tmp_path, max_checkpoints=2)
    assert resumed.load_latest() is not None  # a resume: the next save's log entry says so
    resumed.save(model, epoch=2)
    assert [entry["resumed"] for entry in savelog.read(tmp_path)] == [False, False, True]
    again = CheckpointManager(tmp_path, max_checkpoints=2)
    again.due(0)
    assert again.auto_interval is not None and again.auto_interval.failures == 1
