"""`ckpt plot` and the save log it draws from: every checkpoint ever saved, marked as the directory says."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
typer_testing = pytest.importorskip("typer.testing")

from ckpt_plugin import ArtifactRegistry, CheckpointManager  # noqa: E402
from ckpt_plugin import savelog  # noqa: E402
from ckpt_plugin.cli import app  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """12 saves, the last 3 kept plus the best (epoch 4), two validated versions, one in production."""
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=3, keep_best=True, metric_for_best="val_loss")
    model = torch.nn.Linear(2, 2)
    for epoch in range(12):
        loss = 1 / (epoch + 1) + (0.3 if epoch > 4 else 0.0)
        metrics = {"val_loss": loss, "accuracy": epoch / 12, "grad_norm": math.nan if epoch == 7 else 1.0}
        manager.save(model, epoch=epoch, step=10 * (epoch + 1), metrics=metrics)
    registry = ArtifactRegistry(directory)
    registry.validate(epoch="best", version="1.0.0")
    registry.validate(epoch="latest", version="1.1.0")
    registry.promote("1.0.0")
    return directory


def png_description(path: Path) -> dict:
    """The marks written into the PNG's Description text chunk."""
    from PIL import Image  # installed with matplotlib

    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
        return json.loads(image.text["Description"])


def expected_marks(directory: Path) -> dict:
    manager = CheckpointManager(directory)
    kept = [info.name for info in manager.checkpoints()]
    saved = [entry["name"] for entry in savelog.read(directory)]
    registry = ArtifactRegistry(directory)
    return {
        "kept": kept,
        "pruned": [name for name in saved if name not in kept],
        "best": manager.best().name,
        "latest": manager.latest().name,
        "validated": {version: registry.validation(version)["source"]["name"] for version in registry.versions()},
        "production": {"version": registry.production()["version"], "checkpoint": registry.production()["source"]["name"]},
    }


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_plot_marks_match_the_directory(run: Path, tmp_path: Path, suffix: str) -> None:
    output = tmp_path / f"run{suffix}"
    result = typer_testing.CliRunner().invoke(app, ["plot", str(run), "-o", str(output), "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    expected = expected_marks(run)
    assert len(expected["kept"]) == 4 and len(expected["pruned"]) == 8 and expected["best"] == "epoch_4_step_50"
    for key, value in expected.items():
        assert reported[key] == value, key
    assert reported["x"] == "step" and reported["metrics"] == ["accuracy", "grad_norm", "val_loss"]
    assert output.stat().st_size > 1000
    if suffix == ".png":
        written = png_description(output)
    elif suffix == ".svg":
        text = output.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text
        written = json.loads(re.search(r"<dc:description>(.*?)</dc:description>", text, re.S).group(1).replace("&quot;", '"'))
    else:
        text = output.read_text()
        assert "<svg" in text and "epoch_0_step_10" in text
        written = json.loads(re.search(r'<script type="application/json" id="ckpt-marks">(.*?)</script>', text, re.S).group(1))
    assert {key: written[key] for key in expected} == expected


def test_the_save_log_survives_retention_and_skips_damaged_lines(run: Path) -> None:
    log = run / savelog.LOG_FILE
    lines = log.read_bytes().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["event"] == "save" for line in lines)
    assert json.loads(lines[7])["metrics"]["grad_norm"] is None  # NaN is written as null
    with log.open("ab") as handle:
        handle.write(b'{"name": "epoch_99", "epoch": "x"}\nnot json at all\n{"event": "save", "name": "epoch_50"')
    with pytest.warns(UserWarning, match=r"skipping malformed line\(s\) 13, 14, 15"):
        entries = savelog.read(run)
    assert [entry["epoch"] for entry in entries] == list(range(12))
    # a writer appending after a torn line starts a new one
    CheckpointManager(run, max_checkpoints=None).save(torch.nn.Linear(2, 2), epoch=12, step=130, metrics={"val_loss": 0.9})
    with pytest.warns(UserWarning, match="skipping"):
        assert savelog.read(run)[-1]["name"] == "epoch_12_step_130"


def test_plot_refuses_a_bad_suffix_and_a_missing_directory(run: Path, tmp_path: Path) -> None:
    runner = typer_testing.CliRunner()
    assert runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "run.jpg")]).exit_code == 2
    assert runner.invoke(app, ["plot", str(tmp_path / "missing"), "-o", str(tmp_path / "run.png")]).exit_code == 2
    assert not (tmp_path / "run.jpg").exists()


def test_a_directory_without_a_log_plots_what_is_on_disk(run: Path, tmp_path: Path) -> None:
    (run / savelog.LOG_FILE).unlink()
    result = typer_testing.CliRunner().invoke(app, ["plot", str(run), "-o", str(tmp_path / "run.png"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pruned"] == [] and len(json.loads(result.stdout)["kept"]) == 4
