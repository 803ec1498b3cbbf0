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

import msgspec

from .errors import CheckpointError
from ._format import codec, documents
from ._format.records import FileRecord
from ._io.info import CheckpointInfo, as_path
from ._storage import LOCAL, Backend, temporary_path

CACHE_FILE = ".listing.json"
CACHE_VERSION = 3
REWRITE_AFTER_READS = 16
_SEAL_MARKER = f',"{documents.SEAL_KEY}":"'.encode("ascii")

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


def info_from_summary(
    path: Path | str, data: Mapping[str, Any] | documents.SummaryDoc, backend: Backend = LOCAL
) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of ``path`` (a directory, or a URL on ``backend``) from its
    cached :func:`summary` (as a dict, or as :func:`load` decoded it)."""
    if isinstance(data, documents.SummaryDoc):
        data = msgspec.structs.asdict(data)
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
    return os.path.join(os.path.dirname(path), CACHE_FILE) if isinstance(path, Path) else f"the summary of {path}"


def load(root: Path) -> dict[str, tuple[Identity, documents.SummaryDoc]]:
    """The cached summaries by checkpoint name; empty when there is no usable cache (missing,
    damaged, edited, or written by another release).

    A cache is checked the way :func:`save` writes it: its seal covers the bytes before the seal
    itself, and one typed decoding parses and validates the rest, so a new process does not parse,
    walk and re-encode the whole document in Python.
    """
    path = root / CACHE_FILE
    try:
        data = LOCAL.read_bytes(os.fspath(path))
        if len(data) > documents.MAX_DOCUMENT_BYTES or not _seal_matches(data):
            return {}
        document = msgspec.json.decode(data, type=documents.ListingDoc, strict=True)
    except (OSError, CheckpointError, msgspec.DecodeError, RecursionError):
        return {}
    if document.version != CACHE_VERSION:
        return {}
    return {
        name: (entry.identity, entry.summary)
        for name, entry in document.entries.items()
        if documents.within_depth(entry.summary.metrics, documents.MAX_DEPTH)
    }


def _seal_matches(data: bytes) -> bool:
    """Whether ``data``, as :func:`save` wrote it, ends with the seal of the bytes before it."""
    start = data.rfind(_SEAL_MARKER)
    if start < 0 or not data.endswith(b'"}'):
        return False
    recorded = data[start + len(_SEAL_MARKER) : -2].decode("ascii", "replace")
    return recorded == documents.checksum(data[:start] + b"}")


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
