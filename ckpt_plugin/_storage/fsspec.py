"""Object stores (and anything else fsspec reaches): ``s3://``, ``gs://``, ``az://``, ``memory://``, ``file://``.

Commit without rename: the manifest protocol
--------------------------------------------
An object store has no atomic directory rename, so a checkpoint is committed by its manifest::

    s3://bucket/run/epoch_3@20260105T143000.123456789Z-9f86d081884c7d65/model.safetensors
    s3://bucket/run/epoch_3@20260105T143000.123456789Z-9f86d081884c7d65/...
    s3://bucket/run/epoch_3@20260105T143000.123456789Z-9f86d081884c7d65/metadata.json   <- written last: the commit

- Every file of a checkpoint goes under a prefix of its own, ``<name>@<transaction>``, where the
  transaction id is the UTC time the writer began (fixed width, to the nanosecond) and 64 random
  bits (:data:`~ckpt_plugin._format.names.TRANSACTION_NAME`), so ids sort by start time and never
  collide. The manifest names its transaction (``"transaction"`` in ``metadata.json``).
- ``metadata.json`` is written last, with one PUT. A prefix without it is invisible: listing shows
  only checkpoints whose manifest exists (and the manager then verifies the manifest's own checksum
  before it lists one).
- A re-save of a name writes a new prefix; once its manifest is written, the newest committed
  prefix of the name wins, and the writer deletes the older ones (manifest first, so a prefix is
  never half-deleted and visible).
- A prefix with no manifest whose newest object is older than the grace period
  (``STALE_SECONDS``, six hours) is a dead writer's leftover, removed by :meth:`ManifestStore.recover`.

Only what this module wrote is ever deleted. A name is a checkpoint prefix only when it matches
``<checkpoint name>@<transaction id>`` in full; anything else under the root (``epoch_1@manual-backup/``,
``dataset@v1/``, ``alice@example.com/``) is foreign: never listed, never deleted. A committed prefix
is deleted only when its manifest names that very transaction, so a copy of a checkpoint under
another transaction's name is left alone too. Prefixes written by release 0.2
(``epoch_3@<24 hex digits>``) are still listed and loaded; they are deleted (by retention or by a
newer save of the name) only when their manifest is a checkpoint manifest of that very name, and a
0.2 prefix without a manifest is never deleted (remove it by hand once no 0.2 writer runs).

Multipart uploads
-----------------
Every multipart upload this module starts ends completed or aborted, on every path: a failed part,
a failed completion, an error or interrupt in the caller. A request whose answer was lost is
retried by the client, so a retried ``CreateMultipartUpload`` can leave a second upload of the same
key that nobody knows the id of; once an upload is completed or aborted, every other upload still
open on its key (a key no other writer uses: it lies under the writer's own transaction) is
aborted too. Deleting a prefix aborts the uploads open under it, and :meth:`ManifestStore.recover`
aborts those a killed writer left: at once under a committed prefix, after the grace period under
an uncommitted one. An S3 lifecycle rule (``AbortIncompleteMultipartUpload``) remains a good
backstop for prefixes this module does not own (0.2 leftovers).

What this relies on: after a PUT returns, every GET and every LIST sees the new object (S3 has
been strongly consistent for read-after-write, overwrite and list since December 2020; GCS and
Azure Blob are too). A manifest that is listed is therefore readable, and so are the files it
names, which were all written before it.

Streaming and memory
--------------------
Files go up as multipart uploads in parts of ``PART_BYTES`` (32 MiB), uploaded by up to
``UPLOAD_CONCURRENCY`` threads, so a save holds at most ``PART_BYTES * (UPLOAD_CONCURRENCY + 1)``
bytes (160 MiB) of upload buffers beyond the state itself, whatever the file size, plus what the
HTTP client reads of each part at a time to sign, checksum and send it (botocore 1 MiB, aiohttp
256 KiB): ``UPLOAD_MEMORY_BYTES`` (164 MiB) in all. Each part goes to the client as a stream for
that reason: handed over as bytes, aiohttp copies a whole part once or twice more per request in
flight (a slice, and the socket's send buffer when the part does not fit the socket at once),
which took the extra peak RSS of a 400 MiB save to 206-276 MiB. Reads are
ranged GETs of up to ``READ_CHUNK_BYTES`` (256 MiB), ``READ_CONCURRENCY`` (4) in flight per file,
copied into the destination tensors as they land, so a restore holds at most 1 GiB of responses
at a time (one 256 MiB response for a file of that size or less). Few large ranges beat many
small ones: each request costs a round trip, and some servers (moto among them) pay for each
range in proportion to the whole object. Every byte read is hashed and compared with the
recorded checksum.

Errors and retries
------------------
Transient errors (throttling, 5xx, connection resets) are retried by the client with backoff:
botocore's ``adaptive`` retry mode (``max_attempts`` 10) for S3, configured through
``storage_options`` and overridable there; s3fs adds its own retries for the errors botocore does
not know. What still fails becomes a :class:`~ckpt_plugin.errors.StorageError` naming the URL and
the cause (missing bucket, bad credentials, network failure).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, CorruptCheckpointError, StorageError
from .._format import documents
from .._format.names import (
    TransactionName,
    format_transaction_id,
    is_checkpoint_name,
    parse_transaction_name,
    transaction_name,
)
from .._format.records import METADATA_FILE, FileRecord, format_checksum, new_hasher
from . import door, reach
from .base import BeforeCommit, Entry, Transaction

PART_BYTES = 32 * 1024 * 1024
UPLOAD_CONCURRENCY = 4
UPLOAD_MEMORY_BYTES = PART_BYTES * (UPLOAD_CONCURRENCY + 1) + UPLOAD_CONCURRENCY * 1024 * 1024
"""The most an upload holds beyond the state: its parts, and the chunks the client reads of those in flight."""
COPY_PART_BYTES = 512 * 1024 * 1024
SINGLE_COPY_MAX_BYTES = 5 * 1024**3
"""The largest object S3 copies in one request; larger ones are copied part by part (server-side)."""
READ_CHUNK_BYTES = 256 * 1024 * 1024
READ_CONCURRENCY = 4
STALE_SECONDS = 6 * 3600
S3_DEFAULT_OPTIONS: dict[str, Any] = {
    "config_kwargs": {"retries": {"max_attempts": 10, "mode": "adaptive"}, "connect_timeout": reach.CONNECT_TIMEOUT_SECONDS}
}


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a store by URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and "://" in location


def storage_error(exc: BaseException, action: str, url: str) -> StorageError:
    """A :class:`StorageError` for a failed request, naming the URL and the cause."""
    if isinstance(exc, StorageError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket" in lowered:
        hint = "the bucket does not exist; create it or fix the URL"
    elif any(word in lowered for word in ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch", "credentials", "forbidden", "403")):
        hint = "the credentials were refused; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage_options"
    elif any(word in lowered for word in ("slowdown", "throttl", "503", "reduce your request rate")):
        hint = "the store throttled the requests past the client's retries; save less often or raise max_attempts"
    elif any(word in lowered for word in ("connect", "timeout", "timed out", "endpoint", "network")):
        hint = "the store could not be reached; check the network and the endpoint URL"
    else:
        hint = "check the URL, the credentials and that the store is reachable"
    number = getattr(exc, "errno", None) or errno.EIO
    error = StorageError(number, f"could not {action} {url}: {text}; {hint}")
    error.filename = url
    return error


def _refuses_options(exc: BaseException) -> bool:
    """Whether building a file system or its client failed on the options it was given: an
    unexpected keyword (``TypeError``), a bad value (``ValueError``), or botocore's
    ``Invalid...Error`` for a setting it checks (retry mode, addressing style, region, ...)."""
    return isinstance(exc, (TypeError, ValueError)) or type(exc).__name__.startswith("Invalid")


def _invalid_options(exc: BaseException, url: str, given: Mapping[str, Any]) -> ConfigurationError:
    """A :class:`ConfigurationError` naming the storage option that was refused, where the error says."""
    found = re.search(r"keyword argument '([^']+)'|provided to \"([^\"]+)\"", str(exc))
    name = next((group for group in found.groups() if group), None) if found else None
    if name is None and str(exc).startswith("Invalid endpoint"):
        name = "endpoint_url"
    option = f"the option {name!r}" if name else "an option"
    listed = ", ".join(sorted(given)) or "none"
    return ConfigurationError(
        f"storage_options for {url} are invalid: the file system refused {option} ({type(exc).__name__}: {exc}); "
        f"options given: {listed}. Fix or remove it: each option must be an argument of the file system "
        "(for s3fs, S3FileSystem's; botocore settings such as retries and timeouts go in config_kwargs)"
    )


@contextlib.contextmanager
def requests(action: str, url: str, *, missing_ok: bool = False) -> Iterator[None]:
    """Turn a failed request into :func:`storage_error`; :class:`FileNotFoundError` passes through
    (or is ignored with ``missing_ok``)."""
    try:
        yield
    except FileNotFoundError:
        if not missing_ok:
            raise
    except StorageError:
        raise
    except Exception as exc:
        raise storage_error(exc, action, url) from exc


class FsspecSink:
    """A file being uploaded: hashed as it goes, sent in parts, visible only after :meth:`close`.

    On S3 the parts of a multipart upload go up on background threads while the caller produces
    the next ones; on other stores the file is written through fsspec's buffered writer. Whatever
    fails, the upload is completed or aborted before the error reaches the caller.
    """

    def __init__(self, backend: FsspecBackend, key: str) -> None:
        self.url = key
        self._backend = backend
        self._path = backend.path_of(key)
        self._hasher = new_hasher()
        self._size = 0
        self._part_bytes = PART_BYTES
        self._part = io.BytesIO()
        self._upload: MultipartUpload | None = None
        self._handle: Any = None
        self._closed = False

    def write(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        self._hasher.update(data)
        self._size += len(data)
        try:
            if self._backend.multipart:
                while data:
                    take = min(len(data), self._part_bytes - self._part.tell())
                    self._part.write(data[:take])
                    data = data[take:]
                    if self._part.tell() == self._part_bytes:  # hand the full part over, start a new one
                        if self._upload is None:
                            self._upload = MultipartUpload(self._backend, self._path)
                        self._upload.send(self._take_part())
            else:
                if self._handle is None:
                    self._handle = self._backend.fs.open(self._path, "wb", block_size=PART_BYTES)
                self._handle.write(data)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                raise storage_error(exc, "upload", self.url) from exc
            raise

    def _take_part(self) -> io.BytesIO:
        """The part filled so far, as a stream over exactly its bytes (``getvalue`` trims the buffer's
        spare room and shares it: no copy), and a new empty part in its place."""
        part, self._part = io.BytesIO(self._part.getvalue()), io.BytesIO()
        return part

    def close(self) -> FileRecord:
        try:
            if self._backend.multipart:
                if self._upload is None:
                    self._backend.fs.pipe_file(self._path, self._part.getvalue())  # no copy: the value is shared
                else:
                    if self._part.tell():
                        self._upload.send(self._take_part())
                    self._upload.complete(self._size)
            else:
                if self._handle is None:
                    self._backend.fs.pipe_file(self._path, b"")
                else:
                    self._handle.close()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                raise storage_error(exc, "upload", self.url) from exc
            raise
        self._part = io.BytesIO()
        self._closed = True
        return FileRecord(self._size, format_checksum(self._hasher))

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._part = io.BytesIO()
        try:
            if self._upload is not None:
                self._upload.abort()
            if self._handle is not None:
                discard = getattr(self._handle, "discard", None)
                if callable(discard):
                    discard()
                else:
                    self._handle.close()
                    self._backend.delete(self.url)
        except Exception:  # noqa: BLE001 - best effort; the prefix is never committed anyway
            pass


class MultipartUpload:
    """One S3 multipart upload of the key at ``path``, which ends completed or aborted.

    Parts go up on a small thread pool, at most ``UPLOAD_CONCURRENCY`` in flight (the caller blocks
    beyond that: bounded memory); a part is either bytes (:meth:`send`) or a byte range of another
    object, copied by the server (:meth:`copy`). The key must be one only this writer uses (it lies
    under the writer's own transaction): once the upload ends, every other upload left open on the
    key is aborted, for those are what a retried ``CreateMultipartUpload`` whose answer was lost
    started. The same holds when starting the upload fails.
    """

    def __init__(self, backend: FsspecBackend, path: str) -> None:
        self._backend = backend
        self._fs = backend.fs
        self._bucket, self._key, _ = self._fs.split_path(path)
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.Semaphore(UPLOAD_CONCURRENCY)
        self._pool = backend.upload_pool()
        try:
            self._id = self._fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)["UploadId"]
        except BaseException:
            self._abort_others()
            raise

    def send(self, part: io.BytesIO) -> None:
        """Upload the bytes ``part`` holds as the next part; the upload owns ``part`` from here on.

        A part goes up as a stream, read in small chunks: given as bytes, the HTTP client
        (aiohttp) would copy it whole once or twice per request in flight (a slice, and the
        socket transport's send buffer), beyond the part itself.
        """
        self._submit(self._part, part)

    def copy(self, source: str, first: int, last: int) -> None:
        """Make bytes ``first`` to ``last`` (inclusive) of the object at the path ``source`` the next part."""
        self._submit(self._copied_part, source, first, last)

    def _submit(self, work: Any, *args: Any) -> None:
        self._slots.acquire()
        number = len(self._parts) + 1
        try:
            future = self._pool.submit(work, number, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._parts.append(future)
        failed = next((f for f in self._parts if f.done() and f.exception() is not None), None)
        if failed is not None:
            failed.result()

    def _part(self, number: int, part: io.BytesIO) -> dict[str, Any]:
        try:
            part.seek(0)
            out = self._fs.call_s3(
                "upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._id, PartNumber=number, Body=part
            )
        finally:
            part.close()  # frees the part now, before its slot is given to the next one
        return {"PartNumber": number, "ETag": out["ETag"]}

    def _copied_part(self, number: int, source: str, first: int, last: int) -> dict[str, Any]:
        bucket, key, _ = self._fs.split_path(source)
        out = self._fs.call_s3(
            "upload_part_copy", Bucket=self._bucket, Key=self._key, UploadId=self._id, PartNumber=number,
            CopySource={"Bucket": bucket, "Key": key}, CopySourceRange=f"bytes={first}-{last}",
        )
        return {"PartNumber": number, "ETag": out["CopyPartResult"]["ETag"]}

    def complete(self, size: int) -> None:
        """Join the parts into the object (``size`` bytes in all); on any failure the caller aborts."""
        parts = [future.result() for future in self._parts]
        try:
            self._fs.call_s3(
                "complete_multipart_upload",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._id,
                MultipartUpload={"Parts": parts},
            )
        except Exception:
            if not self._landed(size):  # a completion whose answer was lost is retried, and refused
                raise
        else:
            # A request the file system retries itself reuses its body as it was left, so a part
            # re-sent after a failure midway would go up short: the whole must have ``size`` bytes.
            if not self._landed(size):
                raise OSError(errno.EIO, f"the completed upload of {self._bucket}/{self._key} is not {size} bytes long")
        self._abort_others()

    def _landed(self, size: int) -> bool:
        """Whether the object of this upload's key exists with ``size`` bytes (no other writer uses the key)."""
        path = f"{self._bucket}/{self._key}"
        self._fs.invalidate_cache(path)
        try:
            return int(self._fs.info(path)["size"]) == size
        except Exception:  # noqa: BLE001 - unknown: the completion stays failed
            return False

    def abort(self) -> None:
        """Give the upload up: wait for the parts in flight, then abort it (and any other on its key)."""
        for future in self._parts:
            future.cancel()
        for future in self._parts:
            if not future.cancelled():
                try:
                    future.result(timeout=60)
                except Exception:  # noqa: BLE001 - the upload is being abandoned
                    pass
        try:
            self._fs.call_s3("abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._id)
        finally:
            self._abort_others()

    def _abort_others(self) -> None:
        """Abort every upload still open on this key (best effort: recover() and the grace period
        catch what a failing store leaves)."""
        path = f"{self._bucket}/{self._key}"
        try:
            for upload in self._backend.open_uploads(self._backend.url_of(path)):
                if upload.key == path:
                    self._backend.abort_upload(upload)
        except Exception:  # noqa: BLE001 - the store is failing; the upload stays for recover()
            pass


@dataclass(frozen=True)
class OpenUpload:
    """A multipart upload that was neither completed nor aborted: its key (a path of the file
    system, ``bucket/key``), its id, and when it began (seconds since the epoch, where known)."""

    key: str
    upload_id: str
    initiated: float | None

    def entry_under(self, place: str) -> str:
        """The name directly under the path ``place`` that the upload's key lies in ("" outside it)."""
        root = place.rstrip("/") + "/"
        return self.key[len(root) :].partition("/")[0] if self.key.startswith(root) else ""


class FsspecBackend:
    """Any fsspec file system. Locations are URLs (``s3://bucket/key``)."""

    read_concurrency = READ_CONCURRENCY
    read_chunk = READ_CHUNK_BYTES

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec  # an optional dependency: the ``remote`` extra

        options = dict(storage_options or {})
        protocol = url.split("://", 1)[0]
        if protocol in ("s3", "s3a"):
            for key, value in S3_DEFAULT_OPTIONS.items():
                options.setdefault(key, value)
        elif protocol in ("file", "local"):
            options.setdefault("auto_mkdir", True)  # as an object store does, create parents on write
        try:
            for each in protocol.split("::"):  # a chained URL (simplecache::s3://...) names several
                fsspec.get_filesystem_class(each)
        except (ImportError, ValueError) as exc:
            raise StorageError(errno.EINVAL, f"cannot open {url}: {exc}; install the file system's fsspec package "
                               "(s3fs, gcsfs, adlfs) or fix the URL") from exc
        try:
            self.fs, path = fsspec.core.url_to_fs(url, **options)
            self.multipart = type(self.fs).__name__ == "S3FileSystem"
            if self.multipart:
                self.fs.connect()  # builds the client from the options now (no request), not at the first request
        except Exception as exc:
            if storage_options and _refuses_options(exc):
                raise _invalid_options(exc, url, storage_options) from exc
            raise storage_error(exc, "open", url) from exc
        self.root = url.rstrip("/")
        self._root_path = path.rstrip("/")
        self.protocol = protocol
        if self.multipart:
            reach.check_s3(type(self.fs), options, self.root, self._root_path)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FsspecBackend({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:  # sent to other ranks with a CheckpointInfo: no threads
        state = dict(self.__dict__)
        state["_pool"] = None
        del state["_pool_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()

    def upload_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY, thread_name_prefix="ckpt-upload")
            return self._pool

    def path_of(self, key: str) -> str:
        """The file system's own path for the URL ``key``."""
        return self.fs._strip_protocol(key)

    def join(self, base: str, *names: str) -> str:
        return "/".join([base.rstrip("/"), *names])

    def create(self, key: str, size: int | None = None) -> FsspecSink:
        return FsspecSink(self, key)

    def read_range(self, key: str, offset: int, into: memoryview) -> None:
        if not len(into):
            return
        with requests("read", key):
            data = self.fs.cat_file(self.path_of(key), start=offset, end=offset + len(into))
        if len(data) != len(into):
            raise CorruptCheckpointError(
                f"{key} ended early while being read; it was truncated: restore it or delete this checkpoint"
            )
        into[:] = data

    def read_scatter(self, key: str, offset: int, views: list[memoryview]) -> None:
        """Fill ``views`` from consecutive bytes of ``key`` starting at ``offset``, in one request."""
        total = sum(len(view) for view in views)
        with requests("read", key):
            data = memoryview(self.fs.cat_file(self.path_of(key), start=offset, end=offset + total))
        if len(data) != total:
            raise CorruptCheckpointError(
                f"{key} ended early while being read; it was truncated: restore it or delete this checkpoint"
            )
        position = 0
        for view in views:
            view[:] = data[position : position + len(view)]
            position += len(view)

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The object at ``key``, read through the guarded door's rule for object stores: one
        ranged GET of at most cap + 1 bytes, and a larger object refused."""
        cap = door.cap_for(key) if limit is None else limit
        with requests("read", key):
            try:
                data = self.fs.cat_file(self.path_of(key), start=0, end=cap + 1)
            except OSError as exc:
                if exc.errno != errno.EINVAL or self.size(key) != 0:
                    raise
                data = b""  # an empty object has no byte range to ask for
        door.check_size(key, len(data), cap)
        return bytes(data)

    def read_all(self, key: str, limit: int | None = None) -> Any:
        size = self.size(key)
        door.check_size(key, size, door.cap_for(key) if limit is None else limit)
        buffer = bytearray(size)
        view = memoryview(buffer)
        ranges = [(offset, view[offset : offset + READ_CHUNK_BYTES]) for offset in range(0, size, READ_CHUNK_BYTES)]
        if len(ranges) <= 1:
            for offset, part in ranges:
                self.read_range(key, offset, part)
            return buffer
        with ThreadPoolExecutor(max_workers=self.read_concurrency, thread_name_prefix="ckpt-get") as pool:
            for future in [pool.submit(self.read_range, key, offset, part) for offset, part in ranges]:
                future.result()
        return buffer

    def _info(self, key: str) -> dict[str, Any]:
        path = self.path_of(key)
        self.fs.invalidate_cache(path)
        with requests("look up", key):
            return self.fs.info(path)
        raise AssertionError("unreachable")  # pragma: no cover

    def size(self, key: str) -> int:
        return int(self._info(key)["size"])

    def list(self, prefix: str) -> Iterator[str]:
        path = self.path_of(prefix)
        self.fs.invalidate_cache(path)
        names: list[str] = []
        with requests("list", prefix, missing_ok=True):
            names = self.fs.ls(path, detail=False)
        for name in names:
            yield name.rstrip("/").rsplit("/", 1)[-1]

    def fingerprint(self, key: str) -> str | None:
        try:
            info = self._info(key)
        except FileNotFoundError:
            return None
        return _fingerprint(info)

    def reuse(self, src: str, dst: str) -> bool:
        try:
            with requests(f"copy {src} to", dst):
                if self.multipart:
                    self._copy_on_s3(self.path_of(src), self.path_of(dst))
                else:
                    self.fs.copy(self.path_of(src), self.path_of(dst))
        except FileNotFoundError:
            return False
        return True

    def _copy_on_s3(self, source: str, target: str) -> None:
        """Copy on the server: in one request up to :data:`SINGLE_COPY_MAX_BYTES`, part by part
        beyond, through a :class:`MultipartUpload` (so the upload is aborted if the copy fails)."""
        self.fs.invalidate_cache(source)
        size = int(self.fs.info(source)["size"])
        if size <= SINGLE_COPY_MAX_BYTES:
            bucket, key, _ = self.fs.split_path(source)
            target_bucket, target_key, _ = self.fs.split_path(target)
            self.fs.call_s3(
                "copy_object", Bucket=target_bucket, Key=target_key, CopySource={"Bucket": bucket, "Key": key}
            )
        else:
            upload = MultipartUpload(self, target)
            try:
                for first in range(0, size, COPY_PART_BYTES):
                    upload.copy(source, first, min(first + COPY_PART_BYTES, size) - 1)
                upload.complete(size)
            except BaseException:
                with contextlib.suppress(Exception):
                    upload.abort()
                raise
        self.fs.invalidate_cache(target)

    def delete(self, key: str) -> None:
        with requests("delete", key, missing_ok=True):
            self.fs.rm_file(self.path_of(key))

    def delete_tree(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (or the object at it), and abort the multipart
        uploads open there: what is given up is given up whole."""
        path = self.path_of(prefix).rstrip("/")
        with requests("delete", prefix, missing_ok=True):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)
        for upload in self.open_uploads(prefix):
            if upload.key == path or upload.key.startswith(f"{path}/"):
                self.abort_upload(upload)

    def open_uploads(self, prefix: str) -> list[OpenUpload]:
        """The multipart uploads open on keys that start with ``prefix`` (a URL), on S3; none elsewhere."""
        if not self.multipart:
            return []
        bucket, key, _ = self.fs.split_path(self.path_of(prefix))
        found: list[OpenUpload] = []
        page_from: dict[str, str] = {}
        while True:
            page: dict[str, Any] = {}
            with requests("list the multipart uploads under", prefix, missing_ok=True):  # no bucket: none
                page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **page_from)
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                found.append(OpenUpload(
                    f"{bucket}/{upload['Key']}", upload["UploadId"],
                    float(initiated.timestamp()) if hasattr(initiated, "timestamp") else None,
                ))
            if not page.get("IsTruncated"):
                return found
            page_from = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, upload: OpenUpload) -> None:
        """Abort ``upload`` (already ended: nothing to do)."""
        bucket, _, key = upload.key.partition("/")
        with requests("abort the multipart upload of", self.url_of(upload.key), missing_ok=True):
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)

    def walk(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix`` with its details, by its path relative to ``prefix``."""
        path = self.path_of(prefix)
        self.fs.invalidate_cache(path)
        found: dict[str, dict[str, Any]] = {}
        with requests("list", prefix, missing_ok=True):
            found = self.fs.find(path, detail=True)
        return {name[len(path) :].lstrip("/"): info for name, info in found.items()}

    def url_of(self, path: str) -> str:
        """The URL of the file system path ``path`` (inverse of :meth:`path_of`)."""
        return self.fs.unstrip_protocol(path)


def _fingerprint(info: Mapping[str, Any]) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if tag:
        return str(tag).strip('"')
    return f"{info.get('size')}:{modified_time(info)}"


def modified_time(info: Mapping[str, Any]) -> float | None:
    """The modification time of a listed object, in seconds since the epoch, where the store gives one."""
    for key in ("LastModified", "last_modified", "mtime", "created", "updated", "timeCreated"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def new_transaction_id() -> str:
    """Sortable by start time, unique: the UTC time to the nanosecond, then 16 random hex digits
    (:data:`~ckpt_plugin._format.names.TRANSACTION_NAME`)."""
    return format_transaction_id(time.time_ns(), secrets.token_hex(8))


@dataclass
class _Prefix:
    """One transaction prefix of the root, as listed: committed (its manifest exists) or not."""

    url: str
    parsed: TransactionName
    committed: bool = False
    newest: float | None = None
    fingerprint: str = ""


class ManifestStore:
    """The manifest commit over an :class:`FsspecBackend`; see the module notes."""

    summary_dir = None
    """No summary cache file: listing an object store reads every manifest's fingerprint anyway."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 backend: FsspecBackend | None = None, grace_seconds: float = STALE_SECONDS) -> None:
        self.backend = backend if backend is not None else FsspecBackend(url, storage_options)
        self.root = url.rstrip("/") if backend is not None else self.backend.root
        self.grace_seconds = grace_seconds

    def __repr__(self) -> str:
        return f"ManifestStore({self.root!r})"

    @property
    def url(self) -> str:
        return self.root

    def ensure_writable(self) -> None:
        """Nothing to create on an object store; a missing bucket fails the first upload."""

    def begin(self, name: str) -> Transaction:
        return Transaction(name, self.backend.join(self.root, transaction_name(name, new_transaction_id())))

    def commit(self, txn: Transaction, manifest: bytes, before_commit: BeforeCommit | None = None) -> str:
        if before_commit is not None:  # the manifest is not written yet: the hook is handed its bytes
            before_commit(self.backend, txn.prefix, {METADATA_FILE: manifest})
        sink = self.backend.create(self.backend.join(txn.prefix, METADATA_FILE))
        try:
            sink.write(manifest)
        except BaseException:
            sink.abort()
            raise
        sink.close()  # one PUT: the checkpoint is visible from here on
        mine = parse_transaction_name(txn.prefix.rstrip("/").rsplit("/", 1)[-1])
        for older in self._prefixes(txn.name):
            if mine is not None and older.parsed.order < mine.order:
                self._remove_if_ours(older)
        return txn.prefix

    def abort(self, txn: Transaction) -> None:
        try:
            self.backend.delete_tree(txn.prefix)
        except StorageError:
            pass  # removed later by recover() once the grace period has passed

    @staticmethod
    def _owned(entry: str) -> TransactionName | None:
        """``entry`` (a name directly under the root) as a checkpoint's transaction prefix, or None
        when it is foreign (see the module notes): never listed, never deleted."""
        parsed = parse_transaction_name(entry, legacy=True)
        return parsed if parsed is not None and is_checkpoint_name(parsed.name) else None

    def _scan(self) -> dict[str, dict[str, _Prefix]]:
        """``{checkpoint name: {prefix url: prefix}}`` of every transaction prefix under the root."""
        found: dict[str, dict[str, _Prefix]] = {}
        for relative, info in self.backend.walk(self.root).items():
            top, _, rest = relative.partition("/")
            parsed = self._owned(top)
            if parsed is None or not rest:
                continue
            url = self.backend.join(self.root, top)
            prefix = found.setdefault(parsed.name, {}).setdefault(url, _Prefix(url, parsed))
            modified = modified_time(info)
            if modified is not None and (prefix.newest is None or modified > prefix.newest):
                prefix.newest = modified
            if rest == METADATA_FILE:
                prefix.committed, prefix.fingerprint = True, _fingerprint(info)
        return found

    def _prefixes(self, name: str) -> list[_Prefix]:
        """The transaction prefixes of checkpoint ``name`` (committed or not: not looked up)."""
        found = []
        for entry in self.backend.list(self.root):
            parsed = self._owned(entry)
            if parsed is not None and parsed.name == name:
                found.append(_Prefix(self.backend.join(self.root, entry), parsed))
        return found

    def _agrees(self, prefix: _Prefix) -> bool | None:
        """Whether the manifest under ``prefix`` is the one ckpt_plugin committed there (it names
        this very transaction); None when there is no manifest (not committed)."""
        key = self.backend.join(prefix.url, METADATA_FILE)
        try:
            data = self.backend.read_bytes(key)
            return documents.names_transaction(documents.load_json(data, key), prefix.parsed)
        except FileNotFoundError:
            return None
        except CorruptCheckpointError:  # oversized or not JSON: not a manifest this module wrote
            return False

    def _newest_committed(self, prefixes: list[_Prefix]) -> _Prefix | None:
        """The newest committed prefix of one name; where there are several (a commit not yet
        cleaned up, or a copy), the newest whose manifest names its own transaction."""
        committed = sorted((prefix for prefix in prefixes if prefix.committed), key=lambda p: p.parsed.order)
        if len(committed) <= 1:
            return committed[-1] if committed else None
        return next((prefix for prefix in reversed(committed) if self._agrees(prefix)), committed[-1])

    def identity(self, location: str) -> str:
        """What changes whenever the checkpoint at ``location`` is replaced (its manifest's fingerprint)."""
        return self.backend.fingerprint(self.backend.join(location, METADATA_FILE)) or ""

    def occupant(self, name: str) -> None:
        """Nothing is ever replaced in place: a save writes a prefix of its own."""
        return None

    def committed_at(self, location: str) -> str | None:
        """``location`` when it is the newest committed prefix of its checkpoint, else None."""
        wanted = str(location).rstrip("/")
        return next((entry.location for entry in self.visible() if entry.location.rstrip("/") == wanted), None)

    def visible(self) -> Iterator[Entry]:
        for name, prefixes in self._scan().items():
            newest = self._newest_committed(list(prefixes.values()))
            if newest is not None:
                yield Entry(name, newest.url, newest.fingerprint)

    def location(self, name: str) -> str | None:
        prefixes = self._prefixes(name)
        for prefix in prefixes:
            prefix.committed = self.backend.fingerprint(self.backend.join(prefix.url, METADATA_FILE)) is not None
        newest = self._newest_committed(prefixes)
        return None if newest is None else newest.url

    def remove(self, name: str) -> None:
        """Delete the committed prefixes of checkpoint ``name`` whose manifests are ours (an
        uncommitted one may be a live writer's re-save; :meth:`recover` handles it)."""
        for prefix in self._prefixes(name):
            self._remove_if_ours(prefix)

    def _remove_if_ours(self, prefix: _Prefix) -> bool:
        """Delete ``prefix`` (manifest first, so it is never half-deleted and visible) when its
        manifest names its own transaction; True when it was deleted."""
        if not self._agrees(prefix):
            return False
        self.backend.delete(self.backend.join(prefix.url, METADATA_FILE))
        self.backend.delete_tree(prefix.url)
        return True

    def recover(self, only: str | None = None) -> None:
        """Remove prefixes superseded by a newer commit, uncommitted prefixes whose newest object
        is older than the grace period (a live writer keeps adding objects, so it is left alone),
        and the multipart uploads dead writers left under prefixes of ours. Foreign names, copies,
        and uncommitted 0.2 prefixes are never touched."""
        now = time.time()
        scanned = self._scan()
        for name, prefixes in scanned.items():
            if only is not None and name != only:
                continue
            newest = self._newest_committed(list(prefixes.values()))
            for prefix in prefixes.values():
                if prefix is newest:
                    continue
                if prefix.committed:
                    self._remove_if_ours(prefix)
                elif not prefix.parsed.legacy and _older(prefix.newest, now, self.grace_seconds):
                    self.backend.delete_tree(prefix.url)
        self._abort_dead_uploads(scanned, only, now)

    def _abort_dead_uploads(self, scanned: dict[str, dict[str, _Prefix]], only: str | None, now: float) -> None:
        """Abort uploads under our prefixes that no live writer can complete: under a committed prefix
        (its files were all complete before its manifest), or with no sign of life for longer than
        the grace period (:func:`last_sign_of_life`)."""
        root = self.backend.path_of(self.root)
        for upload in self.backend.open_uploads(self.root):
            top = upload.entry_under(root)
            parsed = parse_transaction_name(top)  # 0.2 prefixes are not ours to judge
            if parsed is None or not is_checkpoint_name(parsed.name) or (only is not None and parsed.name != only):
                continue
            prefix = scanned.get(parsed.name, {}).get(self.backend.join(self.root, top))
            if prefix is not None and prefix.committed:
                self.backend.abort_upload(upload)
            elif _older(last_sign_of_life(parsed, upload, prefix.newest if prefix else None), now, self.grace_seconds):
                self.backend.abort_upload(upload)


def _older(moment: float | None, now: float, grace_seconds: float) -> bool:
    """Whether ``moment`` (None: unknown) lies more than the grace period before ``now``."""
    return moment is not None and now - moment > grace_seconds


def remove_leftovers(
    backend: FsspecBackend,
    place: str,
    owned: Callable[[str], TransactionName | None],
    keep: Collection[str],
    grace_seconds: float,
    now: float,
) -> None:
    """Remove what writers that died left directly under ``place``: every entry whose name ``owned``
    parses (a name of the strict form its owner writes) and that is not in ``keep``, once its newest
    object is more than ``grace_seconds`` older than ``now``; and every multipart upload left open on
    such a name, once the writer's last sign of life (:func:`last_sign_of_life`) is that old, or at
    once under a kept name, whose object is complete already. Anything else is left alone."""
    newest = _newest_under(backend, place)
    for name, modified in newest.items():
        if owned(name) is not None and name not in keep and _older(modified, now, grace_seconds):
            backend.delete_tree(backend.join(place, name))
    for upload in backend.open_uploads(place):
        name = upload.entry_under(backend.path_of(place))
        parsed = owned(name)
        if parsed is None:
            continue
        if name in keep or _older(last_sign_of_life(parsed, upload, newest.get(name)), now, grace_seconds):
            backend.abort_upload(upload)


def _newest_under(backend: FsspecBackend, place: str) -> dict[str, float | None]:
    """The newest modification time (None: unknown) of every entry directly under ``place``."""
    found: dict[str, float | None] = {}
    for relative, info in backend.walk(place).items():
        top = relative.partition("/")[0]
        modified = modified_time(info)
        if top not in found or (modified is not None and (found[top] is None or modified > found[top])):
            found[top] = modified
    return found


def last_sign_of_life(transaction: TransactionName, upload: OpenUpload, newest: float | None = None) -> float:
    """The latest time a writer is known to have worked on ``upload`` of ``transaction``: when it
    began the transaction (the id says), began the upload, or last wrote an object (``newest``),
    in seconds since the epoch. Some servers report no useful upload time; the id always does."""
    times = [transaction.started_ns / 1e9, upload.initiated, newest]
    return max(t for t in times if t is not None)
