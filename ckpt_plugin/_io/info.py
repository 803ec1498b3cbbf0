"""A committed checkpoint as the layers above storage see it: :class:`CheckpointInfo`, parsed from
its verified ``metadata.json`` (:func:`parse_metadata`) and bound to the backend that reads it.

The names and the document layout are :mod:`ckpt_plugin._format.layout`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError, ForeignFileError, IncompatibleCheckpointError
from .._format import codec, documents
from .._format.layout import FORMAT_NAME, FORMAT_VERSION, METADATA_CHECKSUM_KEY, SHARDING_FILE, metadata_checksum
from .._format.names import is_checkpoint_name, parse_transaction_name
from .._format.records import METADATA_FILE, FileRecord
from .._storage import LOCAL, Backend, Location

REPR_METRICS = 3
"""How many metrics the repr of a :class:`CheckpointInfo` shows (the ranking metric first)."""


@dataclass(frozen=True, repr=False)
class CheckpointInfo:
    """One committed checkpoint, as listed by :meth:`CheckpointManager.checkpoints`.

    ``path``, ``epoch``, ``step`` and ``metrics`` describe what was saved; ``metric_for_best`` and
    ``mode`` are the manager's settings when it was saved, so tools can find the best one
    without being told; ``files`` maps every file to its recorded size and checksum.

    ``path`` is a :class:`~pathlib.Path` for a checkpoint on the local file system and a URL string
    (``s3://bucket/run/epoch_3@<transaction>``, see :data:`~ckpt_plugin._format.names.TRANSACTION_NAME`)
    for one on an object store; ``location`` is always the string, and ``backend`` the storage
    backend that reads it.
    """

    path: Path | str
    epoch: int
    step: int | None
    metrics: dict[str, Any]
    metric_for_best: str | None = None
    mode: str = "min"
    timestamp: str | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    items: tuple[str, ...] = ()
    backend: Backend = field(default=LOCAL, compare=False, repr=False)

    def __repr__(self) -> str:
        names = sorted(self.metrics, key=lambda name: name != self.metric_for_best)  # stable: the rest keep their order
        shown = {name: _short(self.metrics[name]) for name in names[:REPR_METRICS]}
        metrics = ", ".join(f"{name[:40]!r}: {value}" for name, value in shown.items())
        if len(names) > REPR_METRICS:
            metrics += f", ... +{len(names) - REPR_METRICS} more"
        return f"CheckpointInfo(name={self.name!r}, epoch={self.epoch}, step={self.step}, metrics={{{metrics}}})"

    @property
    def name(self) -> str:
        if isinstance(self.path, Path):
            return self.path.name
        last = self.path.rstrip("/").rsplit("/", 1)[-1]
        prefix = parse_transaction_name(last, legacy=True)
        return last if prefix is None else prefix.name

    @property
    def location(self) -> str:
        """Where the checkpoint lives, as a string: a local path or a URL."""
        return os.fspath(self.path)

    def file(self, filename: str) -> str:
        """The location of one of the checkpoint's files."""
        return self.backend.join(self.location, filename)

    @property
    def size(self) -> int:
        """Total bytes of the checkpoint's files."""
        return sum(record.size for record in self.files.values())

    @property
    def sharded(self) -> bool:
        """Whether the model and optimizer are stored as per-rank shards (see ``sharding.json``)."""
        return SHARDING_FILE in self.files

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.epoch, -1 if self.step is None else self.step)


def _short(value: Any) -> str:
    """A metric as a repr shows it: a float to 4 significant digits, anything else as its repr, cut short."""
    return repr(float(f"{value:.4g}")) if isinstance(value, float) else repr(value)[:40]


def _checksum_or_none(document: Mapping[str, Any]) -> str | None:
    try:
        return metadata_checksum(document)
    except (TypeError, ValueError, RecursionError):  # not JSON that dumps() writes: cannot match
        return None


def as_path(location: str | os.PathLike[str]) -> Path | str:
    """What :attr:`CheckpointInfo.path` holds for ``location``: a Path locally, the URL otherwise."""
    if isinstance(location, Path):  # already parsed: listing 1,000 checkpoints builds 1,000 of these
        return location.expanduser()
    return Location(location).where


def parse_metadata(path: Path | str, data: Mapping[str, Any], backend: Backend = LOCAL) -> CheckpointInfo:
    """Turn a parsed ``metadata.json`` into a :class:`CheckpointInfo`; reject other formats.

    Raises :class:`CorruptCheckpointError` when the document does not match its own checksum.
    """
    path = as_path(path)
    shown = backend.join(os.fspath(path), METADATA_FILE)
    if not isinstance(data, Mapping):
        raise CorruptCheckpointError(f"{shown} does not hold a JSON object; restore it or delete this checkpoint")
    recorded = data.get(METADATA_CHECKSUM_KEY)
    if recorded is not None and recorded != _checksum_or_none(data):
        raise CorruptCheckpointError(
            f"{shown} does not match its recorded checksum; the file is damaged: restore it from "
            "a copy or delete this checkpoint"
        )
    if data.get("format") != FORMAT_NAME:
        raise IncompatibleCheckpointError(f"{shown} was not written by ckpt_plugin")
    version = data.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise IncompatibleCheckpointError(
            f"{path} uses checkpoint format version {version!r}, but this release reads version "
            f"{FORMAT_VERSION}; upgrade ckpt_plugin to load it"
        )
    if recorded is None:
        raise CorruptCheckpointError(
            f"{shown} has no {METADATA_CHECKSUM_KEY}; the file is damaged: restore it from a copy "
            "or delete this checkpoint"
        )
    documents.validate(data, documents.MetadataDoc, shown)
    _check_transaction(path, data, shown)
    timestamp = data.get("metadata", {}).get("timestamp")
    return CheckpointInfo(
        path=path,
        epoch=data["epoch"],
        step=data.get("step"),
        metrics=codec.from_json(data.get("metrics", {}), shown, "metrics"),
        metric_for_best=data.get("metric_for_best"),
        mode=data.get("mode", "min"),
        timestamp=timestamp if isinstance(timestamp, str) else None,
        files={name: FileRecord.from_json(record) for name, record in data.get("files", {}).items()},
        items=tuple(data.get("items", ())),
        backend=backend,
    )


def _check_transaction(path: Path | str, data: Mapping[str, Any], shown: str) -> None:
    """Refuse a checkpoint on an object store whose manifest names another transaction than the
    prefix it lies under: a copy made outside ckpt_plugin, which is neither listed nor ever deleted."""
    if isinstance(path, Path):
        return
    prefix = parse_transaction_name(path.rstrip("/").rsplit("/", 1)[-1], legacy=True)
    if prefix is None or not is_checkpoint_name(prefix.name) or documents.names_transaction(data, prefix):
        return
    named = data.get("transaction")
    raise ForeignFileError(
        f"{shown} names transaction {named!r}, not {prefix.transaction!r}, the prefix it lies under: it was "
        "copied there by something other than ckpt_plugin, so it is ignored and never deleted. Remove the copy, "
        "or copy the checkpoint into a directory of its own"
    )
