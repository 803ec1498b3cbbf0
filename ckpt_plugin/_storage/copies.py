"""A read-only backend over files already read into private memory.

A load that verifies a signature reads every byte of the checkpoint once, into buffers that nobody
else can change, checks the signature over exactly those bytes, and then decodes them through
:class:`PrivateCopyBackend`: the read path runs as usual, but it can reach no byte that was not
verified, and no file can change between the check and the use.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping

from ..errors import CorruptCheckpointError, StorageError
from .._format.records import checksum_bytes
from .base import Backend
from .door import check_size


class PrivateCopyBackend:
    """The files of ``buffers`` (location to bytes), at the locations ``inner`` gives them; reads only.

    Any location not in ``buffers`` is missing, so a document that names a file the copy does not
    hold is reported as damage, not read from the store.
    """

    read_concurrency = 1

    def __init__(self, inner: Backend, buffers: Mapping[str, bytearray]) -> None:
        self.inner = inner
        self.root = inner.root
        self.buffers = dict(buffers)

    def __repr__(self) -> str:
        return f"PrivateCopyBackend({self.inner!r}, {len(self.buffers)} files)"

    def _buffer(self, key: str) -> bytearray:
        try:
            return self.buffers[key]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "not among the verified files", key) from None

    def join(self, base: str, *names: str) -> str:
        return self.inner.join(base, *names)

    def read_range(self, key: str, offset: int, into: memoryview) -> None:
        data = self._buffer(key)
        if offset + len(into) > len(data):
            raise CorruptCheckpointError(f"{key} ends at byte {len(data)}, before byte {offset + len(into)}")
        into[:] = memoryview(data)[offset : offset + len(into)]

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        return bytes(self.read_all(key, limit))

    def read_all(self, key: str, limit: int | None = None) -> bytearray:
        buffer = self._buffer(key)
        if limit is not None:
            check_size(key, len(buffer), limit)
        return buffer

    def size(self, key: str) -> int:
        return len(self._buffer(key))

    def list(self, prefix: str) -> Iterator[str]:
        start = self.join(prefix, "")
        return iter(sorted({key[len(start) :].split("/", 1)[0] for key in self.buffers if key.startswith(start)}))

    def fingerprint(self, key: str) -> str | None:
        data = self.buffers.get(key)
        return None if data is None else checksum_bytes(data)

    def create(self, key: str, size: int | None = None) -> object:
        raise self._read_only(key)

    def reuse(self, src: str, dst: str) -> bool:
        raise self._read_only(dst)

    def delete(self, key: str) -> None:
        raise self._read_only(key)

    def delete_tree(self, prefix: str) -> None:
        raise self._read_only(prefix)

    @staticmethod
    def _read_only(key: str) -> StorageError:
        return StorageError(errno.EROFS, f"could not write {key}: a verified copy is read-only")


__all__ = ["PrivateCopyBackend"]
