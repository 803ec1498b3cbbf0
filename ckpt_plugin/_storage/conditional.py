"""Compare-and-swap on one object: what replaces a file lock where there is no file system.

An object store cannot lock, but S3 (since 2024) accepts conditional writes: a PUT with
``If-None-Match: *`` succeeds only when the key does not exist, and one with ``If-Match: <ETag>``
only when the object is still the one the writer read. Two writers that read the same state and
both try to replace it therefore cannot both succeed: the second gets ``412 Precondition Failed``,
reads the new state and decides again. That is all the registry needs on an object store:

- claiming a version name (create-if-absent), so a validated version is written once, and
- switching the production pointer (replace-if-unchanged), so concurrent promotions serialize.

A request whose answer is lost on the network is retried by the client, and the retry of a
conditional write that took effect is refused (the object changed: by that very write). So a
refusal is checked by reading the object back: when it holds exactly the bytes being written, the
write took effect. Every document written here is unique (a claim names a prefix with a random
transaction id, a pointer its own weights, an event its time and content), so equal bytes can only
come from this write.

Supported here: ``s3://`` (through s3fs and botocore) and ``memory://`` (one process, under a
lock). Other stores raise :class:`~ckpt_plugin.errors.ConfigurationError` naming what works.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from .._format.records import checksum_bytes
from .door import cap_for, check_size
from .fsspec import FsspecBackend, requests

SUPPORTED = ("s3", "s3a", "memory")


class WriteConflict(Exception):
    """A conditional write found the object changed (or present) since it was read."""


@dataclass(frozen=True)
class Versioned:
    """The bytes of an object together with the tag that identifies exactly this version of it."""

    data: bytes
    tag: str


def supports(backend: Any) -> bool:
    """Whether ``backend`` can do conditional writes."""
    return isinstance(backend, FsspecBackend) and backend.protocol in SUPPORTED


def require(backend: Any, what: str) -> None:
    """Raise :class:`ConfigurationError` naming ``what`` needs conditional writes, unless ``backend`` has them."""
    if not supports(backend):
        raise ConfigurationError(
            f"{what} on {backend.root} needs conditional writes, which this release implements for s3:// "
            "(and memory://); keep the registry on S3 or on a local directory"
        )


def read(backend: FsspecBackend, key: str) -> Versioned | None:
    """The object at ``key`` with its tag, or None when there is none."""
    require(backend, "a conditional read")
    if backend.protocol == "memory":
        with _MEMORY_LOCK:
            data = _memory_bytes(backend, key)
        return None if data is None else Versioned(data, checksum_bytes(data))
    from fsspec.asyn import sync

    bucket, name, _ = backend.fs.split_path(backend.path_of(key))
    try:
        with requests("read", key):
            data, tag = sync(backend.fs.loop, _s3_get, backend.fs, bucket, name, cap_for(key))
    except FileNotFoundError:
        return None
    check_size(key, len(data), cap_for(key))
    return Versioned(data, tag)


def write(backend: FsspecBackend, key: str, data: bytes, expected: Versioned | None) -> None:
    """Write ``data`` at ``key`` if the object there is still ``expected`` (absent when None).

    Raises :class:`WriteConflict` when another writer got there first, and
    :class:`~ckpt_plugin.errors.StorageError` for a failure of the store. A write refused because
    it had already taken effect (the client sent it again after losing its answer) succeeds.
    """
    require(backend, "a conditional write")
    if backend.protocol == "memory":
        with _MEMORY_LOCK:
            current = _memory_bytes(backend, key)
            if (None if current is None else checksum_bytes(current)) != (None if expected is None else expected.tag):
                raise WriteConflict(key)
            backend.fs.pipe_file(backend.path_of(key), data)
        return
    bucket, name, _ = backend.fs.split_path(backend.path_of(key))
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected.tag}
    try:
        with requests("write", key):
            backend.fs.call_s3("put_object", Bucket=bucket, Key=name, Body=data, **condition)
    except (FileExistsError, OSError) as exc:
        if not _precondition_failed(exc):
            raise
        backend.fs.invalidate_cache(backend.path_of(key))
        current = read(backend, key)
        if current is None or current.data != data:
            raise WriteConflict(key) from None
        # else: this write took effect, and a retry after its answer was lost was refused
    finally:
        backend.fs.invalidate_cache(backend.path_of(key))


_MEMORY_LOCK = threading.Lock()


def _memory_bytes(backend: FsspecBackend, key: str) -> bytes | None:
    try:
        return backend.read_bytes(key)
    except FileNotFoundError:
        return None


async def _s3_get(fs: Any, bucket: str, name: str, cap: int) -> tuple[bytes, str]:
    """The object and its ETag, of which at most ``cap`` + 1 bytes are read (the guarded door's rule)."""
    response = await fs._call_s3("get_object", Bucket=bucket, Key=name)
    body = response["Body"]
    parts: list[bytes] = []
    received = 0
    try:
        while received <= cap:  # a read returns what has arrived, up to the amount asked
            part = await body.read(cap + 1 - received)
            if not part:
                break
            parts.append(part)
            received += len(part)
    finally:
        body.close()
    return b"".join(parts), response["ETag"]


def _precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is S3's 412, or the 409 it gives two racing conditional writes."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


__all__ = ["SUPPORTED", "Versioned", "WriteConflict", "read", "require", "supports", "write"]
