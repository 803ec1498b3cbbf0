"""The pending-upload journal: which checkpoints committed in ``local_dir`` still await their upload.

It is an append-only log, ``.pending-uploads.jsonl`` in ``local_dir``, one fsynced JSON line per
event, so that it survives a kill at any instant:

- ``{"pending": "epoch_3", "seq": 7}`` is appended *before* the local commit of ``epoch_3`` (a
  write-ahead entry: a save that returned is always in the journal);
- ``{"uploaded": "epoch_3", "seq": 7}`` once the durable tier committed that very save.

Replaying the lines gives the pending saves in save order. A name saved again while its older save
is uploading gets a new ``seq``, and the older upload's ``uploaded`` line does not clear it. A
``pending`` entry whose local checkpoint never committed (the process died before the commit) is
dropped by the uploader when it finds nothing to upload. A torn last line (a writer killed
mid-write) is skipped. When nothing is pending the log is deleted, so it never grows for long.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .._format.names import is_checkpoint_name
from .._storage import LOCAL, append_line

JOURNAL_FILE = ".pending-uploads.jsonl"
MAX_JOURNAL_BYTES = 64 * 1024 * 1024
"""A journal of this size holds about a million events; anything larger is not one of ours."""


class PendingJournal:
    """The durable list of local checkpoints awaiting upload, in save order (thread-safe)."""

    def __init__(self, local_dir: str | Path) -> None:
        self.path = Path(local_dir) / JOURNAL_FILE
        self._lock = threading.Lock()
        self._pending: dict[str, int] = _replay(self.path)
        self._seq = max(self._pending.values(), default=0)

    def add(self, name: str) -> int:
        """Record that ``name`` is about to be committed locally and must then be uploaded; return
        the save's sequence number. Call it before the local commit."""
        with self._lock:
            self._seq += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.path, _line(pending=name, seq=self._seq))
            self._pending.pop(name, None)
            self._pending[name] = self._seq
            return self._seq

    def done(self, name: str, seq: int) -> None:
        """Record that save ``seq`` of ``name`` is durable (or that it never committed locally)."""
        with self._lock:
            if self._pending.get(name) != seq:
                return
            del self._pending[name]
            if self._pending:
                append_line(self.path, _line(uploaded=name, seq=seq))
            else:
                LOCAL.delete(str(self.path))

    def pending(self) -> list[tuple[str, int]]:
        """``(name, seq)`` of every pending save, oldest first."""
        with self._lock:
            return list(self._pending.items())

    def seq_of(self, name: str) -> int | None:
        """The sequence number of the pending save of ``name``, or None when none is pending."""
        with self._lock:
            return self._pending.get(name)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def _line(**fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode("ascii")


def _replay(path: Path) -> dict[str, int]:
    """The pending saves the log at ``path`` describes (none when it does not exist)."""
    try:
        data = LOCAL.read_bytes(str(path), limit=MAX_JOURNAL_BYTES)
    except FileNotFoundError:
        return {}
    pending: dict[str, int] = {}
    for raw in data.splitlines():
        event = _parse(raw)
        if event is None:
            continue
        kind, name, seq = event
        if kind == "pending":
            pending.pop(name, None)
            pending[name] = seq
        elif pending.get(name) == seq:
            del pending[name]
    return pending


def _parse(raw: bytes) -> tuple[str, str, int] | None:
    """One line as ``(kind, name, seq)``; None for a torn or foreign line."""
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(document, dict) or len(document) != 2:
        return None
    seq = document.get("seq")
    if type(seq) is not int:
        return None
    for kind in ("pending", "uploaded"):
        name = document.get(kind)
        if isinstance(name, str) and is_checkpoint_name(name):
            return kind, name, seq
    return None
