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
from ckpt_plugin import _savelog as savelog  # noqa: E402
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


# ---------------------------------------------------------------------- Hugging Face runs, panels and layout

HF_COUNTERS = {"eval_runtime": 0.31, "eval_samples_per_second": 412.5, "eval_steps_per_second": 51.6, "epoch": 1.0}


@pytest.fixture
def hf_run(tmp_path: Path) -> Path:
    """Metrics as the Hugging Face Trainer logs them: the model's, then its runtime counters and the epoch."""
    directory = tmp_path / "a_long_experiment_directory_name" / "with_nested_folders" / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=3, keep_best=True, metric_for_best="eval_loss")
    for epoch in range(1, 6):
        metrics = {"eval_accuracy_on_the_held_out_validation_set": epoch / 6, **HF_COUNTERS, "epoch": float(epoch),
                   "eval_loss": 1 / epoch + (0.2 if epoch > 3 else 0.0)}
        manager.save(torch.nn.Linear(2, 2), epoch=epoch, step=8 * epoch, metrics=metrics)
    registry = ArtifactRegistry(directory)
    registry.validate(3, "1.0.0")
    registry.validate(5, "1.1.0")
    registry.promote("1.1.0")
    return directory


def plot_json(*args: str | Path) -> tuple[int, str]:
    result = typer_testing.CliRunner().invoke(app, ["plot", *map(str, args)])
    return result.exit_code, result.stdout + result.stderr


def test_an_hf_run_plots_the_ranking_metric_first_and_no_runtime_counters(hf_run: Path, tmp_path: Path) -> None:
    code, output = plot_json(hf_run, "-o", tmp_path / "run.png", "--json")
    assert code == 0, output
    marks = json.loads(output)
    assert marks["panels"] == ["eval_loss", "eval_accuracy_on_the_held_out_validation_set"]
    assert marks["hidden"] == ["epoch", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"]
    code, output = plot_json(hf_run, "-o", tmp_path / "run.png")
    assert code == 0 and "not plotted: epoch, eval_runtime" in output and "--metrics" in output


def test_metrics_chooses_the_panels_and_their_order(hf_run: Path, tmp_path: Path) -> None:
    code, output = plot_json(hf_run, "-o", tmp_path / "run.svg", "--json", "--metrics", "eval_runtime, eval_loss")
    assert code == 0, output
    assert json.loads(output)["panels"] == ["eval_runtime", "eval_loss"]
    code, output = plot_json(hf_run, "-o", tmp_path / "typo.png", "--metrics", "eval_los")
    assert code == 2 and "'eval_los'" in output and "eval_loss, epoch" not in output
    assert "the recorded metrics are: " in output and "eval_loss" in output
    assert not (tmp_path / "typo.png").exists()


def footprints(figure) -> dict[str, object]:
    """The drawn extent of the figure's title, of its legend, and of each visible panel together
    with its title, x label and x tick labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    FigureCanvasAgg(figure)
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    boxes = {"title": figure._suptitle.get_window_extent(renderer), "legend": figure.legends[0].get_window_extent(renderer)}
    for index, axis in enumerate(axis for axis in figure.axes if axis.get_visible()):
        low, high = axis.get_xlim()
        ticks = [label for label, tick in zip(axis.get_xticklabels(), axis.get_xticks()) if low <= tick <= high]
        parts = [axis.get_window_extent(renderer), axis.title.get_window_extent(renderer),
                 axis.xaxis.label.get_window_extent(renderer), *(label.get_window_extent(renderer) for label in ticks)]
        label = axis.xaxis.label.get_window_extent(renderer)
        assert not any(label.overlaps(tick.get_window_extent(renderer)) for tick in ticks), "an x label covers its ticks"
        boxes[f"panel {index}"] = Bbox.union(parts)
    return boxes


@pytest.mark.parametrize("with_steps", [True, False], ids=["steps", "epochs"])
def test_the_layout_has_whole_number_ticks_and_no_colliding_labels(hf_run: Path, tmp_path: Path, with_steps: bool) -> None:
    from ckpt_plugin.plot import _figure, run_history

    if with_steps:
        history = run_history(hf_run)
        panels = ["eval_loss", "eval_accuracy_on_the_held_out_validation_set", "eval_runtime"]
    else:  # a run saved by epoch only: the x axis is the epoch
        directory = tmp_path / "by_epoch"
        manager = CheckpointManager(directory, max_checkpoints=None)
        for epoch in range(3):
            manager.save(torch.nn.Linear(2, 2), epoch=epoch, metrics={"loss": 1 / (epoch + 1), "accuracy": epoch / 3})
        history = run_history(directory)
        panels = ["loss", "accuracy"]
    figure = _figure(history, panels)
    for axis in (axis for axis in figure.axes if axis.get_visible()):
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
        assert axis.get_xlabel() == ("step" if with_steps else "epoch")
    boxes = footprints(figure)
    names = sorted(boxes)
    for position, first in enumerate(names):
        for second in names[position + 1:]:
            assert not boxes[first].overlaps(boxes[second]), f"the {first} collides with the {second}"
    whole = figure.bbox
    for name in ("title", "legend"):
        assert whole.x0 <= boxes[name].x0 and boxes[name].x1 <= whole.x1, f"the {name} is cut at an edge"
