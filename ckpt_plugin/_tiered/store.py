"""The tiered save strategy as the manager sees it: a :class:`TieredStore` that stands where a
:class:`~ckpt_plugin._store.CheckpointStore` stands, and a :class:`TieredLoader` that reads the
fastest copy that verifies.

Two stores, one pipeline: a save commits through the local tier's ``CheckpointStore`` (with
today's guarantees, signed when a key is set); the uploader then commits it to the durable tier,
whose ``CheckpointStore`` remembers it, applies the manager's retention and logs the save. Listing
merges both tiers, the local copy of each checkpoint first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any

from .. import _retention as retention
from .._loading import Loader
from .._store import CheckpointStore
from ..errors import ConfigurationError, CorruptCheckpointError, SignatureError
from .._io.info import CheckpointInfo
from .._io.writer import Snapshot
from .._storage import Backend, Entry, Location, Transaction, with_backend
from .owner import LocalDirLock
from .ranks import RankCopies
from .sharded import ShardedUploads
from .tiers import Tiers


def check_tier_options(keep_local: Any, max_pending_uploads: Any) -> None:
    """Validate ``keep_local`` (a whole number, 0 or more) and ``max_pending_uploads`` (1 or more)."""
    for name, value, least in (("keep_local", keep_local, 0), ("max_pending_uploads", max_pending_uploads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigurationError(f"{name} must be a whole number of at least {least}, not {value!r}")


class TieredStore:
    """The checkpoints of a run kept in ``local_dir`` and drained to the ``durable`` location.

    ``policies`` (the manager's retention) govern the durable tier; ``keep_local`` local copies are
    kept besides the pending ones; a save waits while ``max_pending_uploads`` uploads are pending.
    """

    def __init__(
        self,
        durable: Location,
        local_dir: str | os.PathLike[str],
        *,
        policies: Sequence[retention.RetentionPolicy] = (),
        signing_key: str | os.PathLike[str] | None = None,
        keep_local: int = 2,
        max_pending_uploads: int = 2,
        collective_timeout: float = 600.0,
    ) -> None:
        check_tier_options(keep_local, max_pending_uploads)
        local = Location.of(local_dir)
        if local.local_dir() is None:
            raise ConfigurationError(f"local_dir must be a local directory (or one on /dev/shm), not the URL {local}")
        self.owner = LocalDirLock(local_dir)
        self.owner.hold()
        self.location = durable
        self.max_pending_uploads = max_pending_uploads
        self.collective_timeout = collective_timeout
        try:
            self._open(local, policies, signing_key, keep_local)
        except BaseException:
            self.owner.release()
            raise

    def _open(
        self, local: Location, policies: Sequence[retention.RetentionPolicy], signing_key: str | os.PathLike[str] | None,
        keep_local: int,
    ) -> None:
        """Open both tiers and resume what an earlier manager of ``local_dir`` left pending."""
        durable = self.location
        self.local_store = CheckpointStore(local, signing_key=signing_key)
        self.durable_store = CheckpointStore(durable, policies=policies, signing_key=signing_key)
        local_commit = local.commit_store()
        local_commit.ensure_writable()
        self.tiers = Tiers(
            local_commit,
            durable.commit_store(),
            keep_local=keep_local,
            policies=policies,
            signing_key=signing_key,
            local_listing=self.local_store.checkpoints,
            durable_listing=self.durable_store.checkpoints_from_metadata,
            on_durable=self.durable_store.committed,
        )
        self._seqs: dict[str, int] = {}
        self.ranks = RankCopies(local.path)
        self.rank_store = CheckpointStore(Location.of(self.ranks.root))
        """The coordinator's copies of sharded checkpoints (unsigned: the durable copy is signed)."""
        self._sharded_txns: dict[str, tuple[str, int]] = {}
        """This rank's sharded transactions in ``local_dir`` not yet committed: prefix to (name, seq)."""
        self._sharded: dict[str, tuple[int, Transaction | None]] = {}
        """This rank's sharded saves written, not yet sealed: name to (seq, its staging, None on the coordinator)."""
        self.sharded = ShardedUploads(
            self.tiers, self.ranks, keep_local=keep_local, signing_key=signing_key, timeout=self.collective_timeout
        )
        self.tiers.resume()

    # ------------------------------------------------------------------ what the save strategies use

    @property
    def policies(self) -> tuple[retention.RetentionPolicy, ...]:
        return self.durable_store.policies

    @property
    def backend(self) -> Backend:
        """The local tier's backend, which every save writes through."""
        return self.local_store.backend

    def route(self, wrap: Callable[[Backend], Backend]) -> Backend:
        """Move the durable tier's bytes (the uploads) through ``wrap(backend)``; return it."""
        backend = self.durable_store.route(wrap)
        self.tiers.durable = with_backend(self.tiers.durable, backend)
        return backend

    def begin(self, name: str) -> Transaction:
        """The coordinator's transaction in its ``local_dir`` for a sharded save of ``name``, written
        ahead in its journal of sharded uploads (see :meth:`shared`)."""
        self.owner.hold()
        return self._sharded_begin(name, self.rank_store.begin)

    def rank_transaction(self, txn: Transaction, rank: int) -> Transaction:
        """Where this rank writes its files of the sharded save ``txn`` (the coordinator's): its own
        staging directory in its own ``local_dir``, written ahead in its journal."""
        if rank == 0:
            return txn
        self.owner.hold()
        own = self._sharded_begin(txn.name, self.ranks.begin)
        self._sharded[txn.name] = (self._sharded_txns[own.prefix][1], own)
        return own

    def _sharded_begin(self, name: str, begin: Callable[[str], Transaction]) -> Transaction:
        seq = self.ranks.journal.add(name)
        try:
            txn = begin(name)
        except BaseException:
            self.ranks.journal.done(name, seq)
            raise
        self._sharded_txns[txn.prefix] = (name, seq)
        return txn

    def commit(self, snapshot: Snapshot, txn: Transaction | None = None, **strategy: Any) -> CheckpointInfo:
        """Commit ``snapshot`` in ``local_dir`` (see ``CheckpointStore.commit``) once fewer than
        ``max_pending_uploads`` uploads are pending; a persistent upload failure is raised first.
        With ``txn`` (a sharded save's, from :meth:`begin`), into that transaction."""
        self.owner.hold()
        if txn is not None:
            info = self.rank_store.commit(snapshot, txn)
            self._sharded[info.name] = (self._sharded_txns.pop(txn.prefix)[1], None)
            return info
        self.tiers.uploader.wait_for_room(self.max_pending_uploads - 1)
        seq = self.tiers.before_commit(snapshot.name)
        try:
            info = self.local_store.commit(snapshot, **strategy)
        except BaseException:
            self.tiers.abandon(seq)
            raise
        self._seqs[info.name] = seq
        return info

    def committed(self, info: CheckpointInfo) -> None:
        """After the local commit of ``info``: log it locally, start its upload, prune ``local_dir``.
        (A sharded save's upload starts in :meth:`shared`, on every rank.)"""
        if not info.sharded:
            self.local_store.committed(info)
            self.tiers.after_commit(info, self._seqs.pop(info.name))

    def shared(self, info: CheckpointInfo, rank: int, world_size: int) -> None:
        """Every rank of a sharded save that committed ``info``: seal this rank's copy in its
        ``local_dir`` and queue its upload; then wait while more than ``max_pending_uploads`` are
        pending."""
        seq, staging = self._sharded.pop(info.name)
        if staging is not None:
            self._sharded_txns.pop(staging.prefix, None)
        local = self.ranks.seal(info, rank, world_size, staging)
        self.sharded.add(local, seq)
        self.sharded.wait(self.max_pending_uploads)

    def abort(self, txn: Transaction) -> None:
        began = self._sharded_txns.pop(txn.prefix, None)
        if began is None:
            self.local_store.abort(txn)
            return
        self.ranks.abort(txn)  # a sharded save that failed before this rank's commit: nothing to upload
        self.ranks.journal.done(*began)
        if self._sharded.get(began[0], (None, None))[1] == txn:
            del self._sharded[began[0]]

    def pending(self, snapshot: Snapshot) -> CheckpointInfo:
        return self.local_store.pending(snapshot)

    def mark_resumed(self) -> None:
        """The run resumed in this process: the next save's log entries (in both tiers) say so."""
        self.local_store.mark_resumed()
        self.durable_store.mark_resumed()

    def save_log(self) -> list[dict[str, Any]]:
        """The run's save log as the durable tier keeps it (an entry is written there on upload)."""
        return self.durable_store.save_log()

    # ------------------------------------------------------------------ uploads

    def pending_uploads(self) -> list[CheckpointInfo]:
        """The checkpoints committed in ``local_dir`` whose upload is pending, oldest first (on
        every rank of a sharded save, those it still uploads shards of)."""
        pending = self.tiers.pending()
        names = {info.name for info in pending}
        return pending + [info for info in self.sharded.pending() if info.name not in names]

    def wait(self) -> None:
        """Block until every pending upload is durable; raise a persistent upload failure."""
        self.sharded.wait()
        self.tiers.uploader.wait()

    def close(self) -> None:
        """Give ``local_dir`` up: another manager may open it now (the next save takes it back)."""
        self.owner.release()

    def settle_sharded(self) -> None:
        """Every rank, before a collective restore chooses a checkpoint: finish the sharded uploads
        that earlier managers left pending, so that every rank chooses among the same ones."""
        self.sharded.resume()
        self.sharded.wait()

    # ------------------------------------------------------------------ retention

    def retain(self, protect: CheckpointInfo | None = None) -> None:
        self.tiers.retain_durable(protect)
        self.tiers.retain_local()

    def retained(self, checkpoints: list[CheckpointInfo], protect: CheckpointInfo | None = None) -> list[CheckpointInfo]:
        return self.durable_store.retained(checkpoints, protect)

    def acknowledge_later_checkpoints(self) -> None:
        self.local_store.acknowledge_later_checkpoints()
        self.durable_store.acknowledge_later_checkpoints()

    # ------------------------------------------------------------------ listing

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint of either tier, oldest first; the local copy where there is one."""
        return self.tiers.checkpoints()

    def checkpoints_from_metadata(self) -> list[CheckpointInfo]:
        return _merged(self.durable_store.checkpoints_from_metadata(), self.local_store.checkpoints_from_metadata())

    def visible(self) -> Iterator[Entry]:
        return chain(self.local_store.visible(), self.durable_store.visible())

    def copies(self) -> dict[str, tuple[str, ...]]:
        """For each checkpoint, the tiers holding a copy (``"local"``, ``"durable"``)."""
        return self.tiers.copies()

    def forget(self, name: str) -> None:
        self.local_store.forget(name)
        self.durable_store.forget(name)

    def at(self, location: str | os.PathLike[str]) -> CheckpointInfo | None:
        """The checkpoint committed at ``location``, a copy in either tier, or None."""
        return self.local_store.at(location) or self.durable_store.at(location)


def _merged(durable: list[CheckpointInfo], local: list[CheckpointInfo]) -> list[CheckpointInfo]:
    found = {info.name: info for info in durable} | {info.name: info for info in local}
    return sorted(found.values(), key=lambda info: info.sort_key)


class TieredLoader(Loader):
    """A :class:`~ckpt_plugin._loading.Loader` that reads the local copy of a checkpoint when it
    verifies, else the durable one (with one warning); signatures are checked on the copy read."""

    def __init__(self, store: TieredStore, settings: Any) -> None:
        super().__init__(store, settings)  # type: ignore[arg-type]
        self.tiers = store.tiers
        self.ranks = store.ranks

    def read(self, info: CheckpointInfo, **options: Any) -> dict[str, Any]:
        return self.tiers.read(info, lambda copy: super(TieredLoader, self).read(copy, **options))

    def _read_signed(self, info: CheckpointInfo, public_key: Any, **options: Any) -> tuple[dict[str, Any], CheckpointInfo]:
        read = super()._read_signed
        return self.tiers.read(info, lambda copy: read(copy, public_key, **options), also=(SignatureError,))

    def restore(self, info: CheckpointInfo, model: Any, optimizer: Any, scheduler: Any, **options: Any) -> None:
        if options.get("collective") and info.sharded:
            strict, restore_rng = options["strict"], options["restore_rng"]
            return self._restore_ranks(info, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng)
        restore = super().restore
        local = self.tiers.local_copy(info)
        if local is not None:
            try:  # atomic: every file is checked before anything changes, so a damaged copy changes nothing
                return restore(local, model, optimizer, scheduler, **{**options, "atomic": True})
            except CorruptCheckpointError as exc:
                durable = self.tiers.durable_copy_of(local)
                if durable is None:
                    raise
                self.tiers.warn_fallback(local, durable, exc)
                return restore(durable, model, optimizer, scheduler, **options)
        return restore(self.tiers.durable_copy_of(info) or info, model, optimizer, scheduler, **options)

    def _restore_ranks(
        self, info: CheckpointInfo, model: Any, optimizer: Any, scheduler: Any, *, strict: bool, restore_rng: bool
    ) -> None:
        """A collective restore of the sharded checkpoint ``info``: every rank reads the files of its
        own local copy when they verify (else the durable ones, with one warning), the rest from
        the durable copy."""
        from .._distributed.collective import restore_sharded  # torch.distributed loads on first use

        durable = self.tiers.durable_copy_of(info) or info
        restore_sharded(
            self.settings, durable, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng,
            local_files=self.ranks.verified(durable),
        )
