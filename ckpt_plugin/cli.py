"""The ``ckpt`` command: inspect, verify, compare, validate, promote and export checkpoints.

    ckpt list DIR                      epochs, steps, metrics, sizes and ages; best and latest marked
    ckpt show DIR EPOCH                one checkpoint (EPOCH: a number, best, latest or a version v1.0.0)
    ckpt verify DIR                    every checksum of DIR, and of validated/ and production/ beside it
    ckpt diff DIR A B                  metrics, changed tensors, largest absolute difference
    ckpt validate DIR EPOCH --version 1.0.0 --require "accuracy>=0.9"
    ckpt promote DIR 1.0.0 | ckpt rollback DIR | ckpt versions DIR | ckpt history DIR
    ckpt export DIR EPOCH --to hf|pt
    ckpt plot DIR -o run.png|run.svg|run.html   metrics of every checkpoint ever saved, marked

Every command takes ``--json`` for scripts. Exit status: 0 on success, 1 when a check fails or a
file is corrupt, 2 on bad input (a missing directory, an unknown epoch or version).

The commands that read only metadata (``--help``, ``list``, ``show``, ``verify``, ``versions``,
``history``) never import torch, so they start in a fraction of a second; ``diff``, ``export``,
the commands that copy tensors and ``show`` of a per-rank sharded checkpoint import it when they
read tensors. For the same reason this module
imports the library's machinery inside the commands: ``--help`` loads only the command line.

The commands parse their arguments, call the library's public operations (:mod:`ckpt_plugin.summary`
for ``list`` and ``show``, :mod:`ckpt_plugin.tensors` for ``diff``, :mod:`ckpt_plugin.export`,
:mod:`ckpt_plugin.plot` and :class:`~ckpt_plugin.ArtifactRegistry`) and print what they return.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import operator
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

try:
    import typer
    from rich.console import Console
    from rich.filesize import decimal as format_size
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise SystemExit("the ckpt command needs the cli extra: pip install 'ckpt-plugin[cli]'") from exc

from ._display import age as _age
from ._display import format_metrics as _format_metrics
from ._display import plain as _plain
from ._display import visible
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    PromotionError,
)

if TYPE_CHECKING:
    from rich.progress import Progress

    from . import CheckpointInfo
    from .registry import ArtifactRegistry
    from .storage import Location

PROGRESS_MIN_BYTES = 256 * 1024 * 1024
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

app = typer.Typer(
    help="Inspect, verify, validate, promote and export ckpt_plugin checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class DataConsole(Console):
    """A Rich console for output made of data: every string printed, in a table cell or a title
    too, is shown as it is. Rich markup in it is not read (``[link=...]`` prints as written) and its
    control characters are made visible (:func:`~ckpt_plugin._display.visible`), so a metric name,
    a version or a user read from a checkpoint or a registry cannot style, link, clear or retitle
    the terminal. The command's own styling is passed as :class:`rich.text.Text`."""

    def __init__(self, **options: Any) -> None:
        super().__init__(markup=False, highlight=False, emoji=False, **options)

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(visible(text), **{**options, "markup": False, "emoji": False, "highlight": False})


out = DataConsole()
err = DataConsole(stderr=True)

Directory = Annotated[str, typer.Argument(help="The checkpoint directory (what CheckpointManager saved into), or its URL (s3://bucket/run/checkpoints).")]
Target = Annotated[str, typer.Argument(help="An epoch number, 'best', 'latest', or a validated version such as v1.0.0.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
MetricNames = Annotated[
    Optional[str],
    typer.Option("--metrics", help="The metrics to show, in order, separated by commas (e.g. eval_loss,eval_accuracy). "
                 "Default: the ranking metric first, then the others, without the runtime and throughput counters "
                 "of Hugging Face runs (eval_runtime, *_samples_per_second, total_flos, epoch, ...)."),
]
ValidatedDir = Annotated[Optional[str], typer.Option(help="Validated versions, a path or URL (default: validated/ beside DIR).")]
ProductionDir = Annotated[Optional[str], typer.Option(help="The production model, a path or URL (default: production/ beside DIR).")]
StorageOptions = Annotated[
    Optional[list[str]],
    typer.Option("--storage-option", help="KEY=VALUE passed to the URL's fsspec file system (VALUE is read as JSON when it "
                 "parses, else as text), e.g. endpoint_url=http://localhost:9000 or client_kwargs='{\"region_name\": \"eu-west-1\"}'; "
                 "repeat for more. Without any, the store's standard environment applies (AWS_ENDPOINT_URL, ...)."),
]


class ExportFormat(str, enum.Enum):
    hf = "hf"
    pt = "pt"
    safetensors = "safetensors"


# ---------------------------------------------------------------------- plumbing


def _handled(command: Callable[..., None]) -> Callable[..., None]:
    """Turn ckpt_plugin errors into a one-line message and an exit status (JSON too with --json),
    and print warnings on stderr through the console, as data like everything else."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                command(*args, **kwargs)
        except CheckpointError as exc:
            bad_input = isinstance(exc, (CheckpointNotFoundError, ConfigurationError))
            if kwargs.get("as_json"):
                _print_json({"error": str(exc), "type": type(exc).__name__})
            err.print(Text("error:", style="red"), str(exc), soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT if bad_input else EXIT_FAILED) from None

    return run


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    err.print(Text("warning:", style="yellow"), str(message), soft_wrap=True)


def _registry(
    directory: str | Path,
    validated_dir: str | None = None,
    production_dir: str | None = None,
    storage_option: list[str] | None = None,
    *,
    must_exist: bool = False,
) -> ArtifactRegistry:
    """The registry of ``directory``: a local path, or an object store URL (configured by
    ``--storage-option`` pairs, else by the store's standard environment, such as
    ``AWS_ACCESS_KEY_ID`` and ``AWS_ENDPOINT_URL``). With ``must_exist`` a local ``directory``
    must be one."""
    from .registry import ArtifactRegistry

    location = _location(directory, storage_option, must_exist=must_exist)
    if location.is_missing_directory() and validated_dir is None and production_dir is None:
        raise CheckpointNotFoundError(
            f"{location} is not a directory; pass the checkpoint directory (what CheckpointManager saved into), "
            "or --validated-dir and --production-dir to use a registry without one"
        )
    registry = ArtifactRegistry(location.where, validated_dir, production_dir, storage_options=location.storage_options or None)
    if location.is_missing_directory() and not registry.validated_dir.is_dir():
        raise CheckpointNotFoundError(
            f"{location} is not a directory and there is no {registry.validated_dir} beside it; pass the checkpoint "
            "directory (what CheckpointManager saved into), or --validated-dir"
        )
    return registry


def _location(directory: str | Path, storage_option: list[str] | None = None, *, must_exist: bool = False) -> Location:
    """DIR with its ``--storage-option`` pairs, decided once; with ``must_exist`` a local DIR must
    be a directory (an object-store prefix needs nothing made beforehand)."""
    from .storage import Location

    if must_exist and Location.of(directory).is_missing_directory():
        raise CheckpointNotFoundError(
            f"{directory} is not a directory; pass the checkpoint directory (what CheckpointManager saved into)"
        )
    options = _storage_options(storage_option)
    try:
        return Location.of(directory, options)
    except ConfigurationError:  # options for a local path
        raise ConfigurationError(f"--storage-option only applies to URLs such as s3://bucket/run; {directory} is a local path") from None


def _storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` pairs as fsspec storage options (None when there are none)."""
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, separator, text = pair.partition("=")
        if not separator or not key.strip():
            raise ConfigurationError(f"--storage-option {pair!r} is not KEY=VALUE; write it as endpoint_url=http://host:9000")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        options[key.strip()] = value
    return options or None


def _existing(directory: str | Path) -> str | Path:
    return _location(directory, must_exist=True).where


def _print_json(data: Any) -> None:
    print(json.dumps(_plain(data), indent=2, allow_nan=False))


class Bars:
    """Progress bars on stderr for reads of at least ``PROGRESS_MIN_BYTES``; use it as a context
    manager and pass it wherever a :data:`~ckpt_plugin.registry.ProgressFactory` is taken."""

    def __init__(self) -> None:
        self._progress: Progress | None = None

    def __call__(self, label: str, total: int) -> Callable[[int], None] | None:
        if total < PROGRESS_MIN_BYTES:
            return None
        if self._progress is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            self._progress = Progress(*columns, console=err, transient=True)
            self._progress.start()
        progress, task = self._progress, self._progress.add_task(label, total=total)
        return lambda nbytes: progress.advance(task, nbytes)

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _target(registry: ArtifactRegistry, spec: str) -> tuple[CheckpointInfo, str | None]:
    """The checkpoint an EPOCH argument names, and its version when it is a validated one."""
    from .registry import parse_version

    if spec in ("best", "latest"):
        return registry.resolve(spec), None
    if spec.isdigit():
        return registry.resolve(int(spec)), None
    try:
        version = parse_version(spec)
    except PromotionError:
        raise ConfigurationError(
            f"{spec!r} is not an epoch number, 'best', 'latest' or a validated version such as v1.0.0"
        ) from None
    return registry.checkpoint_info(version), str(version)




# ---------------------------------------------------------------------- inspecting


@app.command("list")
@_handled
def list_checkpoints(
    directory: Directory,
    as_json: AsJson = False,
    storage_option: StorageOptions = None,
    metrics: MetricNames = None,
    local_dir: Annotated[
        Optional[Path],
        typer.Option("--local-dir", help="The local tier of a tiered run (CheckpointManager(DIR, local_dir=...)): list the "
                     "checkpoints of both tiers, where each has copies, and which uploads are pending."),
    ] = None,
) -> None:
    """A table of the checkpoints: epoch, step, metrics, size and age, with the best and the latest marked.

    The ranking metric comes first, then the other recorded metrics; the runtime and throughput
    counters of a Hugging Face run (eval_runtime, *_samples_per_second, total_flos, epoch, ...) are
    left out unless --metrics names them. --json holds every metric unless --metrics is given.
    """
    from ._metric_choice import parse_names
    from .summary import checkpoint_table

    requested = parse_names(metrics)
    registry = _registry(directory, storage_option=storage_option, must_exist=local_dir is None)
    listing = checkpoint_table(registry, requested, local_dir=local_dir)
    shown, hidden = listing.shown, listing.hidden
    if as_json:
        _print_json(listing.to_json())
        return
    if not listing.rows:
        out.print(f"no checkpoints in {directory}")
    else:
        ranked = f"metrics (best: {listing.ranking}, {listing.mode})" if listing.best is not None else "metrics"
        table = [
            (" ".join(mark for mark, on in (("best", row["best"]), ("latest", row["latest"])) if on),
             str(info.epoch), "" if info.step is None else str(info.step),
             _format_metrics({name: info.metrics[name] for name in shown if name in info.metrics}),
             format_size(info.size), _age(info.timestamp), *_copies(row))
            for info, row in zip(listing.infos, listing.rows)
        ]
        header = ("", "epoch", "step", ranked, "size", "age", *(("copies",) if local_dir is not None else ()))
        _print_columns(str(directory), header, table, right={1, 2, 4})
        if hidden:
            out.print(f"not shown: {', '.join(hidden)} (choose with --metrics, e.g. --metrics {','.join([*shown[:1], hidden[0]])}; "
                      "--json has every metric)", soft_wrap=True, style="dim")
    if listing.versions:
        out.print(f"validated: {', '.join(listing.versions)}; production: {listing.production or 'none'}")


def _copies(row: dict[str, Any]) -> tuple[str, ...]:
    """The ``copies`` cell of a tiered run's row (none for a run in one place)."""
    if "copies" not in row:
        return ()
    return ("+".join(row["copies"]) + (" (upload pending)" if row["pending"] else ""),)


def _print_columns(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> None:
    """Print ``rows`` as aligned columns under ``title`` and a bold ``header``: one line per row,
    cheap for thousands of rows (a Rich table measures and wraps every cell). The first column is
    the row's marks, in green. Cells are data: their control characters are made visible."""
    cells = [tuple(visible(cell) for cell in row) for row in [header, *rows]]
    widths = [max(_width(row[column]) for row in cells) for column in range(len(header))]
    lines, marks = [visible(title)], []  # marks: (start, end) of each non-empty first cell
    offset = len(lines[0]) + 1
    for index, row in enumerate(cells):
        line = []
        for column, (cell, width) in enumerate(zip(row, widths)):
            padding = " " * (width - _width(cell))
            line.append(padding + cell if column in right else cell if column == len(widths) - 1 else cell + padding)
        if index and row[0]:
            marks.append((offset, offset + len(row[0])))
        lines.append("  ".join(line))
        offset += len(lines[-1]) + 1
    text = Text("\n".join(lines) + "\n")  # one Text: styling spans is cheap, one Text per cell is not
    text.stylize("italic", 0, len(lines[0]))
    text.stylize("bold", len(lines[0]) + 1, len(lines[0]) + 1 + len(lines[1]))
    for start, end in marks:
        text.stylize("green", start, end)
    out.print(text, soft_wrap=True, end="")


def _width(cell: str) -> int:
    """The columns ``cell`` takes in a terminal."""
    from rich.cells import cell_len

    return len(cell) if cell.isascii() else cell_len(cell)


@app.command()
@_handled
def show(directory: Directory, epoch: Target, as_json: AsJson = False, storage_option: StorageOptions = None) -> None:
    """Everything recorded about one checkpoint: metrics, config, provenance, the data loaders' position,
    files and checksums."""
    from .summary import checkpoint_details

    registry = _registry(directory, storage_option=storage_option, must_exist=True)
    info, version = _target(registry, epoch)
    details = checkpoint_details(info)
    if version is not None:
        details["validation"] = registry.validation(version)
    if as_json:
        _print_json(details)
        return
    table = Table(show_header=False, title=f"{info.name}" + (f" (version {version})" if version else ""))
    for key, value in details.items():
        if key == "files":
            value = Group(*(f"{name}  {format_size(record['size'])}  {record['checksum']}" for name, record in value.items()))
        elif key in ("config", "provenance", "validation") or (key == "data_loader" and value is not None):
            value = Group(*json.dumps(_plain(value), indent=1).splitlines())
        elif key == "data_loader":
            value = "none (no loader position saved)"
        elif key == "metrics":
            value = _format_metrics(value)
        table.add_row(key, value if isinstance(value, Group) else str(value))
    out.print(table)


@app.command()
@_handled
def verify(
    directory: Directory,
    as_json: AsJson = False,
    key: Annotated[
        Optional[Path],
        typer.Option("--key", help="A public key (PEM): validated versions and production must carry a signature it verifies, "
                     "and so must every checkpoint that has one (needs the signing extra)."),
    ] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Check every file's checksum: the checkpoints in DIR, the validated versions and production.

    Exits with status 1 and names each damaged file when anything is corrupt, each file inside a
    checkpoint that its metadata.json does not name (ckpt_plugin did not write it), and, with
    --key, each signature that does not verify.
    """
    registry = _registry(_existing(directory), storage_option=storage_option)
    with Bars() as bars:
        found = registry.verify(key, progress=bars)
    problems = [{"path": item.name, "error": item.problem} for item in found.problems]
    report = {"ok": found.ok, "files": found.files, "bytes": found.bytes, "problems": problems}
    if as_json:
        _print_json(report)
    else:
        for problem in problems:
            err.print(Text("problem:", style="red"), problem["error"], soft_wrap=True)
        status = Text("ok", style="green") if not problems else Text(f"{len(problems)} problem(s)", style="red")
        out.print(status, f": checked {found.files} files, {format_size(report['bytes'])}", sep="")
    if problems:
        raise typer.Exit(EXIT_FAILED)


@app.command()
@_handled
def diff(
    directory: Directory,
    a: Target,
    b: Target,
    limit: Annotated[int, typer.Option(help="Show at most this many changed tensors in the table.")] = 20,
    as_json: AsJson = False,
    storage_option: StorageOptions = None,
) -> None:
    """Compare two checkpoints: their metrics, which model tensors changed, and by how much."""
    from .tensors import read_verified

    registry = _registry(directory, storage_option=storage_option, must_exist=True)
    (info_a, _), (info_b, _) = _target(registry, a), _target(registry, b)
    with Bars() as bars:
        model_a = read_verified(info_a, ("model",), bars)["model"]
        model_b = read_verified(info_b, ("model",), bars)["model"]
    tensors = compare_tensors(model_a, model_b)
    metrics = {
        name: {"a": info_a.metrics.get(name), "b": info_b.metrics.get(name)}
        for name in dict.fromkeys([*info_a.metrics, *info_b.metrics])
    }
    changed = [row for row in tensors if row["status"] != "unchanged"]
    largest = max((row for row in changed if row["max_abs_diff"] is not None), key=lambda row: row["max_abs_diff"], default=None)
    report = {
        "a": info_a.name,
        "b": info_b.name,
        "metrics": metrics,
        "tensors": tensors,
        "changed": len(changed),
        "unchanged": len(tensors) - len(changed),
        "largest_abs_diff": None if largest is None else {"tensor": largest["name"], "value": largest["max_abs_diff"]},
    }
    if as_json:
        _print_json(report)
        return
    table = Table("metric", info_a.name, info_b.name, "b - a", title="metrics")
    for name, pair in metrics.items():
        delta = _difference(pair["a"], pair["b"])
        table.add_row(name, *(f"{v:.6g}" if isinstance(v, float) else str(v) for v in (pair["a"], pair["b"], delta)))
    out.print(table)
    table = Table("tensor", "change", "max |b - a|", title=f"{len(changed)} of {len(tensors)} model tensors changed")
    for row in sorted(changed, key=lambda row: -(row["max_abs_diff"] or math.inf))[:limit]:
        table.add_row(row["name"], row["status"], "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.6g}")
    out.print(table)
    if largest is not None:
        out.print(f"largest absolute difference: {largest['max_abs_diff']:.6g} in {largest['name']}")


def _difference(a: Any, b: Any) -> Any:
    """``b - a`` for two numbers, else ``""`` (also when an integer is too large to meet a float)."""
    if not all(isinstance(v, (int, float)) for v in (a, b)):
        return ""
    try:
        return b - a
    except OverflowError:
        return ""


def compare_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`ckpt_plugin.tensors.compare_tensors`, which ``ckpt diff`` prints."""
    from .tensors import compare_tensors as compare

    return compare(a, b)


# ---------------------------------------------------------------------- promotion


@app.command()
@_handled
def validate(
    directory: Directory,
    epoch: Annotated[str, typer.Argument(help="An epoch number, 'best' or 'latest'.")] = "best",
    version: Annotated[Optional[str], typer.Option(help="The version to give it, such as 1.0.0.")] = None,
    bump: Annotated[Optional[str], typer.Option(help="Or: the next 'major', 'minor' or 'patch' version.")] = None,
    require: Annotated[Optional[list[str]], typer.Option(help="A metric check such as 'accuracy>=0.9'; repeatable.")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Rank 'best' by this metric instead of the recorded one.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="'min' or 'max', with --metric.")] = None,
    validated_dir: ValidatedDir = None,
    production_dir: ProductionDir = None,
    as_json: AsJson = False,
    signing_key: Annotated[Optional[Path], typer.Option(help="Sign the version with this private key (PEM; signing extra).")] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Check a checkpoint and store it as an immutable, semantically versioned artifact."""
    registry = _registry(directory, validated_dir, production_dir, storage_option=storage_option, must_exist=True)
    if version is not None:
        _version(version)
    checks = dict(metric_check(expression) for expression in require or [])
    which: int | str = int(epoch) if epoch.isdigit() else epoch
    if checks:  # a metric the checkpoint never recorded is a typo, found before any file is read
        source = registry.resolve(which, metric, mode)
        for expression in require or []:
            _require_recorded(_EXPRESSION.match(expression).group(1), source.metrics, source.name)  # type: ignore[union-attr]
    with Bars() as bars:
        record = registry.validate(
            which, version, bump=bump, checks=checks, metric=metric, mode=mode, progress=bars, signing_key=signing_key
        )
    if as_json:
        _print_json(record)
        return
    source = record["source"]
    out.print(f"validated {source['name']} as version {record['version']} ({_format_metrics(record['metrics'])})")
    for check in record["checks"]:
        out.print(Text("  passed", style="green"), check["name"])


_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_EXPRESSION = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


def metric_check(expression: str) -> tuple[str, Callable[[dict[str, Any]], bool]]:
    """Parse ``"accuracy>=0.9"`` into a named check on a loaded checkpoint's metrics."""
    match = _EXPRESSION.match(expression)
    try:
        name, symbol, threshold = match.group(1), match.group(2), float(match.group(3))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise ConfigurationError(
            f"--require {expression!r} is not METRIC OP NUMBER, such as 'accuracy>=0.9' (OP: >=, <=, >, <, ==, !=)"
        ) from None
    compare = _OPERATORS[symbol]

    def check(checkpoint: dict[str, Any]) -> bool:
        metrics = checkpoint["metrics"]
        _require_recorded(name, metrics, checkpoint.get("metadata", {}).get("path", "the checkpoint"))
        return bool(compare(metrics[name], threshold))

    return f"{name} {symbol} {match.group(3)}", check  # type: ignore[union-attr]


def _require_recorded(metric: str, metrics: Mapping[str, Any], checkpoint: str) -> None:
    """Refuse a --require on a metric ``checkpoint`` did not record: a usage error (a typo, or the
    wrong checkpoint), not a model that failed its check."""
    if metric not in metrics:
        raise ConfigurationError(
            f"--require names metric {metric!r}, which {checkpoint} does not record; its metrics are: "
            f"{', '.join(metrics) or 'none'}. Nothing was validated"
        )


def _version(text: str) -> str:
    from .registry import parse_version

    try:
        return str(parse_version(text))
    except PromotionError as exc:
        raise ConfigurationError(str(exc)) from None


@app.command()
@_handled
def promote(
    directory: Directory,
    version: Annotated[str, typer.Argument(help="The validated version to put into production.")],
    validated_dir: ValidatedDir = None,
    production_dir: ProductionDir = None,
    as_json: AsJson = False,
    storage_option: StorageOptions = None,
) -> None:
    """Make a validated version the production model, atomically."""
    registry = _registry(directory, validated_dir, production_dir, storage_option=storage_option)
    with Bars() as bars:
        record = registry.promote(_version(version), progress=bars)
    if as_json:
        _print_json(record)
    else:
        out.print(f"production is now version {record['version']} ({record['source']['name']}) in {registry.production_dir}")


@app.command()
@_handled
def rollback(
    directory: Directory,
    validated_dir: ValidatedDir = None,
    production_dir: ProductionDir = None,
    as_json: AsJson = False,
    storage_option: StorageOptions = None,
) -> None:
    """Put the previously promoted version back into production."""
    registry = _registry(directory, validated_dir, production_dir, storage_option=storage_option)
    with Bars() as bars:
        record = registry.rollback(progress=bars)
    if as_json:
        _print_json(record)
    else:
        out.print(f"rolled back: production is now version {record['version']} ({record['source']['name']})")


@app.command()
@_handled
def versions(
    directory: Directory,
    validated_dir: ValidatedDir = None,
    production_dir: ProductionDir = None,
    as_json: AsJson = False,
    storage_option: StorageOptions = None,
) -> None:
    """The validated versions, with the one in production marked."""
    registry = _registry(directory, validated_dir, production_dir, storage_option=storage_option)
    production = registry.production()
    current = production["version"] if production else None
    rows = [{**registry.validation(version), "production": version == current} for version in registry.versions()]
    if as_json:
        _print_json(rows)
        return
    table = Table("", "version", "source", "metrics", "checks", "validated")
    for row in rows:
        passed = sum(check["passed"] for check in row["checks"])
        table.add_row("production" if row["production"] else "", row["version"], row["source"]["name"],
                      _format_metrics(row["metrics"]), f"{passed}/{len(row['checks'])}", _age(row["validated_at"]))
    out.print(table)


@app.command()
@_handled
def history(
    directory: Directory,
    validated_dir: ValidatedDir = None,
    production_dir: ProductionDir = None,
    as_json: AsJson = False,
    storage_option: StorageOptions = None,
) -> None:
    """The audit log: every validate, promote and rollback, with who, where and when."""
    events = _registry(directory, validated_dir, production_dir, storage_option=storage_option).history()
    if as_json:
        _print_json(events)
        return
    table = Table("time", "event", "version", "source", "checksum", "user@host")
    for event in events:
        source = event.get("source") or {}
        table.add_row(event["time"], event["event"], event["version"], str(source.get("name", "")),
                      str(source.get("checksum", "")), f"{event['user']}@{event['host']}")
    out.print(table)


# ---------------------------------------------------------------------- export


@app.command()
@_handled
def export(
    directory: Directory,
    epoch: Target,
    to: Annotated[ExportFormat, typer.Option("--to", help="hf: a save_pretrained-style folder; safetensors: the model as one .safetensors file; pt: a torch .pt file.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write (default: NAME-hf/ or NAME.pt here).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="hf: a config.json to use instead of the checkpoint's config.")] = None,
    weights_only: Annotated[bool, typer.Option(help="pt: save only the model's state dict.")] = False,
    as_json: AsJson = False,
    storage_option: StorageOptions = None,
) -> None:
    """Export a checkpoint for other tools; never overwrites an existing output."""
    from .export import default_output
    from .export import export as write

    registry = _registry(directory, storage_option=storage_option, must_exist=True)
    info, version = _target(registry, epoch)
    target = output or default_output(f"v{version}" if version else info.name, to.value)
    with Bars() as bars:
        notes = write(info, target, to.value, config_file=config, weights_only=weights_only, progress=bars)
    if as_json:
        _print_json({"source": info.name, "format": to.value, "output": str(target), "notes": notes})
        return
    out.print(f"exported {info.name} to {target}")
    for note in notes:
        err.print(Text("note:", style="yellow"), note, soft_wrap=True)


# ---------------------------------------------------------------------- plot


@app.command()
@_handled
def plot(
    directory: Directory,
    output: Annotated[Path, typer.Option("--output", "-o", help="run.png, run.svg or run.html.")] = Path("run.png"),
    validated_dir: ValidatedDir = None,
    production_dir: ProductionDir = None,
    storage_option: StorageOptions = None,
    as_json: AsJson = False,
    metrics: MetricNames = None,
) -> None:
    """Plot the recorded metrics of every checkpoint ever saved (pruned ones too), marking the kept,
    pruned, best and latest checkpoints and the validated and production versions. DIR may be a
    URL (s3://bucket/run/checkpoints); its save log is the .saves/ objects there.

    One panel per metric, the ranking metric first; the runtime and throughput counters of a
    Hugging Face run get none unless --metrics names them."""
    from ._metric_choice import parse_names
    from .plot import plot_run, run_history

    requested = parse_names(metrics)
    location = _location(directory, storage_option, must_exist=True)
    history = run_history(location.where, validated_dir, production_dir, storage_options=location.storage_options or None)
    marks = plot_run(history, output, requested)
    if as_json:
        _print_json({"output": str(output), **marks})
        return
    out.print(
        f"wrote {output}: {len(marks['kept'])} kept and {len(marks['pruned'])} pruned checkpoints, "
        f"metrics {', '.join(marks['panels']) or 'none'}", soft_wrap=True
    )
    if marks["hidden"]:
        out.print(f"not plotted: {', '.join(marks['hidden'])} (choose with --metrics)", soft_wrap=True, style="dim")


def main() -> None:
    """Entry point of the ``ckpt`` console script."""
    app()


if __name__ == "__main__":
    main()
