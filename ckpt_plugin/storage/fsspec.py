"""Object stores (and anything else fsspec reaches): ``s3://``, ``gs://``, ``az://``, ``memory://``, ``file://``.

Commit without rename: the manifest protocol
--------------------------------------------
An object store has no atomic directory rename, so a checkpoint is committed by its manifest::

    s3://bucket/run/epoch_3@0187a3c5e1f2a4b0c9d2e1f0/model.safetensors
    s3://bucket/run/epoch_3@0187a3c5e1f2a4b0c9d2e1f0/...
    s3://bucket/run/epoch_3@0187a3c5e1f2a4b0c9d2e1f0/metadata.json     <- written last: the commit

- Every file of a checkpoint goes under a prefix of its own, ``<name>@<transaction>``, where the
  transaction id starts with the writer's clock in nanoseconds (hex, fixed width) and ends with
  random bits, so ids sort by start time and never collide.
- ``metadata.json`` is written last, with one PUT. A prefix without it is invisible: listing shows
  only checkpoints whose manifest exists (and the manager then verifies the manifest's own checksum
  before it lists one).
- A re-save of a name writes a new prefix; once its manifest is written, the newest committed
  prefix of the name wins, and the writer deletes the older ones (manifest first, so a prefix is
  never half-deleted and visible).
- A prefix with no manifest whose newest object is older than the grace period
  (``STALE_SECONDS``, six hours) is a dead writer's leftover, removed by :meth:`ManifestStore.recover`.
  Multipart uploads a killed writer left open hold no visible object at all; an S3 lifecycle rule
  (``AbortIncompleteMultipartUpload``) reclaims their space. A live writer leaves none: when the
  client sent ``create_multipart_upload`` again after losing its answer, the writer also aborts
  the upload it never learned of, once its file is complete.

What this relies on: after a PUT returns, every GET and every LIST sees the new object (S3 has
been strongly consistent for read-after-write, overwrite and list since December 2020; GCS and
Azure Blob are too). A manifest that is listed is therefore readable, and so are the files it
names, which were all written before it.

Streaming and memory
--------------------
Files go up as multipart uploads in parts of ``PART_BYTES`` (32 MiB), uploaded by up to
``UPLOAD_CONCURRENCY`` threads, so a save holds at most ``PART_BYTES * (UPLOAD_CONCURRENCY + 1)``
bytes (160 MiB) of upload buffers beyond the state itself, whatever the file size. Reads are
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
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import ConfigurationError, CorruptCheckpointError, StorageError
from . import door, reach
from .base import METADATA_FILE, Entry, FileRecord, Transaction, format_checksum, new_hasher

PART_BYTES = 32 * 1024 * 1024
UPLOAD_CONCURRENCY = 4
READ_CHUNK_BYTES = 256 * 1024 * 1024
READ_CONCURRENCY = 4
STALE_SECONDS = 6 * 3600
TXN_SEPARATOR = "@"
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
    the next ones; on other stores the file is written through fsspec's buffered writer.
    """

    def __init__(self, backend: FsspecBackend, key: str) -> None:
        self.url = key
        self._backend = backend
        self._path = backend.path_of(key)
        self._hasher = new_hasher()
        self._size = 0
        self._part_bytes = PART_BYTES
        self._buffer = bytearray(self._part_bytes if backend.multipart else 0)
        self._fill = 0
        self._upload: _MultipartUpload | None = None
        self._handle: Any = None
        self._closed = False

    def write(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        self._hasher.update(data)
        self._size += len(data)
        try:
            if self._backend.multipart:
                while data:
                    take = min(len(data), self._part_bytes - self._fill)
                    self._buffer[self._fill : self._fill + take] = data[:take]
                    self._fill += take
                    data = data[take:]
                    if self._fill == self._part_bytes:  # hand the full part over, start a new one
                        if self._upload is None:
                            self._upload = _MultipartUpload(self._backend, self._path)
                        self._upload.send(self._buffer)
                        self._buffer, self._fill = bytearray(self._part_bytes), 0
            else:
                if self._handle is None:
                    self._handle = self._backend.fs.open(self._path, "wb", block_size=PART_BYTES)
                self._handle.write(data)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                raise storage_error(exc, "upload", self.url) from exc
            raise

    def close(self) -> FileRecord:
        try:
            if self._backend.multipart:
                rest = bytes(memoryview(self._buffer)[: self._fill])
                if self._upload is None:
                    self._backend.fs.pipe_file(self._path, rest)
                else:
                    if rest:
                        self._upload.send(rest)
                    self._upload.complete()
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
        self._buffer = bytearray()
        self._closed = True
        return FileRecord(self._size, format_checksum(self._hasher))

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer = bytearray()
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


class _MultipartUpload:
    """An S3 multipart upload whose parts go up on a small thread pool, at most
    ``UPLOAD_CONCURRENCY`` in flight (the caller blocks beyond that: bounded memory)."""

    def __init__(self, backend: FsspecBackend, path: str) -> None:
        self._fs = backend.fs
        self._bucket, self._key, _ = self._fs.split_path(path)
        self._id = self._fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)["UploadId"]
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.Semaphore(UPLOAD_CONCURRENCY)
        self._pool = backend.upload_pool()

    def send(self, data: bytes | bytearray) -> None:
        self._slots.acquire()
        number = len(self._parts) + 1
        try:
            future = self._pool.submit(self._part, number, data)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._parts.append(future)
        failed = next((f for f in self._parts if f.done() and f.exception() is not None), None)
        if failed is not None:
            failed.result()

    def _part(self, number: int, data: bytes | bytearray) -> dict[str, Any]:
        out = self._fs.call_s3(
            "upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": out["ETag"]}

    def complete(self) -> None:
        parts = [future.result() for future in self._parts]
        self._fs.call_s3(
            "complete_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._id,
            MultipartUpload={"Parts": parts},
        )
        self._abort_strays()

    def abort(self) -> None:
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
            self._abort_strays()

    def _abort_strays(self) -> None:
        """Abort every other upload open at this key. The client sends ``create_multipart_upload``
        again when its answer is lost (a connection reset after the server acted), and the upload
        the first one started has an id this writer never learned. The key is under this writer's
        own transaction prefix, so no other writer uploads to it. Best effort: what is left is
        reclaimed by the bucket's lifecycle rule."""
        try:
            listed = self._fs.call_s3("list_multipart_uploads", Bucket=self._bucket, Prefix=self._key)
            for upload in listed.get("Uploads", []):
                if upload.get("Key") == self._key and upload.get("UploadId") != self._id:
                    self._fs.call_s3("abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload["UploadId"])
        except Exception:  # noqa: BLE001 - the file itself is complete (or abandoned) either way
            pass


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
                self.fs.copy(self.path_of(src), self.path_of(dst))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        with requests("delete", key, missing_ok=True):
            self.fs.rm_file(self.path_of(key))

    def delete_tree(self, prefix: str) -> None:
        path = self.path_of(prefix)
        with requests("delete", prefix, missing_ok=True):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)

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
    """Sortable by start time, unique: 16 hex digits of nanoseconds, then 8 random ones."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


class ManifestStore:
    """The manifest commit over an :class:`FsspecBackend`; see the module notes."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 backend: FsspecBackend | None = None, grace_seconds: float = STALE_SECONDS) -> None:
        self.backend = backend if backend is not None else FsspecBackend(url, storage_options)
        self.root = self.backend.root
        self.grace_seconds = grace_seconds

    def __repr__(self) -> str:
        return f"ManifestStore({self.root!r})"

    @property
    def url(self) -> str:
        return self.root

    def ensure_writable(self) -> None:
        """Nothing to create on an object store; a missing bucket fails the first upload."""

    def begin(self, name: str) -> Transaction:
        return Transaction(name, self.backend.join(self.root, f"{name}{TXN_SEPARATOR}{new_transaction_id()}"))

    def commit(self, txn: Transaction, manifest: bytes) -> str:
        sink = self.backend.create(self.backend.join(txn.prefix, METADATA_FILE))
        try:
            sink.write(manifest)
        except BaseException:
            sink.abort()
            raise
        sink.close()  # one PUT: the checkpoint is visible from here on
        for older in self._prefixes(txn.name):
            if older != txn.prefix and older < txn.prefix:
                self._remove_prefix(older)
        return txn.prefix

    def abort(self, txn: Transaction) -> None:
        try:
            self.backend.delete_tree(txn.prefix)
        except StorageError:
            pass  # removed later by recover() once the grace period has passed

    def _scan(self) -> dict[str, dict[str, tuple[bool, float | None, str]]]:
        """``{name: {prefix: (committed, newest modification, manifest fingerprint)}}``."""
        found: dict[str, dict[str, tuple[bool, float | None, str]]] = {}
        for relative, info in self.backend.walk(self.root).items():
            top, _, rest = relative.partition("/")
            name, separator, _ = top.rpartition(TXN_SEPARATOR)
            if not separator or not name or not rest:
                continue
            prefix = self.backend.join(self.root, top)
            committed, newest, fingerprint = found.setdefault(name, {}).get(prefix, (False, None, ""))
            modified = modified_time(info)
            if modified is not None and (newest is None or modified > newest):
                newest = modified
            if rest == METADATA_FILE:
                committed, fingerprint = True, _fingerprint(info)
            found[name][prefix] = (committed, newest, fingerprint)
        return found

    def _prefixes(self, name: str) -> list[str]:
        return [
            self.backend.join(self.root, entry)
            for entry in self.backend.list(self.root)
            if entry.rpartition(TXN_SEPARATOR)[0] == name
        ]

    def visible(self) -> Iterator[Entry]:
        for name, prefixes in self._scan().items():
            committed = sorted(prefix for prefix, (done, _, _) in prefixes.items() if done)
            if committed:
                yield Entry(name, committed[-1], prefixes[committed[-1]][2])

    def location(self, name: str) -> str | None:
        committed = sorted(
            prefix for prefix in self._prefixes(name) if self.backend.fingerprint(self.backend.join(prefix, METADATA_FILE))
        )
        return committed[-1] if committed else None

    def remove(self, name: str) -> None:
        for prefix in self._prefixes(name):
            self._remove_prefix(prefix)

    def _remove_prefix(self, prefix: str) -> None:
        self.backend.delete(self.backend.join(prefix, METADATA_FILE))
        self.backend.delete_tree(prefix)

    def recover(self, only: str | None = None) -> None:
        """Remove prefixes superseded by a newer commit, and uncommitted prefixes whose newest object
        is older than the grace period (a live writer keeps adding objects, so it is left alone)."""
        now = time.time()
        for name, prefixes in self._scan().items():
            if only is not None and name != only:
                continue
            committed = sorted(prefix for prefix, (done, _, _) in prefixes.items() if done)
            for prefix, (done, newest, _) in prefixes.items():
                if done and prefix != committed[-1]:
                    self._remove_prefix(prefix)
                elif not done and newest is not None and now - newest > self.grace_seconds:
                    self.backend.delete_tree(prefix)
