"""Messages that say what happened and what to do: every usage error exits 2 and names the fix in
the terms of the command line; a registry cannot be reached through a mistyped directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_plugin import ArtifactRegistry, CheckpointManager, CheckpointNotFoundError, ConfigurationError, cli

runner = CliRunner()


def ckpt(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(cli.app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Epochs 10, 20 and 80, each saved at a step; version 1.0.0 validated (unsigned) and in production."""
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=None, metric_for_best="loss")
    for epoch in (10, 20, 80):
        manager.save(torch.nn.Linear(2, 2), epoch=epoch, step=10 * epoch, metrics={"loss": 1 / epoch, "accuracy": 0.5})
    registry = ArtifactRegistry(directory)
    registry.validate(80, "1.0.0")
    registry.promote("1.0.0")
    return directory


def test_a_requirement_on_a_metric_that_was_not_recorded_is_a_usage_error(run: Path) -> None:
    code, output = ckpt("validate", run, "best", "--version", "2.0.0", "--require", "acuracy>=0.9")
    assert code == 2, output
    assert "'acuracy'" in output and "loss, accuracy" in output and "Nothing was validated" in output
    assert ArtifactRegistry(run).versions() == ["1.0.0"]


def test_the_registry_refuses_a_check_that_names_an_unrecorded_metric(run: Path) -> None:
    _, check = cli.metric_check("f1 > 0.5")
    with pytest.raises(ConfigurationError, match="'f1'.*loss, accuracy"):
        ArtifactRegistry(run).validate(20, "2.0.0", checks={"f1 > 0.5": check})
    assert ArtifactRegistry(run).versions() == ["1.0.0"]


def test_verify_with_a_key_says_once_that_a_version_is_unsigned_and_how_to_sign(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    from security_helpers import key_pair

    _, public = key_pair(tmp_path, "ours")
    code, output = ckpt("verify", run, "--key", public)
    assert code == 1
    assert output.count("not signed") == 1, output
    assert "1.0.0" in output and "production" in output and "--signing-key" in output and "ckpt validate" in output
    output = output.replace(str(run), "DIR")
    assert "verify_with" not in output and "corrupt" not in output.lower()


@pytest.mark.parametrize("command", [["promote", "{run}", "2.0.0"], ["show", "{run}", "v2.0.0"]])
def test_an_unknown_version_suggests_validating_it(run: Path, command: list[str]) -> None:
    code, output = ckpt(*(part.format(run=run) for part in command))
    assert code == 2
    assert "version 2.0.0 is not validated yet" in output and "validated versions: 1.0.0" in output
    assert "ckpt validate" in output and "--version 2.0.0" in output
    assert "in validated" not in output.replace(str(run.parent / "validated"), "<dir>")


def test_an_unknown_epoch_lists_the_epochs(run: Path) -> None:
    code, output = ckpt("show", run, "7")
    assert code == 2 and "existing epochs: 10, 20, 80" in output and "_step_" not in output.split("existing epochs")[1]
    with pytest.raises(CheckpointNotFoundError, match=r"epoch 20 step 5 .* epoch 20 has step 200"):
        CheckpointManager(run).load(20, step=5)


def test_epoch_lists_are_compressed_into_ranges(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run", max_checkpoints=None)
    for epoch in [*range(6), 9]:
        manager.save(torch.nn.Linear(1, 1), epoch=epoch)
    with pytest.raises(CheckpointNotFoundError, match=r"existing epochs: 0-5, 9$"):
        manager.load(7)


def test_a_mistyped_directory_does_not_reach_the_registry_beside_it(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(run.parent)  # validated/ and production/ are here, beside checkpoints/
    mistyped = ArtifactRegistry("checkpont")
    for method in (mistyped.versions, mistyped.production, mistyped.load_production, mistyped.history,
                   lambda: mistyped.validation("1.0.0"), lambda: mistyped.promote("1.0.0"), mistyped.rollback):
        with pytest.raises(CheckpointNotFoundError, match=r"checkpont does not exist.*validated_dir="):
            method()
    for command in (["versions", "checkpont"], ["history", "checkpont"], ["rollback", "checkpont"]):
        code, output = ckpt(*command)
        assert code == 2 and "checkpont is not a directory" in output, output
    # explicit places need no checkpoint directory: a server that only has production/
    served = ArtifactRegistry("nowhere", production_dir="production").load_production()
    assert served["version"] == "1.0.0"
    assert ArtifactRegistry("checkpoints").versions() == ["1.0.0"]


def test_a_registry_made_before_the_first_save_works_once_the_run_saved(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    registry = ArtifactRegistry(tmp_path / "run" / "checkpoints")  # as a script sets both up before training
    manager.save(torch.nn.Linear(2, 2), epoch=1, metrics={"loss": 0.5})
    assert registry.validate(1, "1.0.0")["version"] == "1.0.0"
    assert registry.promote("1.0.0")["version"] == "1.0.0"


def test_checkpoint_info_has_a_short_repr(run: Path) -> None:
    manager = CheckpointManager(run, metric_for_best="loss")
    manager.save(torch.nn.Linear(2, 2), epoch=90, step=900,
                 metrics={**{f"eval_metric_number_{index}": index / 7 for index in range(30)}, "loss": 0.012345678})
    shown = repr(manager.latest())
    assert shown.startswith("CheckpointInfo(name='epoch_90_step_900', epoch=90, step=900, metrics={'loss': 0.01235, ")
    assert "+28 more" in shown and len(shown) < 200 and str(run) not in shown
    assert repr(manager.find(10)) == "CheckpointInfo(name='epoch_10_step_100', epoch=10, step=100, metrics={'loss': 0.1, 'accuracy': 0.5})"
