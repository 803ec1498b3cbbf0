"""Output is data: strings read from checkpoints and registries reach the terminal as text.

Every listing command runs in a terminal-like child process (Rich forced to emit colours and
links), over a run whose metric names, config values, validated record and history hold Rich
markup, ANSI and OSC sequences and mathtext. The command's own colours are the only escape
sequences allowed; the hostile strings appear as written, their control characters visible.
``ckpt plot`` draws such names literally, and ``plot`` and ``diff`` survive the values that
crashed them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_plugin import ArtifactRegistry, CheckpointManager, cli
from ckpt_plugin import _savelog as savelog
from security_helpers import reseal_metadata, reseal_record

REPO_ROOT = Path(__file__).resolve().parents[1]
LINK = "[link=https://evil.example]x[/link]"
CLEAR = "\x1b[2J"
TITLE = "\x1b]0;title\x07"
MATH = "$\\frac{1}{0}$"
HOSTILE_METRICS = {"loss": 0.5, LINK: 1.0, "[bold]": 2.0, CLEAR: 3.0, TITLE: 4.0, MATH: 5.0}
OWN_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # the SGR sequences Rich writes for the command's own styles


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose strings are hostile: metric names, a config value, a validated record's source
    name, and a history line's user, host and version."""
    directory = tmp_path_factory.mktemp("hostile") / "checkpoints"
    manager = CheckpointManager(directory, max_checkpoints=None, metric_for_best="loss")
    for epoch in range(2):
        manager.save(torch.nn.Linear(2, 2), epoch=epoch, metrics={**HOSTILE_METRICS, "loss": 0.5 - epoch / 10},
                     config={"note": LINK + CLEAR + TITLE})
    registry = ArtifactRegistry(directory)
    registry.validate(0, "1.0.0")
    reseal_record(registry.version_dir("1.0.0") / "validation.json",
                  lambda record: record["source"].update(name="[bold]" + CLEAR))
    event = {"time": "2026-01-01T00:00:00+00:00", "event": "promote", "version": "9.9.9" + TITLE,
             "user": LINK + CLEAR, "host": "[bold]host" + TITLE}
    with open(registry.validated_dir / "history.jsonl", "ab") as log:
        log.write(json.dumps(event).encode() + b"\n")
    return directory


def in_a_terminal(*args: str | Path) -> tuple[int, str]:
    """Run ``ckpt ARGS`` as a child process whose Rich output is forced to a colour terminal's."""
    env = {**os.environ, "FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "400",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("NO_COLOR", None)
    child = subprocess.run([sys.executable, "-m", "ckpt_plugin.cli", *map(str, args)], env=env,
                           capture_output=True, timeout=300)
    return child.returncode, (child.stdout + child.stderr).decode("utf-8", "replace")


def assert_shown_as_data(output: str, *expected: str) -> None:
    assert "\x1b]8;" not in output, "a hyperlink (OSC 8) reached the terminal"
    text = OWN_COLOURS.sub("", output)
    for control in ("\x1b", "\x07", "\x9b"):
        assert control not in text, f"a raw {control!r} reached the terminal: {text[:2000]!r}"
    for shown in expected:
        assert shown in text, f"{shown!r} is not shown as written: {text[:2000]!r}"


@pytest.mark.parametrize(
    "command, expected",
    [
        (("list",), (LINK, "[bold]", "\\x1b[2J", "\\x1b]0;title\\x07", MATH)),
        (("show", "0"), (LINK, "[bold]", "\\x1b[2J", "\\x1b]0;title\\x07")),
        (("versions",), (LINK, "[bold]\\x1b[2J")),
        (("history",), (LINK + "\\x1b[2J", "[bold]host\\x1b]0;title\\x07", "9.9.9\\x1b]0;title\\x07")),
        (("validate", "1", "--version", "2.0.0"), (LINK, "\\x1b[2J")),
    ],
    ids=["list", "show", "versions", "history", "validate"],
)
def test_listing_commands_print_hostile_strings_as_data(hostile: Path, command: tuple[str, ...], expected: tuple[str, ...]) -> None:
    name, *rest = command
    code, output = in_a_terminal(name, hostile, *rest)
    assert code == 0, output[-3000:]
    assert_shown_as_data(output, *expected)


def test_plot_prints_hostile_names_as_data(hostile: Path, tmp_path: Path) -> None:
    code, output = in_a_terminal("plot", hostile, "-o", tmp_path / "run.png")
    assert code == 0, output[-3000:]
    assert_shown_as_data(output, LINK, "\\x1b[2J")


def test_plot_draws_hostile_names_as_written(hostile: Path, tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    from ckpt_plugin.plot import plot_run, run_history

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG, to be read back
        plot_run(run_history(hostile), tmp_path / "run.svg")
    drawing = (tmp_path / "run.svg").read_text(encoding="utf-8")
    drawn = drawing.split("</metadata>")[-1]
    assert "$\\frac{1}{0}$" in drawn, "a '$...$' metric name was read as mathtext instead of drawn as written"
    assert "\\x1b[2J" in drawn and "\x1b" not in drawn


def test_a_warning_prints_a_hostile_path_as_data(tmp_path: Path) -> None:
    """A run in a directory with a hostile name, one of whose checkpoints is unreadable: the title
    and the warning that names the unreadable one show the path as written."""
    directory = tmp_path / f"run[bold]{CLEAR}"
    manager = CheckpointManager(directory, max_checkpoints=None)
    for epoch in range(2):
        manager.save(torch.nn.Linear(2, 2), epoch=epoch, metrics={"loss": 1.0})
    reseal_metadata(directory / "epoch_1", lambda metadata: metadata.update(step="two"))
    code, output = in_a_terminal("list", directory)
    assert code == 0, output[-3000:]
    assert "warning" in output and "epoch_1" in output
    assert_shown_as_data(output, "run[bold]\\x1b[2J/epoch_1")


# ---------------------------------------------------------------------- values that crashed plot and diff


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.parametrize(
    "name",
    ["$\\foo{$", "$" + "{" * 3000 + "}" * 3000 + "$", "$" + "\\sqrt{" * 300 + "x" + "}" * 300 + "$"],
    ids=["unknown-symbol", "deep-braces", "deep-roots"],
)
def test_plot_draws_mathtext_looking_names_literally(tmp_path: Path, name: str) -> None:
    manager = CheckpointManager(tmp_path / "run", max_checkpoints=None)
    manager.save(torch.nn.Linear(2, 2), epoch=0, metrics={name: 1.0})
    code, output = invoke("plot", tmp_path / "run", "-o", tmp_path / "run.png")
    assert code == 0, output
    assert (tmp_path / "run.png").stat().st_size > 0


@pytest.mark.parametrize(
    "entry, kept_in_picture",
    [
        (b'{"event": "save", "name": "epoch_9", "epoch": 1' + b"0" * 400 + b', "metrics": {"loss": 0.1}}', False),
        (b'{"event": "save", "name": "epoch_9", "epoch": 9, "metrics": {"loss": 1' + b"0" * 400 + b"}}", True),
    ],
    ids=["epoch", "metric"],
)
def test_plot_survives_numbers_too_large_for_a_float(tmp_path: Path, entry: bytes, kept_in_picture: bool) -> None:
    directory = tmp_path / "run"
    manager = CheckpointManager(directory, max_checkpoints=None)
    manager.save(torch.nn.Linear(2, 2), epoch=0, metrics={"loss": 0.5})
    with open(directory / savelog.LOG_FILE, "ab") as log:
        log.write(entry + b"\n")
    code, output = invoke("plot", directory, "-o", tmp_path / "run.png", "--json")
    assert code == 0, output
    marks = json.loads(output[: output.rindex("}") + 1])
    assert ("epoch_9" in marks["pruned"]) == kept_in_picture
    assert marks["metrics"] == ["loss"]


def test_diff_compares_lists_of_tensors(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run", max_checkpoints=None)
    manager.save({"w": [torch.ones(3), torch.zeros(2)], "same": [torch.ones(2)]}, epoch=0)
    manager.save({"w": [torch.ones(3), torch.ones(2)], "same": [torch.ones(2)]}, epoch=1)
    code, output = invoke("diff", tmp_path / "run", "0", "1", "--json")
    assert code == 0, output
    rows = {row["name"]: row["status"] for row in json.loads(output)["tensors"]}
    assert rows == {"w": "changed", "same": "unchanged"}


def test_diff_of_metrics_too_large_for_a_float(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run", max_checkpoints=None)
    manager.save(torch.nn.Linear(2, 2), epoch=0, metrics={"loss": 0.5})
    manager.save(torch.nn.Linear(2, 2), epoch=1, metrics={"loss": 0.25})
    reseal_metadata(tmp_path / "run" / "epoch_1", lambda metadata: metadata["metrics"].update(loss=10**400))
    code, output = invoke("diff", tmp_path / "run", "0", "1")
    assert code == 0, output
