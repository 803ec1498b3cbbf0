"""A cache of checkpoint summaries, so that a new process lists 1,000 checkpoints without parsing
1,000 ``metadata.json`` files.

Metrics are stored encoded as in ``metadata.json`` (NaN and infinities as markers). The cache is one hidden file, ``.listing.json``, in the checkpoint directory. For each checkpoint it
holds the summary that :class:`~ckpt_plugin._checkpoint.CheckpointInfo` needs (epoch, step, metrics,
files, ...) and the identity of the ``metadata.json`` it came from: inode, size, modification and
change times. A committed checkpoint is never modified in place (a replacement is a new
directory), so an entry whose identity still matches is exactly what parsing the file would give;
any other entry is ignored and the file is read. The cache is only ever an optimization: it is
replaced atomically, it records a checksum of its own content and is validated like every other
document, a damaged, edited or foreign one is ignored, and deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from ._format import codec, documents
from ._format.records import FileRecord
from ._io.info import CheckpointInfo, as_path
from ._storage import LOCAL, Backend, temporary_path

CACHE_FILE = ".listing.json"
CACHE_VERSION = 3
REWRITE_AFTER_READS = 16

Identity = tuple[int, int, int, int]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector while many small containers are built.

    Parsing 1,000 summaries allocates enough dicts to trigger full collections, which in a process
    that has imported torch walk millions of objects and cost ten times the parsing itself. Nothing
    built here forms a cycle, so nothing is lost by collecting later.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def identity(metadata_path: str | os.PathLike[str]) -> Identity | None:
    """What identifies one written ``metadata.json``: inode, size, mtime and ctime (ns); None if gone."""
    try:
        stat = os.stat(metadata_path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def summary(info: CheckpointInfo) -> dict[str, Any]:
    """What listing needs of a checkpoint, compact: no config, no provenance but the timestamp."""
    return {
        "epoch": info.epoch,
        "step": info.step,
        "metrics": codec.to_json(info.metrics, "metrics"),
        "metric_for_best": info.metric_for_best,
        "mode": info.mode,
        "timestamp": info.timestamp,
        "files": {name: [record.size, record.checksum] for name, record in info.files.items()},
        "items": list(info.items),
    }


def info_from_summary(path: Path | str, data: Mapping[str, Any], backend: Backend = LOCAL) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of ``path`` (a directory, or a URL on ``backend``) from its
    cached :func:`summary`."""
    return CheckpointInfo(
        path=as_path(path),
        epoch=data["epoch"],
        step=data["step"],
        metrics=codec.from_json(data["metrics"], _summary_source(path), "metrics"),
        metric_for_best=data["metric_for_best"],
        mode=data["mode"],
        timestamp=data["timestamp"],
        files={name: FileRecord(size, checksum) for name, (size, checksum) in data["files"].items()},
        items=tuple(data["items"]),
        backend=backend,
    )


def _summary_source(path: Path | str) -> str:
    """Where a summary came from, for error messages: the cache file locally, else the checkpoint."""
    return str(path.parent / CACHE_FILE) if isinstance(path, Path) else f"the summary of {path}"


def load(root: Path) -> dict[str, tuple[Identity, dict[str, Any]]]:
    """The cached summaries by checkpoint name; empty when there is no usable cache (missing,
    damaged, edited, or written by another release)."""
    path = root / CACHE_FILE
    try:
        document = documents.load_json(LOCAL.read_bytes(os.fspath(path)), str(path))
        if not isinstance(document, dict) or document.get("version") != CACHE_VERSION:
            return {}
        documents.check_seal(document, str(path))
        documents.validate(document, documents.ListingDoc, str(path))
    except (OSError, CheckpointError):
        return {}
    return {name: (tuple(entry["identity"]), entry["summary"]) for name, entry in document["entries"].items()}  # type: ignore[misc]


def save(root: Path, entries: Mapping[str, tuple[Identity, Mapping[str, Any]]]) -> None:
    """Replace the cache atomically with ``entries``; failures are ignored (it is only a cache). A
    writer that dies before the replacement leaves a temporary that recovery removes."""
    temporary = temporary_path(root / CACHE_FILE)
    try:
        document = documents.seal({
            "version": CACHE_VERSION,
            "entries": {name: {"identity": list(key), "summary": data} for name, (key, data) in sorted(entries.items())},
        })
        temporary.write_bytes(codec.dumps(document))
        os.replace(temporary, root / CACHE_FILE)
    except (OSError, TypeError, ValueError):
        try:
            os.unlink(temporary)
        except OSError:
            pass
