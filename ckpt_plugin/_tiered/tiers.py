"""Two tiers of one run: a fast local directory that saves commit to, and a durable store that a
background uploader drains it to.

:class:`Tiers` ties the pieces together over two :class:`~ckpt_plugin.storage.base.Commit` stores:

- saving: :meth:`Tiers.before_commit` writes the journal entry ahead of the local commit, and
  :meth:`Tiers.after_commit` starts the upload and prunes the local tier;
- uploading (:mod:`.uploader`, :mod:`.upload`): in save order, idempotent, retried, manifest-last;
- retention (:mod:`.keep`): the policies on the durable tier, ``keep_local`` plus every pending
  upload on the local one, never the only copy;
- loading: :meth:`Tiers.checkpoints` lists both tiers, the local copy of each checkpoint preferred,
  and :meth:`Tiers.read` falls back to the durable copy when the local one does not verify.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .. import _retention as retention
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, StorageError
from .._format.layout import looks_like_checkpoint
from .._io.info import CheckpointInfo
from .._io.reader import read_info
from .._storage import Commit
from . import keep
from .journal import PendingJournal
from .upload import durable_copy, upload
from .uploader import Uploader

Listing = Callable[[], list[CheckpointInfo]]
"""Every committed checkpoint of one tier, oldest first."""
Result = TypeVar("Result")


def list_committed(store: Commit) -> list[CheckpointInfo]:
    """Every committed checkpoint of ``store`` as its ``metadata.json`` says, oldest first; an entry
    that cannot be read (deleted meanwhile, or not a checkpoint) is left out."""
    found = []
    for entry in store.visible():
        if not looks_like_checkpoint(entry.name):
            continue
        try:
            found.append(read_info(entry.location, store.backend))
        except (CheckpointError, OSError, KeyError, TypeError, ValueError):
            continue
    return sorted(found, key=lambda info: info.sort_key)


class Tiers:
    """The local and the durable tier of one run, with the uploader between them.

    ``local`` must be a local directory store (the journal lives in its root). ``policies`` are the
    manager's retention policies, applied to the durable tier; ``keep_local`` local copies are kept
    besides the pending ones. ``signing_key`` signs the durable copies of signed checkpoints.
    ``local_listing`` and ``durable_listing`` list each tier (by default :func:`list_committed`).
    ``on_durable(copy)`` runs after each upload commits (by default :meth:`retain_durable`).
    """

    def __init__(
        self,
        local: Commit,
        durable: Commit,
        *,
        keep_local: int = 2,
        policies: Sequence[retention.RetentionPolicy] = (),
        signing_key: str | os.PathLike[str] | None = None,
        local_listing: Listing | None = None,
        durable_listing: Listing | None = None,
        on_durable: Callable[[CheckpointInfo], None] | None = None,
        attempts: int = 5,
        backoff: float = 0.5,
    ) -> None:
        self.local = local
        self.durable = durable
        self.keep_local = keep_local
        self.policies = tuple(policies)
        self.signing_key = signing_key
        self.local_listing: Listing = local_listing or (lambda: list_committed(self.local))
        self.durable_listing: Listing = durable_listing or (lambda: list_committed(self.durable))
        self.on_durable: Callable[[CheckpointInfo], None] = on_durable or self.retain_durable
        self.journal = PendingJournal(Path(getattr(local, "root")))
        self._committing: set[int] = set()
        """Journal entries of this process whose local commit is still in progress."""
        self.uploader = Uploader(
            self.journal, self._upload_one, ready=lambda name, seq: seq not in self._committing, attempts=attempts, backoff=backoff
        )
        self._retention_lock = threading.RLock()
        self._warned_fallback = self._warned_unreachable = False

    # ------------------------------------------------------------------ saving

    def resume(self) -> None:
        """Start uploading what an earlier manager left pending (a no-op when nothing is)."""
        if len(self.journal):
            self.uploader.kick()

    def before_commit(self, name: str) -> int:
        """Record, ahead of the local commit of ``name``, that it must be uploaded; return its seq."""
        seq = self.journal.add(name)
        self._committing.add(seq)
        return seq

    def after_commit(self, info: CheckpointInfo, seq: int) -> None:
        """Save ``seq``, ``info``, committed locally: start its upload. (The local tier is pruned
        after each upload, on the uploader's thread: nothing local can go before a copy is durable,
        and the save does not wait for a listing of the durable tier.)"""
        self._committing.discard(seq)
        self.uploader.kick()

    def abandon(self, seq: int) -> None:
        """Save ``seq`` failed before its local commit. Its journal entry stays: the uploader drops
        it, or uploads the older local copy of that name that it names too."""
        self._committing.discard(seq)
        self.uploader.kick()

    def pending(self) -> list[CheckpointInfo]:
        """The local copies that await their upload, oldest save first."""
        local = {info.name: info for info in self.local_listing()}
        return [local[name] for name, _ in self.journal.pending() if name in local]

    def _upload_one(self, name: str, seq: int) -> None:
        """Make save ``seq`` of ``name`` durable (the uploader's task), then apply retention."""
        location = self.local.location(name)
        if location is None:  # the save never committed: nothing to upload
            self.journal.done(name, seq)
            return
        info = read_info(location, self.local.backend)
        try:
            copy = durable_copy(info, self.durable) or upload(info, self.durable, signing_key=self.signing_key)
        except CorruptCheckpointError:
            if self._replaced(info):
                raise StorageError(f"{info.location} was replaced while it was being uploaded") from None
            self.journal.done(name, seq)  # a damaged only copy can never be uploaded: say so once
            raise
        self.journal.done(name, seq)
        self.on_durable(copy)
        self.retain_local()

    def _replaced(self, info: CheckpointInfo) -> bool:
        location = self.local.location(info.name)
        try:
            return location is None or read_info(location, self.local.backend).files != info.files
        except (CheckpointError, OSError):
            return False

    # ------------------------------------------------------------------ retention

    def retain_durable(self, protect: CheckpointInfo | None = None) -> None:
        """Delete the durable copies the policies drop (``protect``, just uploaded, is kept)."""
        with self._retention_lock:
            for info in keep.durable_to_delete(self.durable_listing(), self.policies, protect):
                self.durable.remove(info.name)

    def retain_local(self) -> None:
        """Delete the local copies beyond ``keep_local`` that are durable (or retired); never a
        pending one, and nothing when the durable tier cannot be listed."""
        with self._retention_lock:
            local = self.local_listing()
            try:
                durable = self.durable_listing()
            except (CheckpointError, OSError):
                return
            durable_names = {info.name for info in durable}
            merged = {info.name: info for info in durable} | {info.name: info for info in local}
            everything = sorted(merged.values(), key=lambda info: info.sort_key)
            pending = {name for name, _ in self.journal.pending()}
            for info in keep.local_to_delete(
                local,
                pending=pending,
                durable=durable_names,
                keep_local=self.keep_local,
                retired=keep.retired_names(everything, self.policies),
            ):
                if info.name not in {name for name, _ in self.journal.pending()}:  # saved again meanwhile
                    self.local.remove(info.name)

    # ------------------------------------------------------------------ listing and loading

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint of either tier, oldest first; the local copy where there is one. When
        the durable tier cannot be reached, the local copies alone, with one warning."""
        try:
            merged = {info.name: info for info in self.durable_listing()}
        except (StorageError, OSError) as exc:
            merged = {}
            if not self._warned_unreachable:
                self._warned_unreachable = True
                warnings.warn(
                    f"the durable tier {self.durable!r} cannot be listed ({exc}); listing the copies in local_dir only. "
                    "(This warning is shown once.)",
                    UserWarning,
                    stacklevel=3,
                )
        merged.update((info.name, info) for info in self.local_listing())
        return sorted(merged.values(), key=lambda info: info.sort_key)

    def copies(self) -> dict[str, tuple[str, ...]]:
        """For each checkpoint, the tiers that hold a copy (``"local"``, ``"durable"``)."""
        held: dict[str, tuple[str, ...]] = {}
        for tier, listing in (("local", self.local_listing), ("durable", self.durable_listing)):
            for info in listing():
                held[info.name] = held.get(info.name, ()) + (tier,)
        return held

    def read(
        self, info: CheckpointInfo, read: Callable[[CheckpointInfo], Result], *, also: tuple[type[BaseException], ...] = ()
    ) -> Result:
        """``read(copy)`` of the fastest copy of checkpoint ``info`` that verifies: the local one,
        else the durable one, with one warning. A local copy fails on damage, on a missing file, or
        on an error of the kinds in ``also``; the durable copy's error is raised when both fail."""
        local = self.local_copy(info)
        if local is not None:
            try:
                return read(local)
            except (CorruptCheckpointError, CheckpointNotFoundError, FileNotFoundError, *also) as exc:
                durable = self.durable_copy_of(local)
                if durable is None:
                    raise
                self.warn_fallback(local, durable, exc)
                return read(durable)
        durable = self.durable_copy_of(info)
        if durable is None:
            raise CheckpointNotFoundError(f"{info.name} is in neither {self.local!r} nor {self.durable!r}")
        return read(durable)

    def local_copy(self, info: CheckpointInfo) -> CheckpointInfo | None:
        """The local copy of the checkpoint named as ``info``, or None."""
        return _copy_on(self.local, info)

    def durable_copy_of(self, info: CheckpointInfo) -> CheckpointInfo | None:
        """The durable copy of the checkpoint named as ``info``, or None."""
        return _copy_on(self.durable, info)

    def warn_fallback(self, local: CheckpointInfo, durable: CheckpointInfo, exc: BaseException) -> None:
        """Warn (once) that the local copy failed and the durable one is read instead."""
        if self._warned_fallback:
            return
        self._warned_fallback = True
        warnings.warn(
            f"the local copy {local.location} cannot be read ({exc}); reading the durable copy {durable.location} "
            "instead. Delete the local copy, or let retention replace it. (This warning is shown once.)",
            UserWarning,
            stacklevel=4,
        )


def _is_on(info: CheckpointInfo, store: Commit) -> bool:
    """Whether ``info`` is a checkpoint of ``store`` (its location lies directly under the root)."""
    root = getattr(store, "root")
    if isinstance(root, str):  # an object store's URL
        return info.location.rstrip("/").rsplit("/", 1)[0] == root.rstrip("/")
    return Path(info.location).parent.resolve() == Path(root).resolve()


def _copy_on(store: Commit, info: CheckpointInfo) -> CheckpointInfo | None:
    """The copy of the checkpoint named as ``info`` that ``store`` holds (``info`` itself when it
    is that copy), or None when the store holds none that reads."""
    if _is_on(info, store):
        return info
    location = store.location(info.name)
    if location is None:
        return None
    try:
        return read_info(location, store.backend)
    except (CheckpointError, OSError):
        return None
