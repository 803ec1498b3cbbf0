"""The crash certificate (``benchmarks/crash_certificate.py``): a few trials of every scenario kill
workers at crash points and at random instants and find every invariant kept; and its judge of a
listing after a kill flags what a broken save or retention would leave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "crash_certificate.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from crashcert.checks import judge_listing  # noqa: E402
from crashcert.oracle import CheckpointModel, RegistryModel, replay  # noqa: E402
from crashcert.scenarios import LOCAL_SCENARIOS  # noqa: E402


def certify(tmp_path: Path, scenarios: list[str], trials: int) -> dict[str, Any]:
    report = tmp_path / "certificate.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(SCRIPT), "--trials", str(trials), "--jobs", "2", "--scenario", *scenarios,
               "--json", str(report), "--dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=840, env=env)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return json.loads(report.read_text())


def assert_certified(results: dict[str, Any], trials: int) -> None:
    for scenario in results["scenarios"]:
        name = scenario["scenario"]
        assert scenario["violating_trials"] == 0, scenario["violations"]
        assert scenario["trials"] == trials, name
        assert scenario["random_kills"] >= 1, f"{name}: no worker was killed at a random instant"
        assert scenario["crash_point_kills"] >= 1, f"{name}: no worker was killed at a crash point"
        assert scenario["crash_points"] > 10, f"{name}: the dry run found only {scenario['crash_points']} crash points"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kills_at_crash_points_and_random_instants_break_no_invariant(tmp_path: Path) -> None:
    assert_certified(certify(tmp_path, LOCAL_SCENARIOS, trials=4), trials=4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kills_on_s3_behind_a_faulty_proxy_break_no_invariant(tmp_path: Path) -> None:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    results = certify(tmp_path, ["s3-save", "s3-promote"], trials=2)
    assert_certified(results, trials=2)
    assert results["s3_proxy"]["connections"] > 0


# ---------------------------------------------------------------------- the judge is not blind

def model(listed: dict[int, tuple[int, float]]) -> dict[str, Any]:
    return CheckpointModel(3, True, listed).to_json()


BEFORE = {2: (2, 0.5), 3: (3, 0.4), 4: (4, 0.3), 0: (0, 0.1)}


def spec(interrupted: list[Any] | None = None, after: dict[int, tuple[int, float]] | None = None) -> dict[str, Any]:
    return {"before": model(BEFORE), "after": model(after) if after is not None else None, "interrupted": interrupted,
            "acknowledged": [0, 1, 2, 3, 4]}


def test_the_listing_before_the_interrupted_save_or_after_it_is_kept() -> None:
    assert judge_listing({0: 0, 2: 2, 3: 3, 4: 4}, spec()) == []
    after = {0: (0, 0.1), 3: (3, 0.4), 4: (4, 0.3), 5: (5, 0.9)}
    interrupted = ["save", 5, 5, 0.9]
    assert judge_listing({0: 0, 2: 2, 3: 3, 4: 4}, spec(interrupted, after)) == []  # not committed
    assert judge_listing({0: 0, 2: 2, 3: 3, 4: 4, 5: 5}, spec(interrupted, after)) == []  # retention cut off
    assert judge_listing({0: 0, 3: 3, 4: 4, 5: 5}, spec(interrupted, after)) == []  # all done


def test_a_lost_newest_best_or_acknowledged_checkpoint_is_a_violation() -> None:
    assert judge_listing({2: 2, 3: 3, 4: 4}, spec()) == [
        "best and acknowledged checkpoint epoch_0 (version 0) is missing after the kill"]
    assert judge_listing({0: 0, 2: 2, 3: 3}, spec()) == [
        "newest and acknowledged checkpoint epoch_4 (version 4) is missing after the kill"]
    after = {0: (0, 0.1), 3: (3, 0.4), 4: (4, 0.3), 5: (5, 0.9)}
    assert judge_listing({0: 0, 2: 2, 4: 4, 5: 5}, spec(["save", 5, 5, 0.9], after)) == [
        "acknowledged checkpoint epoch_3 (version 3) is missing after the kill"]


def test_a_deleted_checkpoint_coming_back_or_a_torn_resave_is_a_violation() -> None:
    assert judge_listing({0: 0, 1: 1, 2: 2, 3: 3, 4: 4}, spec()) == [
        "epoch_1 (version 1) is listed, but retention had deleted it or never kept it"]
    after = {0: (0, 0.1), 2: (2, 0.5), 3: (3, 0.4), 4: (7, 0.2)}
    assert judge_listing({0: 0, 2: 2, 3: 3, 4: 6}, spec(["save", 4, 7, 0.2], after)) == [
        "newest and acknowledged checkpoint epoch_4 (version 4) holds version 6 after the kill"]


def test_a_history_that_does_not_lead_to_the_registry_state_is_told_apart() -> None:
    registry = RegistryModel()
    for op in (["validate", 0, "1.0.0"], ["validate", 1, "1.0.1"], ["promote", "1.0.0"], ["promote", "1.0.1"], ["rollback"]):
        registry.apply(op)
    assert replay(registry.events) == registry.state() == {"versions": ["1.0.0", "1.0.1"], "production": "1.0.0", "stack": []}
    assert replay([("validate", "1.0.0"), ("rollback", "1.0.0")]) == {"error": "rollback to 1.0.0 with the stack []"}
