"""A picture of a run: the recorded metrics of every checkpoint ever saved, with what became of each.

    history = run_history("checkpoints")           # the save log + the directory + the registry
    marks = plot_run(history, "run.png")           # .png, .svg or .html; returns what it marked
    plot_run(history, "run.svg", metrics=["eval_loss", "eval_runtime"])   # these panels, in this order

Every save is a point, pruned ones included (the save log, ``.saves.jsonl`` in a directory or the
``.saves/`` objects on an object store, outlives retention). ``checkpoint_dir`` may be a URL
(``s3://bucket/run/checkpoints``), configured by ``storage_options`` or the store's environment.
Points are marked as kept or pruned, and the best, the latest, each validated version and the
production version are marked on top. The marks are also written into the file (PNG text chunk,
SVG metadata, a JSON block in HTML) so tools and tests can check a picture against its directory.
Needs matplotlib (``pip install 'ckpt-plugin[plot]'``); it runs headless (Agg).

One panel per metric: the ranking metric first, then the others; the runtime and throughput
counters of a Hugging Face run (``eval_runtime``, ``*_samples_per_second``, ``total_flos``,
``epoch``, ...) get no panel unless ``metrics`` names them (:mod:`ckpt_plugin._metric_choice`).
The x axis (steps, or epochs when a checkpoint has no step) has whole-number ticks.

Names are data: every label is drawn as written (no mathtext, no TeX, control characters made
visible), and a metric that is not a finite float is left out of the picture.
"""

from __future__ import annotations

import html
import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _metric_choice as metric_choice, _savelog as savelog
from ._display import visible
from .errors import CheckpointNotFoundError, ConfigurationError
from .manager import DEFAULT_METRIC, CheckpointManager
from .registry import ArtifactRegistry
from ._storage import Location

FORMATS = (".png", ".svg", ".html")
MAX_PANELS = 9


@dataclass
class Point:
    """One saved checkpoint: where it sits on the x axis, its metrics, and its marks."""

    name: str
    epoch: int
    step: int | None
    metrics: dict[str, float]
    kept: bool
    marks: list[str] = field(default_factory=list)


@dataclass
class RunHistory:
    """Every checkpoint a directory ever saved, oldest first, and how they are marked."""

    checkpoint_dir: Path | str
    points: list[Point]
    metric_for_best: str | None
    mode: str
    versions: dict[str, str] = field(default_factory=dict)  # validated version -> checkpoint name
    production: tuple[str, str] | None = None  # (version, checkpoint name)

    @property
    def x_label(self) -> str:
        return "step" if self.points and all(point.step is not None for point in self.points) else "epoch"

    def x(self, point: Point) -> int:
        return point.step if self.x_label == "step" and point.step is not None else point.epoch

    def marks(self) -> dict[str, Any]:
        """What the picture marks, by checkpoint name: kept, pruned, best, latest, validated, production;
        and ``metrics``, every metric recorded (sorted)."""
        named = {mark: [point.name for point in self.points if mark in point.marks] for mark in ("best", "latest")}
        return {
            "x": self.x_label,
            "kept": [point.name for point in self.points if point.kept],
            "pruned": [point.name for point in self.points if not point.kept],
            "best": named["best"][0] if named["best"] else None,
            "latest": named["latest"][0] if named["latest"] else None,
            "validated": dict(self.versions),
            "production": None if self.production is None else {"version": self.production[0], "checkpoint": self.production[1]},
            "metrics": sorted({name for point in self.points for name in point.metrics}),
        }


def run_history(
    checkpoint_dir: str | Path,
    validated_dir: str | Path | None = None,
    production_dir: str | Path | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> RunHistory:
    """Gather the history of ``checkpoint_dir`` (a directory or a URL): its save log, the checkpoints
    still there (also those saved before the log existed), and the registry's validated and
    production versions. ``storage_options`` configure a URL's file system, as for
    :class:`CheckpointManager`."""
    place = Location.of(checkpoint_dir, storage_options)  # one backend for the log, the checkpoints and the registry
    if place.is_missing_directory():
        raise CheckpointNotFoundError(f"{place} is not a directory; pass the checkpoint directory")
    directory = place.where
    manager = CheckpointManager(place, max_checkpoints=None)
    listed = {info.name: info for info in manager.checkpoints()}
    entries: dict[str, dict[str, Any]] = {}
    for entry in savelog.read(directory, place.backend()):
        entries.pop(entry["name"], None)  # a re-save of the same name moves to its new place in time
        entries[entry["name"]] = entry
    for name, info in listed.items():
        entries[name] = {
            "name": name,
            "epoch": info.epoch,
            "step": info.step,
            "metrics": {key: float(value) for key, value in info.metrics.items() if savelog.finite_number(value)},
            "metric_for_best": info.metric_for_best,
            "mode": info.mode,
        }
    ordered = sorted(entries.values(), key=lambda entry: (entry["epoch"], -1 if entry["step"] is None else entry["step"]))
    points = [
        Point(e["name"], e["epoch"], e["step"], {k: float(v) for k, v in e["metrics"].items() if savelog.finite_number(v)}, e["name"] in listed)
        for e in ordered
    ]
    recorded = next((e for e in reversed(ordered) if e.get("metric_for_best")), None)
    fallback = DEFAULT_METRIC if any(DEFAULT_METRIC in point.metrics for point in points) else None
    history = RunHistory(  # the best is ranked as CheckpointManager.best() ranks it
        directory,
        points,
        metric_for_best=recorded["metric_for_best"] if recorded else fallback,
        mode=recorded["mode"] if recorded else "min",
    )
    _mark_best_and_latest(history, manager)
    _mark_registry(history, ArtifactRegistry(place, validated_dir, production_dir))
    return history


def _mark_best_and_latest(history: RunHistory, manager: CheckpointManager) -> None:
    by_name = {point.name: point for point in history.points}
    latest = manager.latest()
    if latest is not None:
        by_name[latest.name].marks.append("latest")
    if history.metric_for_best is None or latest is None:
        return
    try:
        best = manager.best(history.metric_for_best, history.mode)
    except CheckpointNotFoundError:
        return
    if best is not None:
        by_name[best.name].marks.append("best")


def _mark_registry(history: RunHistory, registry: ArtifactRegistry) -> None:
    by_name = {point.name: point for point in history.points}
    if registry.validated_dir is None or (isinstance(registry.validated_dir, Path) and not registry.validated_dir.is_dir()):
        return
    for version in registry.versions():
        source = registry.validation(version).get("source", {})
        name = source.get("name") if isinstance(source, Mapping) else None
        if isinstance(name, str):
            history.versions[version] = name
            if name in by_name:
                by_name[name].marks.append("validated")
    production = registry.production()
    if production is not None:
        name = production.get("source", {}).get("name")
        if isinstance(name, str):
            history.production = (str(production.get("version")), name)
            if name in by_name:
                by_name[name].marks.append("production")


def plot_run(history: RunHistory, output: str | Path, metrics: list[str] | None = None) -> dict[str, Any]:
    """Draw ``history`` into ``output`` (``.png``, ``.svg`` or ``.html``); return :meth:`RunHistory.marks`
    with ``panels`` (the metrics drawn, in order) and ``hidden`` (the recorded ones not drawn).

    ``metrics`` chooses the panels; by default the ranking metric and the model's metrics are
    drawn, and the runtime and throughput counters are not. A name no checkpoint recorded raises
    :class:`ConfigurationError` naming the recorded ones.
    """
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise ConfigurationError(f"cannot write {output}: the picture is .png, .svg or .html")
    if not history.points:
        raise CheckpointNotFoundError(f"{history.checkpoint_dir} records no saved checkpoint to plot")
    panels, hidden = _panel_metrics(history, metrics)
    figure = _figure(history, panels)
    marks = {**history.marks(), "panels": panels, "hidden": hidden}
    description = json.dumps(marks, sort_keys=True)
    suffix = output.suffix.lower()
    output.parent.mkdir(parents=True, exist_ok=True)
    fitted = {"bbox_inches": "tight", "pad_inches": 0.15}  # nothing drawn is clipped at an edge
    if suffix == ".png":
        figure.savefig(output, dpi=110, metadata={"Description": description}, **fitted)
    elif suffix == ".svg":
        figure.savefig(output, metadata={"Description": description}, **fitted)
    else:
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", **fitted)
        output.write_text(_html_page(history, buffer.getvalue(), description), encoding="utf-8")
    _close(figure)
    return marks


# ---------------------------------------------------------------------- drawing

_STYLE = {
    "best": {"marker": "*", "s": 260, "color": "#d4a017", "label": "best"},
    "latest": {"marker": "v", "s": 120, "color": "#1f77b4", "label": "latest"},
    "validated": {"marker": "s", "s": 150, "color": "none", "edgecolors": "#2ca02c", "linewidths": 2, "label": "validated"},
    "production": {"marker": "D", "s": 190, "color": "none", "edgecolors": "#d62728", "linewidths": 2.5, "label": "production"},
}


def _figure(history: RunHistory, metrics: list[str]) -> Any:
    try:  # a bare Figure draws with Agg and leaves pyplot's global state and backend alone
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigurationError("ckpt plot needs matplotlib: pip install 'ckpt-plugin[plot]'") from exc
    metrics = metrics or ["(no metrics)"]
    columns = 1 if len(metrics) == 1 else 2 if len(metrics) <= 4 else 3
    rows = -(-len(metrics) // columns)
    figure = Figure(figsize=(5.6 * columns, 3.4 * rows + 0.8), layout="constrained")
    # The run's directory is the title and the legend sits below the panels; constrained layout
    # keeps both clear of the panels and of their titles and x labels.
    figure.suptitle(_wrapped(_label(history.checkpoint_dir), 60 * columns), fontsize=9, **_AS_WRITTEN)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, metric in zip(axes, metrics):
        _panel(axis, history, metric)
    for axis in axes[len(metrics):]:
        axis.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
    return figure


def _panel_metrics(history: RunHistory, requested: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The metrics that get a panel, in order, and the recorded ones that do not."""
    recorded = sorted({name for point in history.points for name in point.metrics})
    shown, hidden = metric_choice.choose(recorded, history.metric_for_best, requested)
    if len(shown) > MAX_PANELS:
        warnings.warn(f"plotting the first {MAX_PANELS} of {len(shown)} metrics; choose them with --metrics",
                      UserWarning, stacklevel=3)
        shown, hidden = shown[:MAX_PANELS], hidden + shown[MAX_PANELS:]
    return shown, hidden


def _wrapped(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters (at spaces, underscores and
    slashes where it can), so that a long title does not run into its neighbour's."""
    import textwrap

    lines = textwrap.wrap(text, width, break_on_hyphens=False) or [""]
    return "\n".join(lines)


def _panel(axis: Any, history: RunHistory, metric: str) -> None:
    points = [point for point in history.points if metric in point.metrics]
    xs = [history.x(point) for point in points]
    ys = [point.metrics[metric] for point in points]
    axis.plot(xs, ys, color="#888888", linewidth=1, zorder=1)
    kept = [(x, y) for x, y, point in zip(xs, ys, points) if point.kept]
    pruned = [(x, y) for x, y, point in zip(xs, ys, points) if not point.kept]
    if kept:
        axis.scatter(*zip(*kept), s=36, color="#333333", zorder=2, label="kept")
    if pruned:
        axis.scatter(*zip(*pruned), s=36, facecolors="white", edgecolors="#999999", zorder=2, label="pruned")
    for mark, style in _STYLE.items():
        chosen = [(x, y) for x, y, point in zip(xs, ys, points) if mark in point.marks]
        if chosen:
            axis.scatter(*zip(*chosen), zorder=3, **style)
    versions_of = {}
    in_production = history.production[0] if history.production is not None else None
    for version, name in history.versions.items():
        versions_of.setdefault(name, []).append(f"v{version}" + (" (production)" if version == in_production else ""))
    middle = (min(xs) + max(xs)) / 2 if xs else 0
    for x, y, point in zip(xs, ys, points):
        if point.name in versions_of:  # labels point inwards, so none runs off the right edge
            inwards = x > middle
            axis.annotate(_label(", ".join(versions_of[point.name])), (x, y), textcoords="offset points",
                          xytext=(-6 if inwards else 6, 8), ha="right" if inwards else "left", fontsize=8, **_AS_WRITTEN)
    title = _wrapped(_label(metric), 48)
    if metric == history.metric_for_best:
        title += f"\n(ranks best, {history.mode})"
    axis.set_title(title, fontsize=10, **_AS_WRITTEN)
    axis.set_xlabel(history.x_label)
    axis.xaxis.set_major_locator(_whole_numbers())
    axis.grid(alpha=0.3)
    axis.margins(x=0.08, y=0.12)


def _whole_numbers() -> Any:
    """Tick positions that are whole numbers only: epochs and steps have no halves."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _html_page(history: RunHistory, svg: str, description: str) -> str:
    rows = "\n".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(visible(point.name)),
            point.epoch,
            "" if point.step is None else point.step,
            "kept" if point.kept else "pruned",
            html.escape(", ".join(point.marks)),
        )
        for point in history.points
    )
    start = svg.find("<svg")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ckpt plot: "
        f"{html.escape(visible(history.checkpoint_dir))}</title></head><body>\n{svg[start:]}\n"
        "<table><tr><th>checkpoint</th><th>epoch</th><th>step</th><th>state</th><th>marks</th></tr>\n"
        f"{rows}\n</table>\n<script type=\"application/json\" id=\"ckpt-marks\">{html.escape(description, quote=False)}</script>\n"
        "</body></html>\n"
    )


def _close(figure: Any) -> None:
    figure.clear()


_AS_WRITTEN = {"parse_math": False, "usetex": False}
"""Text properties that draw a label as written: ``$...$`` is not mathtext, nothing goes to TeX."""


def _label(text: Any) -> str:
    """A label for text read from a checkpoint or registry, its control characters made visible."""
    return visible(text)


__all__ = ["Point", "RunHistory", "plot_run", "run_history"]
