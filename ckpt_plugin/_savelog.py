"""The save log: one entry per committed checkpoint, beside the checkpoints.

Retention deletes checkpoints; the log keeps what every save recorded, so the history of a run
(``ckpt plot``) survives pruning. It is append-only and informational: nothing loads a checkpoint
through it, a damaged entry is skipped with a warning, and deleting it loses only history.

- In a local directory it is ``.saves.jsonl``, one JSON line per save, appended in one write.
- An object store has no append, so there each save writes one small object of its own,
  ``.saves/<time>-<name>-<random>.json``, after the checkpoint commits. The time (nanoseconds,
  fixed-width hex) makes the names sort oldest first; the random part means that two writers
  never write the same object. The prefix has no ``@`` transaction separator, so listing and
  :meth:`~ckpt_plugin._storage.fsspec.ManifestStore.recover` never take it for a checkpoint or for
  a dead writer's leftovers.

:func:`read` reads both forms wherever they are (the lines of ``.saves.jsonl`` first, then the
objects in name order), so a local run copied to a bucket, or a bucket's run downloaded, keeps its
history.

Each entry is a flat JSON object::

    {"event": "save", "name": "epoch_3_step_120", "epoch": 3, "step": 120, "time": "2026-...+00:00",
     "metric_for_best": "val_loss", "mode": "min", "metrics": {"val_loss": 0.41, "accuracy": 0.9}}

``metrics`` maps names to numbers (a NaN or infinite value is written as ``null``); ``step``,
``metric_for_best`` and ``time`` may be ``null``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import CorruptCheckpointError
from ._format import documents
from ._io.files import read_bytes_file, write_bytes_file
from ._io.info import CheckpointInfo
from ._storage import LOCAL, Backend

LOG_FILE = ".saves.jsonl"
LOG_PREFIX = ".saves"
"""The prefix of the save log on an object store: one ``.json`` object per save."""
READ_CONCURRENCY = 16
MAX_COUNT = 2**63 - 1
"""The largest epoch or step an entry may record, as in ``metadata.json``."""


def entry(info: CheckpointInfo, *, resumed: bool = False) -> dict[str, Any]:
    """The log line of the committed checkpoint ``info``; ``resumed`` marks the first save of a
    process that resumed the run (what ``every="auto"`` learns the failure rate from)."""
    line = {
        "event": "save",
        "name": info.name,
        "epoch": info.epoch,
        "step": info.step,
        "time": info.timestamp,
        "metric_for_best": info.metric_for_best,
        "mode": info.mode,
        "metrics": {name: _number(value) for name, value in info.metrics.items()},
    }
    if resumed:
        line["resumed"] = True
    return line


def append(checkpoint_dir: str | os.PathLike[str], info: CheckpointInfo, *, backend: Backend = LOCAL, resumed: bool = False) -> None:
    """Record ``info`` in the save log of ``checkpoint_dir`` (a directory, or a URL reached through
    ``backend``).

    Locally one line is appended in a single write, not fsynced: the log is history, not state. A
    power cut may lose its last lines or leave one torn, which :func:`read` skips; the checkpoints
    themselves are committed durably as always. On an object store one new object is written.
    """
    line = json.dumps(entry(info, resumed=resumed), sort_keys=True, allow_nan=False).encode("utf-8")
    appends = getattr(backend, "append_line", None)
    if appends is not None:
        appends(backend.join(os.fspath(checkpoint_dir), LOG_FILE), line, durable=False)
        return
    name = f"{time.time_ns():016x}-{info.name}-{secrets.token_hex(4)}.json"
    write_bytes_file(backend.join(os.fspath(checkpoint_dir), LOG_PREFIX, name), line, backend=backend)


def read(checkpoint_dir: str | os.PathLike[str], backend: Backend = LOCAL) -> list[dict[str, Any]]:
    """Every well-formed save entry of the log of ``checkpoint_dir`` (a directory, or a URL reached
    through ``backend``), oldest first; ``[]`` when there is no log.

    An entry that is not a JSON object with a string ``name`` and whole-number ``epoch`` below
    ``2**63`` (a writer that died mid-line, an edit by hand) is skipped, and so is every metric
    that is not a finite float; one warning names every skipped line and object.
    """
    root = os.fspath(checkpoint_dir)
    log, folder = backend.join(root, LOG_FILE), backend.join(root, LOG_PREFIX)
    entries: list[dict[str, Any]] = []
    bad_lines: list[int] = []
    for number, line in enumerate(_lines(backend, log), 1):
        if not line.strip():
            continue
        parsed = _parse(line)
        if parsed is None:
            bad_lines.append(number)
        else:
            entries.append(parsed)
    names = sorted(name for name in backend.list(folder) if name.endswith(".json"))
    bad_objects: list[str] = []
    with ThreadPoolExecutor(max_workers=min(READ_CONCURRENCY, max(1, len(names))), thread_name_prefix="ckpt-log") as pool:
        for name, data in zip(names, pool.map(lambda name: _object(backend, backend.join(folder, name)), names)):
            parsed = None if data is None else _parse(data)
            if parsed is None:
                bad_objects.append(name)
            else:
                entries.append(parsed)
    problems = [f"{kind} {_few(items)} of {where}" for kind, items, where in (
        ("line(s)", bad_lines, log), ("object(s)", bad_objects, folder)) if items]
    if problems:
        warnings.warn(f"skipping malformed {' and '.join(problems)}; every other entry stands", UserWarning, stacklevel=2)
    return entries


def _few(items: list[Any]) -> str:
    return ", ".join(str(item) for item in items[:10]) + (" ..." if len(items) > 10 else "")


def _lines(backend: Backend, location: str) -> list[bytes]:
    try:
        return backend.read_bytes(location).splitlines()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # no log
        return []
    except CorruptCheckpointError as exc:  # a link, a FIFO, a device or a log over its cap: unread
        warnings.warn(f"skipping the save log: {exc}", UserWarning, stacklevel=3)
        return []


def _object(backend: Backend, location: str) -> bytes | None:
    """One entry object; None when it is gone (deleted by hand between listing and reading)."""
    try:
        return read_bytes_file(location, backend=backend)
    except (CorruptCheckpointError, FileNotFoundError):
        return None


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
        "metrics": {str(key): value for key, value in metrics.items() if finite_number(value)},
        "resumed": data.get("resumed") is True,
    }


def _whole(value: Any) -> bool:
    """A count as ``metadata.json`` records one: ``0 <= value < 2**63``."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def finite_number(value: Any) -> bool:
    """A number that is a finite float (an integer too large for one, such as ``10**400``, is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (bool, int, float)) else None
