"""Write large files around the page cache (Linux ``O_DIRECT``), through two reused aligned buffers.

A buffered write copies every byte into freshly allocated page-cache pages. Where allocating a
page is expensive, as in a virtual machine whose host reclaims the guest's free and cold memory
(free page reporting, DAMON), that copy, not the disk, bounds a save and makes its time swing by
seconds. A direct write moves the bytes from user memory to the disk, so a save costs what the
disk costs. The file's bytes go through two page-aligned buffers that are reused from file to
file: the calling thread copies and hashes the next buffer while a helper thread writes the
previous one, so the copy and the hash hide behind the disk.

Durability is unchanged: the caller still fsyncs the file. Where the file system refuses direct
I/O (tmpfs on older kernels, some network and FUSE file systems), :func:`enable` returns False and
the caller writes through the page cache instead; a direct write the file system rejects midway
falls back to a buffered write of the same bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from .. import _interpreter_exit as interpreter_exit

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no direct I/O either
    fcntl = None  # type: ignore[assignment]
try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with every supported torch
    np = None  # type: ignore[assignment]

ALIGNMENT = 4096
"""Offsets, lengths and buffer addresses of direct writes are multiples of this (a page, which
covers 512-byte and 4 KiB logical blocks alike)."""
BUFFER_BYTES = 8 * 1024 * 1024
"""Bytes per buffer: one buffer is being written while the other is filled."""
MIN_FILE_BYTES = 4 * 1024 * 1024
"""Files smaller than this are written through the page cache; the buffers would not pay off."""
KEPT_BUFFER_SETS = 2
"""Buffer pairs kept for reuse between files (concurrent writers beyond this allocate their own)."""

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_lock = threading.Lock()
_spare: list[tuple[mmap.mmap, mmap.mmap]] = []


def enable(fd: int) -> bool:
    """Switch the open file ``fd`` to direct I/O; False (and ``fd`` unchanged) where unsupported."""
    if not _O_DIRECT or fcntl is None or np is None:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
    except OSError:
        return False
    return True


def _disable(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)


def _take_buffers() -> tuple[mmap.mmap, mmap.mmap]:
    with _lock:
        if _spare:
            return _spare.pop()
    # Anonymous maps are page-aligned, as direct I/O requires of the memory it reads.
    return mmap.mmap(-1, BUFFER_BYTES), mmap.mmap(-1, BUFFER_BYTES)


def _give_back(buffers: tuple[mmap.mmap, mmap.mmap]) -> None:
    with _lock:
        if len(_spare) < KEPT_BUFFER_SETS:
            _spare.append(buffers)
            return
    for buffer in buffers:
        try:
            buffer.close()
        except BufferError:  # pragma: no cover - a view still held; freed with it instead
            pass


def _forget_buffers() -> None:
    """A forked child starts with no buffers of its own to share."""
    global _lock
    _lock = threading.Lock()
    _spare.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_buffers)


class DirectSink:
    """Writes a new file's bytes in order with direct I/O, hashing them on the way.

    ``fd`` must be open for writing at offset 0 with direct I/O enabled (see :func:`enable`).
    ``write`` takes the bytes in order; leaving the ``with`` block writes the rest and cuts the file
    to the exact length written (a direct write covers whole blocks). The caller fsyncs afterwards.
    """

    def __init__(self, fd: int, hasher: object) -> None:
        self._fd = fd
        self._hasher = hasher
        self._buffers = _take_buffers()
        self._arrays = [np.frombuffer(buffer, dtype=np.uint8) for buffer in self._buffers]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._current = 0
        self._filled = 0
        self._offset = 0  # file offset of the current buffer's first byte
        self._direct = True
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-write")
        self._pending: Future[None] | None = None

    def __enter__(self) -> DirectSink:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._release()

    def write(self, chunk: memoryview) -> None:
        """Append ``chunk`` (a flat byte view) to the file."""
        source = np.frombuffer(chunk, dtype=np.uint8)
        while source.size:
            target = self._arrays[self._current]
            count = min(BUFFER_BYTES - self._filled, source.size)
            np.copyto(target[self._filled : self._filled + count], source[:count])
            self._hasher.update(self._views[self._current][self._filled : self._filled + count])  # type: ignore[attr-defined]
            self._filled += count
            source = source[count:]
            if self._filled == BUFFER_BYTES:
                self._submit(BUFFER_BYTES)

    def _submit(self, length: int) -> None:
        """Hand the current buffer's first ``length`` bytes to the writer thread; fill the other one."""
        self._wait()
        self._pending = interpreter_exit.submit(self._pool, self._write_at, self._views[self._current][:length], self._offset)
        self._offset += self._filled
        self._current ^= 1
        self._filled = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _finish(self) -> None:
        size = self._offset + self._filled
        if self._filled:
            padded = -(-self._filled // ALIGNMENT) * ALIGNMENT
            self._arrays[self._current][self._filled : padded] = 0
            self._submit(padded)
        self._wait()
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)

    def _write_at(self, data: memoryview, offset: int) -> None:
        while data:
            try:
                written = os.pwrite(self._fd, data, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                # The file system takes direct I/O but not these offsets or sizes: write through
                # the page cache from here on.
                _disable(self._fd)
                self._direct = False
                continue
            if written == 0:  # pragma: no cover - a regular file never accepts nothing
                raise OSError(errno.EIO, "the file system accepted no bytes")
            data = data[written:]
            offset += written

    def _release(self) -> None:
        try:
            self._pool.shutdown(wait=True)
        finally:
            self._arrays.clear()
            for view in self._views:
                view.release()
            self._views.clear()
            _give_back(self._buffers)
