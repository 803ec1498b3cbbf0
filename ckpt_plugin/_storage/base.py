"""The storage interface: what the write and read paths need of a place that holds bytes.

Two protocols, each small enough to implement for a new store in an afternoon:

- :class:`Backend` moves bytes. Keys are *locations*: plain strings, an OS path for the local
  file system, a URL (``s3://bucket/run/epoch_3@.../model.safetensors``) for object stores. Writes
  stream through a :class:`Sink`, which hashes what it is given and returns the
  :class:`FileRecord` (size and checksum) that ``metadata.json`` records. Reads fill a caller's
  buffer from a byte range, so the read path decides where the bytes land.
- :class:`Commit` makes a checkpoint visible. :meth:`Commit.begin` hands out a
  :class:`Transaction` (plain data, so a coordinator can broadcast it to other ranks), every file is
  written under its ``prefix``, and :meth:`Commit.commit` writes ``metadata.json`` and publishes the
  whole checkpoint at once: a rename of a staging directory on a local disk, the manifest write
  itself on an object store.

Nothing here knows what a safetensors file or a ``metadata.json`` document looks like.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .._format.names import parse_transaction_name
from .._format.records import FileRecord

BeforeCommit = Callable[["Backend", str, Mapping[str, bytes]], Any]
"""A hook run on a complete checkpoint before it commits: ``(backend, prefix, pending files)``."""


class Sink(Protocol):
    """One file being written. Bytes appear at the key only once :meth:`close` returns."""

    def write(self, data: memoryview | bytes) -> None:
        """Append ``data`` (the sink may keep a reference only until this returns)."""

    def close(self) -> FileRecord:
        """Make the file durable (fsync, or the upload completed) and return its size and checksum."""

    def abort(self) -> None:
        """Give up: nothing is left at the key (a multipart upload is aborted). Idempotent."""


@runtime_checkable
class Backend(Protocol):
    """Bytes at locations. Every method raises :class:`~ckpt_plugin.errors.StorageError` naming the
    location and the cause for a failure of the store, and :class:`FileNotFoundError` (or
    ``CorruptCheckpointError`` from the read path) for a missing key where documented."""

    root: str
    """The location the backend was opened at (a path or URL, as the user gave it)."""

    read_concurrency: int
    """How many ranged reads the read path keeps in flight per file (2 locally, more remotely)."""

    def join(self, base: str, *names: str) -> str:
        """The location of ``names`` under ``base`` (each a single plain path component)."""

    def create(self, key: str, size: int | None = None) -> Sink:
        """Start writing a new file at ``key``; it must not exist yet. ``size``, when the caller
        knows the final size, lets a backend choose how to write (direct I/O locally)."""

    def read_range(self, key: str, offset: int, into: memoryview) -> None:
        """Fill ``into`` with the bytes of ``key`` from ``offset``; short files raise
        ``CorruptCheckpointError`` and a missing key :class:`FileNotFoundError`."""

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The whole (small) file at ``key``; :class:`FileNotFoundError` when it is missing, and
        ``CorruptCheckpointError`` when it has more than ``limit`` bytes (by default the cap of its
        kind, :func:`ckpt_plugin._format.limits.cap_for`), found without reading more than that."""

    def read_all(self, key: str, limit: int | None = None) -> Any:
        """The whole file as a writable buffer the caller owns (a private, copy-on-write memory map
        locally, so loading stays zero-copy); :class:`FileNotFoundError` when it is missing, and
        ``CorruptCheckpointError`` when it has more than ``limit`` bytes (by default its kind's cap)."""

    def size(self, key: str) -> int:
        """The size of ``key`` in bytes; :class:`FileNotFoundError` when it is missing."""

    def list(self, prefix: str) -> Iterator[str]:
        """The names directly under ``prefix`` (files and sub-prefixes), in no particular order."""

    def fingerprint(self, key: str) -> str | None:
        """What changes whenever ``key`` is rewritten (inode, size and times locally; the ETag
        remotely), for caches; None when ``key`` does not exist."""

    def reuse(self, src: str, dst: str) -> bool:
        """Give ``dst`` the content of the committed file ``src`` without sending its bytes (a hard
        link locally, a server-side copy remotely). False, leaving nothing at ``dst``, when that is
        not possible here; the caller then writes the file."""

    def delete(self, key: str) -> None:
        """Remove one file; a missing one is not an error."""

    def delete_tree(self, prefix: str) -> None:
        """Remove everything under ``prefix``; a missing prefix is not an error."""


@dataclass(frozen=True)
class Transaction:
    """One checkpoint being written: every file goes under ``prefix`` until :meth:`Commit.commit`.

    Plain strings only, so that it can be sent to other processes that write into the same
    checkpoint (one coordinator begins and commits; every rank writes its own files).
    """

    name: str
    prefix: str

    @property
    def id(self) -> str | None:
        """The transaction id that an object-store prefix ends with (``epoch_3@<id>``, see
        :data:`~ckpt_plugin._format.names.TRANSACTION_NAME`); None for a local staging directory."""
        parsed = parse_transaction_name(self.prefix.rstrip("/").rsplit("/", 1)[-1])
        return None if parsed is None else parsed.transaction


@dataclass(frozen=True)
class Entry:
    """One committed checkpoint as a :class:`Commit` lists it."""

    name: str
    location: str
    fingerprint: str
    """Changes whenever the checkpoint at ``name`` is replaced or rewritten (for listing caches)."""


class Commit(Protocol):
    """How a checkpoint becomes visible as a whole, or not at all."""

    backend: Backend

    def ensure_writable(self) -> None:
        """Create what must exist before :meth:`begin` (the local root directory), or raise
        :class:`~ckpt_plugin.errors.StorageError`; nothing to do on an object store."""

    def begin(self, name: str) -> Transaction:
        """Reserve a fresh, invisible prefix for a new checkpoint ``name``."""

    def commit(self, txn: Transaction, manifest: bytes, before_commit: BeforeCommit | None = None) -> str:
        """Write ``manifest`` as ``metadata.json`` and publish the checkpoint, replacing any older
        one of that name; return its location. Nothing of it is visible before this returns.

        ``before_commit(backend, prefix, pending)`` runs once every file is written and before
        the checkpoint becomes visible (to sign it); ``pending`` maps the names of files not
        written yet (the manifest, on a store where it is the commit itself) to their bytes."""

    def abort(self, txn: Transaction) -> None:
        """Remove what a failed write left under ``txn.prefix``."""

    def visible(self) -> Iterator[Entry]:
        """Every committed checkpoint, newest commit per name."""

    def location(self, name: str) -> str | None:
        """Where the committed checkpoint ``name`` lives, or None."""

    def remove(self, name: str) -> None:
        """Delete checkpoint ``name``; it disappears from :meth:`visible` before its files go."""

    def recover(self, only: str | None = None) -> None:
        """Clean up what dead writers left (after a grace period where liveness cannot be known)."""


def with_backend(store: Commit, backend: Backend) -> Commit:
    """A copy of the commit protocol ``store`` that moves its bytes through ``backend`` (a wrapper
    of ``store.backend``, such as :class:`~ckpt_plugin._storage.faults.FaultyBackend`)."""
    clone = copy.copy(store)
    clone.backend = backend  # type: ignore[attr-defined]
    return clone
