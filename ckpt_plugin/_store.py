"""``CheckpointStore``: the one owner of the commit pipeline of a checkpoint directory or prefix.

It holds the commit backend opened from a :class:`~ckpt_plugin._storage.Location`, the lock that
orders commits and retention, the listing cache, the retention policies, the save log and the
signing key. Every save goes through it, whatever its strategy (plain, incremental, sharded):

1. :meth:`CheckpointStore.begin` (or :meth:`CheckpointStore.commit` without a transaction) makes
   sure the place is writable and refuses to replace anything that is not a checkpoint;
2. :meth:`CheckpointStore.commit` writes a snapshot (signed, when a key is set) and publishes it;
3. :meth:`CheckpointStore.committed` remembers it, applies retention and logs the save;
4. :meth:`CheckpointStore.abort` removes what a failed transaction left.

:meth:`CheckpointStore.checkpoints` lists what is committed.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import _listing as listing, _retention as retention, _savelog as savelog, signing
from .errors import CheckpointError, ForeignFileError, StorageError
from ._format.layout import looks_like_checkpoint
from ._format.records import METADATA_FILE
from ._io.async_save import pending_info
from ._io.incremental import IncrementalWriter, Observation
from ._io.info import CheckpointInfo
from ._io.reader import read_info
from ._io.writer import Snapshot, write_snapshot
from ._storage import Backend, Entry, Location, Transaction, with_backend


class CheckpointStore:
    """The checkpoints at one :class:`~ckpt_plugin._storage.Location`: commit, list, retain.

    ``policies`` are the retention policies applied after each commit (none: keep everything);
    ``signing_key`` (a PEM file) signs every checkpoint before it commits.
    """

    def __init__(
        self,
        location: Location,
        *,
        policies: Sequence[retention.RetentionPolicy] = (),
        signing_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.location = location
        self.policies: tuple[retention.RetentionPolicy, ...] = tuple(policies)
        self._signing_key = signing_key
        self._commit: Any = location.commit_store()
        self._lock = threading.RLock()
        self._listing = _Listing(self)
        self._warned_log = self._warned_later = self._resumed = False
        if not location.is_missing_directory():
            self._recover()

    def _recover(self) -> None:
        """Clean up what dead writers left. Leftovers are invisible, so a reader that may not delete
        (read-only credentials, a read-only mount) is warned and goes on; a save would fail later."""
        try:
            self._commit.recover()
        except (StorageError, PermissionError) as exc:
            warnings.warn(
                f"could not clean up leftovers of interrupted saves in {self.location} ({exc}); they stay "
                "invisible, and the next manager with write access removes them",
                UserWarning,
                stacklevel=4,
            )

    @property
    def backend(self) -> Backend:
        """The backend every byte of this store moves through."""
        return self._commit.backend

    def route(self, wrap: Callable[[Backend], Backend]) -> Backend:
        """Move this store's bytes through ``wrap(backend)`` from now on, commits included; return it."""
        with self._lock:
            backend = wrap(self._commit.backend)
            self._commit = with_backend(self._commit, backend)
        return backend

    # ------------------------------------------------------------------ the commit pipeline

    def begin(self, name: str) -> Transaction:
        """A fresh, invisible transaction for checkpoint ``name``, once the place is writable and
        holds nothing at ``name`` that is not a checkpoint (:class:`ForeignFileError`)."""
        with self._lock:
            self._prepare(name)
            return self._commit.begin(name)

    def commit(
        self,
        snapshot: Snapshot,
        txn: Transaction | None = None,
        *,
        incremental: IncrementalWriter | None = None,
        seen: Observation | None = None,
    ) -> CheckpointInfo:
        """Write ``snapshot``, sign it when a key is set, and publish it; on failure nothing is left.

        ``txn``, from :meth:`begin`, already holds files other processes wrote (a sharded save);
        without it a transaction is begun here. With ``incremental`` (and what it ``seen`` of the
        model), the model is written as shards, reusing those that did not change.
        """
        signed = self._signing()
        with self._lock:
            if txn is not None:
                return write_snapshot(self._commit, snapshot, txn=txn, **signed)
            self._prepare(snapshot.name)
            if incremental is None:
                return write_snapshot(self._commit, snapshot, **signed)
            if not incremental.has_base:
                incremental.adopt(newest(self.checkpoints()))
            assert seen is not None
            return incremental.write(self._commit, snapshot, seen, **signed)

    def committed(self, info: CheckpointInfo) -> None:
        """After ``info`` committed: remember it, apply retention (``info`` is kept) and log the save."""
        with self._lock:
            self._listing.remember(info)
            self.retain(protect=info)
            self._log_save(info)

    def rank_transaction(self, txn: Transaction, rank: int) -> Transaction:
        """Where ``rank`` writes its files of the collective save ``txn``: into ``txn`` itself here
        (a tiered store gives each rank a staging directory in its own ``local_dir``)."""
        return txn

    def shared(self, info: CheckpointInfo, rank: int, world_size: int) -> None:
        """On every rank of a collective save, once all know that ``info`` committed (nothing to do
        here; a tiered store seals each rank's local copy and starts its upload)."""

    def abort(self, txn: Transaction) -> None:
        """Remove what the failed transaction ``txn`` left."""
        self._commit.abort(txn)

    def pending(self, snapshot: Snapshot) -> CheckpointInfo:
        """The record ``snapshot`` will have once committed, without its files (an asynchronous save's)."""
        return pending_info(self._commit, snapshot)

    def _prepare(self, name: str) -> None:
        self._commit.ensure_writable()
        self._refuse_foreign(name)

    def _signing(self) -> dict[str, Any]:
        """The ``write_snapshot`` options that sign a checkpoint before it commits, when a key is set."""
        if self._signing_key is None:
            return {}
        return {"before_commit": signing.signer(self._signing_key)}

    def _refuse_foreign(self, name: str) -> None:
        """Refuse to replace anything at ``name`` but a checkpoint this release can read (on an object
        store a save never replaces anything in place: it writes a new prefix)."""
        target = self._commit.occupant(name)
        if target is None:
            return
        try:
            if not (target / METADATA_FILE).is_file():
                raise ForeignFileError("it is not a ckpt_plugin checkpoint")
            read_info(target)
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
            raise ForeignFileError(
                f"{target} exists but is not a checkpoint this release can read ({exc}); it will not be "
                "overwritten. Move it away or choose another checkpoint_dir"
            ) from None

    def mark_resumed(self) -> None:
        """The run resumed in this process: the next save's log entry says so."""
        self._resumed = True

    def save_log(self) -> list[dict[str, Any]]:
        """The run's save log, oldest first (see :mod:`ckpt_plugin._savelog`)."""
        return savelog.read(self.location.where, self.backend)

    def _log_save(self, info: CheckpointInfo) -> None:
        """Record the committed checkpoint in the save log; a failure there never fails the save."""
        try:
            savelog.append(self.location.where, info, backend=self.backend, resumed=self._resumed)
            self._resumed = False
        except CheckpointError as exc:
            if not self._warned_log:
                self._warned_log = True
                warnings.warn(f"could not append to the save log ({exc}); the checkpoint is saved", UserWarning, stacklevel=6)

    # ------------------------------------------------------------------ retention

    def retain(self, protect: CheckpointInfo | None = None) -> None:
        """Delete what the retention policies drop, never ``protect`` (a save just committed), and
        warn once when ``protect`` is older than the latest checkpoint."""
        with self._lock:
            found = self.checkpoints_from_metadata() if self.policies else self.checkpoints()
            if protect is not None and found and found[-1].sort_key > protect.sort_key and not self._warned_later:
                self._warned_later = True
                warnings.warn(
                    f"saved {protect.name}, but {self.location} already holds later checkpoints (up to "
                    f"{found[-1].name}), which load_latest() and resuming will prefer and which retention keeps "
                    "as the most recent. Start a new run in a new checkpoint_dir. (This warning is shown once.)",
                    UserWarning,
                    stacklevel=6,
                )
            for entry in retention.to_delete(found, self.policies, protect.sort_key if protect is not None else None):
                self._commit.remove(entry.name)
                self._listing.forget(entry.name)

    def retained(self, checkpoints: list[CheckpointInfo], protect: CheckpointInfo | None = None) -> list[CheckpointInfo]:
        """Which of ``checkpoints`` retention keeps, ``protect`` included, without deleting anything."""
        doomed = {info.name for info in retention.to_delete(checkpoints, self.policies, protect.sort_key if protect else None)}
        return [info for info in checkpoints if info.name not in doomed]

    def acknowledge_later_checkpoints(self) -> None:
        """Do not warn about a save older than the latest checkpoint: the caller already said so."""
        self._warned_later = True

    # ------------------------------------------------------------------ listing

    def visible(self) -> Iterator[Entry]:
        """Every committed entry named like a checkpoint or not, as the commit protocol lists it."""
        return self._commit.visible()

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first (by epoch, then step); from the listing cache
        where an entry did not change."""
        return self._listing.checkpoints()

    def checkpoints_from_metadata(self) -> list[CheckpointInfo]:
        """Every committed checkpoint as its own ``metadata.json`` says, oldest first: what
        retention and signed loads decide by (see :meth:`_Listing.checkpoints_from_metadata`)."""
        return self._listing.checkpoints_from_metadata()

    def forget(self, name: str) -> None:
        """Drop ``name`` from the listing cache: the next listing reads it again."""
        self._listing.forget(name)

    def at(self, location: str | os.PathLike[str]) -> CheckpointInfo | None:
        """The checkpoint committed at ``location`` (a path or URL inside this store), or None."""
        found = self._commit.committed_at(location)
        return None if found is None else read_info(found, self.backend)

    @property
    def summary_dir(self) -> Path | None:
        """Where the listing keeps its summary cache file, where the commit store has one."""
        return self._commit.summary_dir

    def identity(self, location: str) -> str:
        """What changes whenever the checkpoint at ``location`` is replaced."""
        return self._commit.identity(location)


def newest(found: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The last of ``found`` (sorted oldest first), or None."""
    return found[-1] if found else None


class _Listing:
    """The listing cache of a store: each committed checkpoint's record by the fingerprint it was
    read at, and on a local disk the summary cache file (``.listing.json``) that spares reading
    every ``metadata.json`` in a new process."""

    def __init__(self, store: CheckpointStore) -> None:
        self._store = store
        self._entries: dict[str, tuple[str, CheckpointInfo]] = {}
        self._summaries: dict[str, tuple[listing.Identity, Any]] | None = None
        """The summary cache by checkpoint name: an entry's parsed summary until it has been made
        into a listed :class:`CheckpointInfo`, then None (the info is the summary's source from then on)."""
        self._metadata_reads = 0
        self._from_cache: set[str] = set()
        """Checkpoints listed from the summary cache alone: advisory until their metadata.json is read here."""
        self._warned_foreign: set[str] = set()
        self._warned_cache = False

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first (by epoch, then step); from the listing cache
        where an entry did not change."""
        found: dict[str, tuple[str, CheckpointInfo]] = {}
        read_before = self._metadata_reads
        with listing.gc_paused():
            for entry in self._store.visible():
                if not looks_like_checkpoint(entry.name):
                    continue
                cached = self._entries.get(entry.name)
                if entry.fingerprint and cached is not None and cached[0] == entry.fingerprint:
                    found[entry.name] = cached
                    continue
                info = self._read_info(entry.name, entry.location)
                if info is not None:
                    found[entry.name] = (entry.fingerprint, info)
        self._entries = found
        if self._summaries is not None:  # the parsed cache is dropped once listed: fewer objects for the collector
            self._summaries = {name: self._summaries[name] for name in found if name in self._summaries}
        if self._metadata_reads - read_before > listing.REWRITE_AFTER_READS and self._summaries is not None:
            self._save_summaries()
        return sorted((info for _, info in found.values()), key=lambda info: info.sort_key)

    def checkpoints_from_metadata(self) -> list[CheckpointInfo]:
        """Every committed checkpoint as its own ``metadata.json`` says, oldest first.

        The summary cache (``.listing.json``) is unkeyed: anyone who can write the directory can
        write it. It speeds up :meth:`checkpoints`, but it never decides what retention deletes nor
        what a signed load chooses: those decide by this listing, in which every entry that came
        from the cache is read again from its ``metadata.json`` (once per process). An entry the
        cache got wrong is corrected in the cache too, with a warning (shown once).
        """
        found = []
        for info in self.checkpoints():
            if info.name in self._from_cache:
                info = self._read_again(info)
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda info: info.sort_key)

    def forget(self, name: str) -> None:
        """Drop ``name``: the next listing reads it again."""
        self._entries.pop(name, None)

    def _save_summaries(self) -> None:
        assert self._summaries is not None
        assert self._store.summary_dir is not None
        summaries = {}
        for name, (_, info) in self._entries.items():
            if name in self._summaries:
                key, summary = self._summaries[name]
                summaries[name] = (key, summary if isinstance(summary, dict) else listing.summary(info))
        listing.save(self._store.summary_dir, summaries)

    def _read_info(self, name: str, location: str, *, use_cache: bool = True) -> CheckpointInfo | None:
        key = None
        if self._store.summary_dir is not None:  # where the commit store keeps a summary cache file
            key = listing.identity(os.path.join(location, METADATA_FILE))
            cached = self._from_summary(name, location, key) if use_cache else None
            if cached is not None:
                return cached
        backend = self._store.backend
        try:
            info = read_info(location, backend)
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
            self._warn_unreadable(name, location, exc)
            return None
        self._metadata_reads += 1
        self._from_cache.discard(name)
        if key is not None and self._summaries is not None:
            self._summaries[name] = (key, listing.summary(info))
        return info

    def _from_summary(self, name: str, location: str, key: listing.Identity | None) -> CheckpointInfo | None:
        if self._summaries is None:
            self._summaries = listing.load(self._store.summary_dir)
        known = self._summaries.get(name)
        if key is None or known is None or known[0] != key:
            return None
        try:
            cached = listing.info_from_summary(Path(location), known[1], self._store.backend)
        except (CheckpointError, KeyError, TypeError, ValueError):
            return None
        self._from_cache.add(name)
        self._summaries[name] = (key, None)
        return cached

    def _warn_unreadable(self, name: str, location: str, exc: BaseException) -> None:
        if self._store.backend.fingerprint(location) is None:
            return  # deleted or replaced by another manager while being listed
        if name not in self._warned_foreign:
            self._warned_foreign.add(name)
            warnings.warn(
                f"ignoring {location}: it is named like a checkpoint but is not a readable ckpt_plugin "
                f"checkpoint ({exc}). It is never deleted; move it away to silence this warning.",
                UserWarning,
                stacklevel=5,
            )

    def remember(self, info: CheckpointInfo) -> None:
        fingerprint = self._store.identity(info.location)
        if fingerprint:
            self._entries[info.name] = (fingerprint, info)
            self._from_cache.discard(info.name)
        else:  # pragma: no cover - removed by another process
            self._entries.pop(info.name, None)

    def _read_again(self, cached: CheckpointInfo) -> CheckpointInfo | None:
        """``cached`` (an entry of the summary cache) read again from its ``metadata.json``."""
        fingerprint = self._entries.get(cached.name, ("", cached))[0]
        info = self._read_info(cached.name, cached.location, use_cache=False)
        if info is None:
            self._entries.pop(cached.name, None)
            return None
        self._entries[cached.name] = (fingerprint, info)
        if info == cached or listing.summary(info) == listing.summary(cached):  # NaN metrics differ from themselves
            return info
        if self._summaries is not None:
            self._save_summaries()
        if not self._warned_cache:
            self._warned_cache = True
            warnings.warn(
                f"the listing cache {listing.CACHE_FILE} in {self._store.location} disagrees with {cached.location}/"
                f"{METADATA_FILE}; it is ignored for that checkpoint and rewritten. Something other than "
                "ckpt_plugin edits that directory. (This warning is shown once.)",
                UserWarning,
                stacklevel=5,
            )
        return info
