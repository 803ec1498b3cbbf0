"""The save log: one JSON line per committed checkpoint, kept in ``.saves.jsonl`` in the checkpoint directory.

Retention deletes checkpoints; the log keeps what every save recorded, so the history of a run
(``ckpt plot``) survives pruning. It is append-only and informational: nothing loads a checkpoint
through it, a damaged line is skipped with a warning, and deleting the file loses only history.

Each line is a flat JSON object::

    {"event": "save", "name": "epoch_3_step_120", "epoch": 3, "step": 120, "time": "2026-...+00:00",
     "metric_for_best": "val_loss", "mode": "min", "metrics": {"val_loss": 0.41, "accuracy": 0.9}}

``metrics`` maps names to numbers (a NaN or infinite value is written as ``null``); ``step``,
``metric_for_best`` and ``time`` may be ``null``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointInfo
from .errors import CorruptCheckpointError
from .format import documents
from .storage import append_line, read_bytes_file

LOG_FILE = ".saves.jsonl"


def entry(info: CheckpointInfo) -> dict[str, Any]:
    """The log line of the committed checkpoint ``info``."""
    return {
        "event": "save",
        "name": info.name,
        "epoch": info.epoch,
        "step": info.step,
        "time": info.timestamp,
        "metric_for_best": info.metric_for_best,
        "mode": info.mode,
        "metrics": {name: _number(value) for name, value in info.metrics.items()},
    }


def append(checkpoint_dir: Path, info: CheckpointInfo) -> None:
    """Append the line of ``info`` to the directory's log in a single write.

    Not fsynced: the log is history, not state. A power cut may lose its last lines or leave one
    torn, which :func:`read` skips; the checkpoints themselves are committed durably as always.
    """
    line = json.dumps(entry(info), sort_keys=True, allow_nan=False).encode("utf-8")
    append_line(checkpoint_dir / LOG_FILE, line, durable=False)


def read(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """Every well-formed save entry of the directory's log, oldest first; ``[]`` when there is no log.

    A line that is not a JSON object with a string ``name`` and whole-number ``epoch`` (a writer that
    died mid-line, an edit by hand) is skipped with one warning naming its line number.
    """
    path = Path(checkpoint_dir) / LOG_FILE
    if not path.is_file():
        return []
    entries: list[dict[str, Any]] = []
    skipped: list[int] = []
    for number, line in enumerate(read_bytes_file(path).splitlines(), 1):
        if not line.strip():
            continue
        parsed = _parse(line)
        if parsed is None:
            skipped.append(number)
        else:
            entries.append(parsed)
    if skipped:
        shown = ", ".join(str(number) for number in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        warnings.warn(f"skipping malformed line(s) {shown} of {path}; every other line stands", UserWarning, stacklevel=2)
    return entries


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        data = documents.load_json(line, LOG_FILE)  # strict JSON, nesting and size bounded
    except CorruptCheckpointError:
        return None
    if not isinstance(data, dict) or data.get("event", "save") != "save":
        return None
    name, epoch, step = data.get("name"), data.get("epoch"), data.get("step")
    if not isinstance(name, str) or not _whole(epoch) or not (step is None or _whole(step)):
        return None
    metrics = data.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    return {
        "name": name,
        "epoch": epoch,
        "step": step,
        "time": data.get("time") if isinstance(data.get("time"), str) else None,
        "metric_for_best": data.get("metric_for_best") if isinstance(data.get("metric_for_best"), str) else None,
        "mode": data.get("mode") if data.get("mode") in ("min", "max") else "min",
        "metrics": {str(key): value for key, value in metrics.items() if _finite(value)},
    }


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (bool, int, float)) else None
