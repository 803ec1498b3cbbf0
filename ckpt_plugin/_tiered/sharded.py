"""The uploads of sharded (collective) checkpoints: every rank uploads the files of its own local
copy, and the coordinator commits the durable copy once all have.

A collective save with ``local_dir`` commits on every rank into that rank's own ``local_dir`` (see
:mod:`.ranks` for the layout): each rank writes its shard files there, the coordinator also
``sharding.json``, ``state.json`` and ``metadata.json``, and each seals its copy with its record.
Then, on a background thread of every rank, in save order, one upload runs as three exchanges
over a gloo group of its own (created with ``collective_timeout``, so a rank that never arrives
fails the others after that long):

1. the coordinator begins a transaction on the durable tier (or finds the save durable already);
   every rank says whether it holds its sealed copy;
2. every rank streams the files its record lists into the transaction, each checked against its
   record; the ranks exchange the digests;
3. the coordinator checks that the ranks' files are every file the checkpoint records, signs the
   copy when a key is set, writes ``metadata.json`` last and applies retention; then every rank
   marks the save done in its journal and prunes its copies beyond ``keep_local``.

A failure on any rank fails the upload on every rank; the coordinator aborts the transaction, so
nothing half-uploaded is ever visible (a kill leaves an uncommitted prefix that recovery removes).
The upload stays pending: the next ``save`` or ``wait`` raises the failure on every rank, and the
one after it tries the upload again.

After a crash, the saves left in the ranks' journals are resumed by the new managers of every rank
together, at their first sharded save, their first collective restore, or their first ``wait``
(which every rank then calls). A save that some rank never sealed never returned: it is dropped.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from .._io.info import CheckpointInfo
from .._io.reader import read_info
from .._storage import Transaction
from ..errors import CorruptCheckpointError, UploadError
from .ranks import RankCopies
from .tiers import Tiers
from .upload import commit_copy, durable_copy, local_manifest, stream_files

Task = tuple[CheckpointInfo, "int | None"]
"""One upload: the save (located at this rank's copy) and its sequence number in this rank's journal."""


class ShardedUploads:
    """The uploads of this rank's parts of sharded saves, in save order, on one background thread."""

    def __init__(self, tiers: Tiers, copies: RankCopies, *, keep_local: int, signing_key: Any, timeout: float) -> None:
        self.tiers = tiers
        self.copies = copies
        self.keep_local = keep_local
        self.signing_key = signing_key
        self.timeout = timeout
        self._inherited = copies.journal.pending()
        """The saves an earlier manager of this ``local_dir`` left pending: resumed with the other ranks."""
        self._used = copies.root.is_dir()
        """Whether sharded saves were made with this ``local_dir`` before."""
        self._resumed = False
        self._queue: deque[Task] = deque()
        self._cond = threading.Condition()
        self._failure: UploadError | None = None
        self._paused = False
        """After a failure was raised: the uploads resume on this rank's next save or wait."""
        self._group: Any = None
        self._rank = 0
        self._thread: threading.Thread | None = None

    def add(self, info: CheckpointInfo, seq: int | None) -> None:
        """Queue the upload of ``info`` (save ``seq`` of this rank's journal). Every rank calls it,
        in the same order; the first call resumes what earlier managers left pending."""
        self._join()
        self._enqueue([(info, seq)])

    def resume(self) -> None:
        """Every rank, together: queue the saves that earlier managers left pending (at most once)."""
        self._join()

    def _join(self) -> None:
        import torch.distributed as dist  # loads on first use

        from .._distributed.collective import agree, coordination_group

        if self._group is None:
            if not _distributed():
                raise UploadError(
                    f"{len(self._inherited)} sharded upload(s) that an earlier run left pending in {self.copies.root} "
                    "can only be resumed by all ranks together: open a manager on every rank of the distributed job "
                    "(each with its own local_dir) and call wait() there"
                )
            self._group = coordination_group(self.timeout, purpose="uploads")
            self._rank = dist.get_rank(self._group)
        if self._resumed:
            return
        self._resumed = True
        mine = [[name, self._summary(name)] for name, _ in self._inherited]
        gathered = agree(self._group, "resuming the sharded uploads", None, mine, exchange=True)
        seqs = dict(self._inherited)
        summaries: dict[str, Any] = {}
        for pending in gathered:
            for name, summary in pending:
                if summaries.get(name) is None:
                    summaries[name] = summary
        tasks: list[Task] = []
        for name, summary in summaries.items():
            if summary is None:  # no rank sealed its copy: the save never returned
                if name in seqs:
                    self.copies.journal.done(name, seqs[name])
                continue
            tasks.append((self.copies.info_of(name, summary), seqs.get(name)))
        self._enqueue(tasks)

    def _summary(self, name: str) -> Any:
        record = self.copies.record(name)
        return None if record is None else record.checkpoint

    def _enqueue(self, tasks: list[Task]) -> None:
        with self._cond:
            self._queue.extend(tasks)
            self._paused = False
            if self._queue and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="ckpt-sharded-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> list[CheckpointInfo]:
        """The saves whose upload has not finished, oldest first (those an earlier manager left
        pending too, before they are resumed)."""
        with self._cond:
            queued = [info for info, _ in self._queue]
        if self._resumed:
            return queued
        inherited = [self.copies.info(record) for name, _ in self._inherited if (record := self.copies.record(name))]
        return inherited + queued

    def wait(self, limit: int = 0) -> None:
        """Block until at most ``limit`` uploads are pending; raise (once) the failure that stopped
        them instead. The uploads resume on the next call (or save), on every rank alike. When an
        earlier manager made sharded saves with this ``local_dir``, the first call resumes what it
        left pending, with the other ranks: every rank must call it."""
        if not self._resumed and (self._inherited or (self._used and _distributed())):
            self._join()
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
        record = self.copies.record(info.name)
        held = record is not None and record.is_of(info)
        document: Mapping[str, Any] = {}
        txn = copy = None
        error: BaseException | None = None
        try:
            if rank == 0 and (copy := durable_copy(info, durable)) is None and held:
                document = local_manifest(info, self.signing_key)
                durable.ensure_writable()
                txn = durable.begin(info.name)
        except BaseException as exc:
            error = exc
        mine = [held, None if txn is None else [txn.name, txn.prefix], copy is not None]
        outcomes = agree(group, action, error, mine, exchange=True)
        began, already = outcomes[0][1], outcomes[0][2]
        if already or all(outcome[0] for outcome in outcomes):
            if began is not None:
                assert record is not None
                copy = self._copy(info, sorted(record.files), Transaction(*began), document, action)
        elif txn is not None:  # a rank never sealed its copy: the save never returned, nothing to upload
            durable.abort(txn)
        self._settle(info, seq, copy, action)

    def _copy(
        self, info: CheckpointInfo, names: list[str], txn: Transaction, document: Mapping[str, Any], action: str
    ) -> CheckpointInfo | None:
        """Step 2 and the commit of step 3: every rank streams its files under ``txn``; the
        coordinator commits the copy (returned there; None elsewhere) or, on any failure, aborts it."""
        from .._distributed.collective import agree

        durable, rank = self.tiers.durable, self._rank
        error: BaseException | None = None
        digests: dict[str, str] = {}
        try:
            digests = {name: digest.hex() for name, digest in stream_files(info, names, durable.backend, txn.prefix).items()}
        except BaseException as exc:
            error = exc
        copy = location = None
        try:
            gathered = agree(self._group, action, error, digests, exchange=True)
            if rank == 0:
                every = {name: bytes.fromhex(digest) for each in gathered for name, digest in each.items()}
                if every.keys() != info.files.keys():
                    raise CorruptCheckpointError(
                        f"the ranks' local copies of {info.name} hold {sorted(every)}, not every file it records "
                        f"({sorted(info.files)}); were the ranks given other local_dirs than when it was saved?"
                    )
                location = commit_copy(
                    info, document, durable, txn, every, signing_key=self.signing_key, sign=self.signing_key is not None
                )
                copy = read_info(location, durable.backend)
        except BaseException as exc:
            if rank == 0 and location is None:
                durable.abort(txn)
            error = exc
        else:
            error = None
        agree(self._group, action, error)
        return copy

    def _settle(self, info: CheckpointInfo, seq: int | None, copy: CheckpointInfo | None, action: str) -> None:
        """Step 3's end: the coordinator applies the durable tier's retention; every rank marks the
        save done and prunes its copies."""
        from .._distributed.collective import agree

        error: BaseException | None = None
        try:
            if self._rank == 0 and copy is not None:
                self.tiers.on_durable(copy)
            if seq is not None:
                self.copies.journal.done(info.name, seq)
            self.copies.retain(self.keep_local)
            if self._rank == 0:
                self.tiers.retain_local()
        except BaseException as exc:
            error = exc
        agree(self._group, action, error)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
