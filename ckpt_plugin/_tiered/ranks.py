"""The local tier of one rank's part of sharded checkpoints: its own shard files in its own
``local_dir``, sealed by a small record, with its own journal of pending uploads.

The layout, under ``local_dir`` (a local-tier format; the durable copy is an ordinary sharded
checkpoint)::

    .sharded/
      .pending-uploads.jsonl     this rank's journal of sharded saves awaiting upload
      epoch_3/                   this rank's copy of the sharded checkpoint epoch_3
        model-r1-of-2.safetensors, optim-r1-of-2.safetensors   the shard files this rank wrote
        metadata.json, sharding.json, state.json, ...           on the coordinator (rank 0) only
        rank.json                the record, written last: the files above with their sizes and
                                 checksums, the rank, the world size and the checkpoint's summary

A rank's copy counts once ``rank.json`` is there: a rank other than the coordinator writes it into
its staging directory, which is then renamed into place; the coordinator commits its directory as
any checkpoint commits (``metadata.json`` last), then adds ``rank.json`` atomically. A directory
without a readable ``rank.json`` is a save that never returned.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _listing as listing
from ..errors import CheckpointError, CorruptCheckpointError
from .._format.names import is_checkpoint_name, is_plain_file_name
from .._format.records import FileRecord
from .._io.files import verify_file
from .._io.info import CheckpointInfo
from .._storage import LOCAL, LocalStore, Transaction, publish_file
from .journal import PendingJournal

RANKS_DIR = ".sharded"
RECORD_FILE = "rank.json"
RECORD_FORMAT = "ckpt_plugin rank copy"
MAX_RECORD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class RankRecord:
    """What ``rank.json`` says: the files this rank holds of checkpoint ``name``, and its summary."""

    name: str
    rank: int
    world_size: int
    files: dict[str, FileRecord]
    checkpoint: dict[str, Any]

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": RECORD_FORMAT, "name": self.name, "rank": self.rank, "world_size": self.world_size,
                "files": {name: record.to_json() for name, record in sorted(self.files.items())},
                "checkpoint": self.checkpoint,
            },
            separators=(",", ":"),
        ).encode()

    def is_of(self, info: CheckpointInfo) -> bool:
        """Whether this record belongs to the save ``info`` (same name, and each file as recorded there)."""
        return self.name == info.name and all(info.files.get(name) == record for name, record in self.files.items())


class RankCopies:
    """This rank's copies of sharded checkpoints under ``local_dir/.sharded``. (Opening it changes
    nothing; the manager's store of the coordinator's copies recovers what dead writers left.)"""

    def __init__(self, local_dir: str | os.PathLike[str]) -> None:
        self.root = Path(local_dir) / RANKS_DIR
        self.store = LocalStore(self.root)
        self.journal = PendingJournal(self.root)
        self._warned = False

    def begin(self, name: str) -> Transaction:
        """A staging directory for this rank's files of ``name`` (a rank other than the coordinator)."""
        self.store.ensure_writable()
        return self.store.begin(name)

    def abort(self, txn: Transaction) -> None:
        self.store.abort(txn)

    def owns(self, txn: Transaction) -> bool:
        """Whether ``txn`` is a staging directory of this rank's copies."""
        return Path(txn.prefix).parent == self.root

    def directory(self, name: str) -> Path:
        return self.root / name

    def seal(self, info: CheckpointInfo, rank: int, world_size: int, staging: Transaction | None) -> CheckpointInfo:
        """Write the record of this rank's files of ``info`` (those in its ``staging`` directory,
        which is then renamed into place, or, on the coordinator, in its committed copy) last;
        return ``info`` located at this rank's copy."""
        where = Path(staging.prefix) if staging is not None else self.directory(info.name)
        held = {entry.name: info.files[entry.name] for entry in os.scandir(where) if entry.name in info.files}
        record = RankRecord(info.name, rank, world_size, held, listing.summary(info))
        publish_file(where / RECORD_FILE, lambda handle: handle.write(record.to_bytes()))
        if staging is not None:
            self.store.publish(where, info.name)
        return self.info(record)

    def info(self, record: RankRecord) -> CheckpointInfo:
        """The checkpoint ``record`` belongs to, located at this rank's copy."""
        return self.info_of(record.name, record.checkpoint)

    def info_of(self, name: str, summary: Any) -> CheckpointInfo:
        """The checkpoint ``name`` with the listing ``summary``, located at this rank's copy."""
        return listing.info_from_summary(self.directory(name), summary)

    def record(self, name: str) -> RankRecord | None:
        """The record of this rank's copy of ``name``; None when there is none that reads."""
        path = self.directory(name) / RECORD_FILE
        try:
            return _parse(LOCAL.read_bytes(str(path), limit=MAX_RECORD_BYTES), path)
        except (FileNotFoundError, NotADirectoryError, CheckpointError, OSError):
            return None

    def records(self) -> list[RankRecord]:
        """Every sealed copy of this rank, oldest checkpoint first."""
        names = [entry.name for entry in self.store.entries() if is_checkpoint_name(entry.name)]
        found = [record for name in names if (record := self.record(name)) is not None]
        return sorted(found, key=lambda record: (record.checkpoint["epoch"], record.checkpoint["step"] or 0))

    def verified(self, info: CheckpointInfo) -> dict[str, str]:
        """This rank's files of the checkpoint ``info``, each checked against its record (name to
        path); empty when it holds none. When a copy does not verify, warn once and return none."""
        record = self.record(info.name)
        if record is None or not record.is_of(info):
            return {}
        paths = {name: os.fspath(self.directory(info.name) / name) for name in record.files}
        try:
            for name, path in paths.items():
                verify_file(path, record.files[name])
        except CorruptCheckpointError as exc:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"this rank's local copy {self.directory(info.name)} cannot be read ({exc}); reading the durable "
                    f"copy {info.location} instead. Delete the local copy, or let retention replace it. (This warning "
                    "is shown once.)",
                    UserWarning,
                    stacklevel=5,
                )
            return {}
        return paths

    def retain(self, keep_local: int) -> None:
        """Delete the copies beyond the ``keep_local`` newest whose upload is not pending (each was
        made durable, or never completed), and unsealed leftovers that no save is writing."""
        pending = {name for name, _ in self.journal.pending()}
        sealed = [record.name for record in self.records()]
        kept = set(sealed[max(0, len(sealed) - keep_local) :]) if keep_local > 0 else set()
        for entry in list(self.store.entries()):
            if is_checkpoint_name(entry.name) and entry.name not in pending and entry.name not in kept:
                self.store.remove(entry.name)


def _parse(data: bytes, path: Path) -> RankRecord:
    """The record in ``data``, schema-checked: :class:`CorruptCheckpointError` naming ``path`` otherwise."""
    try:
        document = json.loads(data)
        files = {name: FileRecord.from_json(value) for name, value in document["files"].items()}
        record = RankRecord(document["name"], document["rank"], document["world_size"], files, document["checkpoint"])
        listing.info_from_summary(path.parent, record.checkpoint)
    except (ValueError, KeyError, TypeError, AttributeError, CheckpointError) as exc:
        raise CorruptCheckpointError(f"{path} is not a rank record ({type(exc).__name__}: {exc})") from None
    if document.get("format") != RECORD_FORMAT or not is_checkpoint_name(record.name) or path.parent.name != record.name:
        raise CorruptCheckpointError(f"{path} is not the rank record of {path.parent.name}")
    if not all(is_plain_file_name(name) for name in files) or type(record.rank) is not int or type(record.world_size) is not int:
        raise CorruptCheckpointError(f"{path} names a file or rank that is not plain")
    return record
