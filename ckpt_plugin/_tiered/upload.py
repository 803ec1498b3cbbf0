"""One upload: a checkpoint committed in ``local_dir`` copied into the durable tier, committed there
manifest-last.

Every file the local ``metadata.json`` records is streamed through the durable backend's
:class:`~ckpt_plugin.storage.base.Sink` (a multipart upload on an object store) with bounded
memory, and the record the sink returns (size and checksum of the bytes it was given) must equal
the recorded one, so a damaged local copy is never made durable. Then ``metadata.json`` commits the
copy: the local manifest with the durable transaction named in it and its own checksum renewed
(see :func:`durable_manifest`). A signed checkpoint is signed again over the durable copy before
the commit, since its signature covers ``metadata.json``. Until the commit nothing of the copy is
visible; a failed upload aborts its transaction, and a writer killed mid-upload leaves an
uncommitted prefix that the durable store's recovery removes.

Uploads are idempotent: :func:`durable_copy` finds a durable copy of the same save (the same
file records, epoch, step and metrics), and the uploader then skips the upload.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigurationError, CorruptCheckpointError
from .._format import codec
from .._format.layout import METADATA_CHECKSUM_KEY, SIGNATURE_FILE, metadata_checksum
from .._format.records import METADATA_FILE, FileRecord
from .._io.files import check, hash_file, read_json
from .._io.info import CheckpointInfo, parse_metadata
from .._io.reader import read_info
from .._storage import Backend, Commit, Transaction


def upload(local: CheckpointInfo, durable: Commit, *, signing_key: str | os.PathLike[str] | None = None) -> CheckpointInfo:
    """Copy the committed local checkpoint ``local`` into ``durable`` and commit it there; return the
    durable copy's record. Raises :class:`CorruptCheckpointError` naming the local file when a file
    does not match its record (nothing is committed then), and whatever the durable store raises."""
    document = local_manifest(local, signing_key)
    durable.ensure_writable()
    txn = durable.begin(local.name)
    try:
        digests = stream_files(local, sorted(local.files), durable.backend, txn.prefix)
        location = commit_copy(local, document, durable, txn, digests, signing_key=signing_key)
    except BaseException:
        durable.abort(txn)
        raise
    return read_info(location, durable.backend)


def local_manifest(local: CheckpointInfo, signing_key: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The ``metadata.json`` of the local copy ``local``, once it is the one ``local`` was read
    from and, when the copy is signed, a ``signing_key`` is at hand to sign its durable copy."""
    document = read_json(local.file(METADATA_FILE), backend=local.backend)
    if parse_metadata(local.location, document, local.backend).files != local.files:
        raise CorruptCheckpointError(f"{local.location} was replaced while it was being uploaded; upload it again")
    if is_signed(local) and signing_key is None:
        raise ConfigurationError(
            f"{local.location} is signed, and its durable copy must be signed again (its signature covers "
            "metadata.json, which names the durable transaction); pass the signing_key it was saved with"
        )
    return document


def is_signed(local: CheckpointInfo) -> bool:
    """Whether the local copy ``local`` carries a signature."""
    return local.backend.fingerprint(local.file(SIGNATURE_FILE)) is not None


def stream_files(local: CheckpointInfo, names: Iterable[str], target: Backend, prefix: str) -> dict[str, bytes]:
    """Stream the files ``names`` of ``local`` under ``prefix`` on ``target``, each checked against
    its record; return their SHA-256 digests by name."""
    return {
        name: stream_file(local.file(name), _under(target, prefix, name), local.files[name], source=local.backend, target=target)
        for name in names
    }


def commit_copy(
    local: CheckpointInfo,
    document: Mapping[str, Any],
    durable: Commit,
    txn: Transaction,
    digests: Mapping[str, bytes],
    *,
    signing_key: str | os.PathLike[str] | None,
    sign: bool | None = None,
) -> str:
    """Commit the durable copy of ``local`` whose files (with ``digests``) are under ``txn``:
    signed when ``sign`` says so (by default: again when ``local`` is), then its manifest written
    last. Returns its location."""
    manifest = durable_manifest(document, txn.id)
    if is_signed(local) if sign is None else sign:
        _sign(durable.backend, txn.prefix, {**digests, METADATA_FILE: hashlib.sha256(manifest).digest()}, signing_key)
    return durable.commit(txn, manifest)


def stream_file(source_key: str, target_key: str, record: FileRecord, *, source: Backend, target: Backend) -> bytes:
    """Stream the file ``source_key`` into a new file ``target_key`` on ``target``, checking the bytes
    against ``record`` as they pass; on a mismatch nothing stays at ``target_key``. Returns the
    SHA-256 digest of the bytes (for a signature). Memory stays bounded by the read-ahead buffers
    of :func:`~ckpt_plugin._io.files.hash_file`."""
    sink = target.create(target_key, record.size)
    feed = _Feed(sink)
    try:
        size = hash_file(source_key, feed, backend=source)
    except BaseException:
        sink.abort()
        raise
    written = sink.close()
    try:
        check(source_key, record, size, written.checksum)
    except CorruptCheckpointError:
        target.delete(target_key)
        raise
    return feed.sha256.digest()


class _Feed:
    """Passes every chunk ``hash_file`` reads on to a sink, in file order, and hashes it (SHA-256)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()

    def update(self, data: memoryview) -> None:
        self.sink.write(data)
        self.sha256.update(data)


def _sign(backend: Backend, prefix: str, digests: dict[str, bytes], signing_key: Any) -> None:
    """Sign the durable copy from the digests taken while it was written (nothing is read back)."""
    from ..signing import sign_digests  # the signing extra loads on first use

    sign_digests(backend, prefix, digests, signing_key)


def _under(backend: Backend, prefix: str, name: str) -> str:
    return backend.join(prefix, *name.split("/"))


def durable_manifest(document: Mapping[str, Any], transaction: str | None) -> bytes:
    """The ``metadata.json`` of a durable copy: ``document`` (the local one) naming ``transaction``,
    its checksum computed again. Every other key, the file records included, is unchanged."""
    copy = {key: value for key, value in document.items() if key not in ("transaction", METADATA_CHECKSUM_KEY)}
    if transaction is not None:
        copy["transaction"] = transaction
    copy[METADATA_CHECKSUM_KEY] = metadata_checksum(copy)
    return codec.dumps(copy)


def durable_copy(local: CheckpointInfo, durable: Commit) -> CheckpointInfo | None:
    """The committed durable copy of the save ``local`` (same name, file records, epoch, step and
    metrics), or None when the durable tier holds none (or another save of that name)."""
    location = durable.location(local.name)
    if location is None:
        return None
    try:
        found = read_info(location, durable.backend)
    except (CorruptCheckpointError, FileNotFoundError):
        return None
    same = (found.files, found.epoch, found.step, found.metrics) == (local.files, local.epoch, local.step, local.metrics)
    return found if same else None
