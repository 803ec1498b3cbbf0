"""The uploads of sharded (collective) checkpoints: every rank uploads its own shard files, and the
coordinator commits the durable copy once all have.

A collective save commits in the coordinator's ``local_dir`` as any sharded save commits in a
directory: every rank writes its own files into the transaction the coordinator began, and the
coordinator writes ``sharding.json`` and ``metadata.json``. Then, on a background thread of every
rank, in save order, one upload runs as three exchanges over a gloo group of its own (created with
``collective_timeout``, so a rank that never arrives fails the others after that long):

1. the coordinator begins a transaction on the durable tier (or finds the save durable already);
2. every rank streams its own shard files (``*-r{rank}-of-{N}.safetensors``) into it, the
   coordinator the other files too, each checked against its record; the ranks exchange the
   digests;
3. the coordinator signs the copy again when it is signed, writes ``metadata.json`` last, marks the
   save done in its journal and applies retention.

A failure on any rank fails the upload on every rank; the coordinator aborts the transaction, so
nothing half-uploaded is ever visible (a kill leaves an uncommitted prefix that recovery removes).
The upload stays pending: the next ``save`` or ``wait`` raises the failure on every rank, and the
one after it tries the upload again. A manager opened again after a crash finds the save in the
coordinator's journal and uploads it from there (the coordinator's ``local_dir`` holds every file).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from .._io.info import CheckpointInfo
from .._io.reader import read_info
from .._storage import Transaction
from ..errors import UploadError
from .tiers import Tiers
from .upload import commit_copy, durable_copy, local_manifest, stream_files

_RANK_FILE = re.compile(r"-r(\d+)-of-\d+\.safetensors$")


def files_of(names: Iterable[str], rank: int) -> list[str]:
    """The files among ``names`` that ``rank`` uploads: its own shard files; the coordinator's
    (rank 0) also every file that belongs to no rank (``sharding.json``, ``state.json``, ...)."""
    owned = []
    for name in sorted(names):
        match = _RANK_FILE.search(name)
        if (int(match.group(1)) if match else 0) == rank:
            owned.append(name)
    return owned


class ShardedUploads:
    """The uploads of this rank's sharded saves, in save order, on one background thread."""

    def __init__(self, tiers: Tiers, signing_key: Any = None) -> None:
        self.tiers = tiers
        self.signing_key = signing_key
        self._queue: deque[tuple[CheckpointInfo, int | None]] = deque()
        self._cond = threading.Condition()
        self._failure: UploadError | None = None
        self._paused = False
        """After a failure was raised: the uploads resume on this rank's next save or wait."""
        self._group: Any = None
        self._rank = 0
        self._thread: threading.Thread | None = None

    def add(self, info: CheckpointInfo, seq: int | None, rank: int, timeout: float) -> None:
        """Queue the upload of ``info`` (on the coordinator, save ``seq`` of its journal). Every rank
        calls it, in the same order (it may create the gloo group the uploads use)."""
        from .._distributed.collective import coordination_group  # torch.distributed loads on first use

        group = coordination_group(timeout, purpose="uploads")
        with self._cond:
            self._group, self._rank = group, rank
            self._queue.append((info, seq))
            self._paused = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ckpt-sharded-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> list[CheckpointInfo]:
        """The saves whose upload has not finished, oldest first."""
        with self._cond:
            return [info for info, _ in self._queue]

    def wait(self, limit: int = 0) -> None:
        """Block until at most ``limit`` uploads are pending; raise (once) the failure that stopped
        them instead. The uploads resume on the next call (or save), on every rank alike."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()
            while self._failure is None and len(self._queue) > limit:
                self._cond.wait(1.0)
            failure, self._failure = self._failure, None
            self._paused = failure is not None
        if failure is not None:
            raise failure

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._failure is not None or self._paused or not self._queue:
                    self._cond.wait()
                info, seq = self._queue[0]
            try:
                self._upload(info, seq)
            except BaseException as exc:  # noqa: BLE001 - held and raised on this rank's next save or wait
                failure = UploadError(
                    f"could not upload the sharded checkpoint {info.name} to the durable tier ({type(exc).__name__}: "
                    f"{exc}); it stays in local_dir and its upload is tried again"
                )
                failure.__cause__ = exc
                with self._cond:
                    self._failure = failure
                    self._cond.notify_all()
                continue
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def _upload(self, info: CheckpointInfo, seq: int | None) -> None:
        """The three exchanges of the module notes, for one save."""
        from .._distributed.collective import agree
        group, rank, durable = self._group, self._rank, self.tiers.durable
        action = f"uploading the sharded checkpoint {info.name}"
        document: Mapping[str, Any] = {}
        txn = copy = None
        error: BaseException | None = None
        try:
            if rank == 0 and (copy := durable_copy(info, durable)) is None:
                document = local_manifest(info, self.signing_key)
                durable.ensure_writable()
                txn = durable.begin(info.name)
        except BaseException as exc:
            error = exc
        began = agree(group, action, error, None if txn is None else (txn.name, txn.prefix), exchange=True)[0]
        if began is not None:
            copy = self._copy(info, Transaction(*began), document, action)
        error = None
        if rank == 0:
            try:  # the save is durable: the journal says so, and retention runs on both tiers
                assert copy is not None
                if seq is not None:
                    self.tiers.journal.done(info.name, seq)
                self.tiers.on_durable(copy)
                self.tiers.retain_local()
            except BaseException as exc:
                error = exc
        agree(group, action, error)

    def _copy(self, info: CheckpointInfo, txn: Transaction, document: Mapping[str, Any], action: str) -> CheckpointInfo | None:
        """Steps 2 and 3: every rank streams its files under ``txn``; the coordinator commits the
        copy (returned there; None on the other ranks) or, on any rank's failure, aborts it."""
        from .._distributed.collective import agree
        durable, rank = self.tiers.durable, self._rank
        error: BaseException | None = None
        digests: dict[str, str] = {}
        try:
            streamed = stream_files(info, files_of(info.files, rank), durable.backend, txn.prefix)
            digests = {name: digest.hex() for name, digest in streamed.items()}
        except BaseException as exc:
            error = exc
        copy = location = None
        try:
            gathered = agree(self._group, action, error, digests, exchange=True)
            if rank == 0:
                every = {name: bytes.fromhex(digest) for each in gathered for name, digest in each.items()}
                location = commit_copy(info, document, durable, txn, every, signing_key=self.signing_key)
                copy = read_info(location, durable.backend)
        except BaseException as exc:
            if rank == 0 and location is None:
                durable.abort(txn)
            error = exc
        else:
            error = None
        agree(self._group, action, error)
        return copy
