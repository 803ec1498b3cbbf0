"""The guarded door: the one way the bytes of a file in a checkpoint tree are opened and read.

A checkpoint may come from anyone, so what sits at a file's name may be anything: a symbolic link
to a file outside the run or to ``/dev/zero``, a FIFO that never delivers a byte, a directory, or a
file far larger than its kind ever is. The backends read through here, so every reader of the
package (listing, loading, the registry, the save log, ``ckpt plot``, the CLI) gets the same rules:

- Locally the file is opened with ``O_NOFOLLOW`` (a link as the file itself is refused; hard
  links, which incremental saves make, are ordinary files) and ``O_NONBLOCK`` (so opening a FIFO
  never waits for a writer), and it must be a regular file by ``fstat``.
- The cap of the document's kind (:mod:`ckpt_plugin._format.limits`) is checked against the size
  before reading, and no more than the cap is ever read, even from a file that grows meanwhile.
  On an object store at most cap + 1 bytes are requested (one ranged GET).

Refusals are :class:`~ckpt_plugin.errors.CorruptCheckpointError` naming the file, so a listing
skips a damaged sibling with a warning, as it skips any other unreadable one.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from typing import Any

from ..errors import CorruptCheckpointError
from .._format.limits import cap_for

_GUARDS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | _GUARDS
_LOG_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | _GUARDS
_READ_STEP = 1024 * 1024

__all__ = ["cap_for", "check_size", "map_file", "open_file", "open_log", "read_file"]


def open_file(path: str) -> tuple[int, int]:
    """Open the regular file ``path`` for reading without following a link at its name; return the
    descriptor and the file's size. :class:`FileNotFoundError` when nothing is there,
    :class:`CorruptCheckpointError` for a link or anything but a regular file, another
    :class:`OSError` for a failure of the file system."""
    return _open_regular(path, _READ_FLAGS)


def open_log(path: str) -> int:
    """Open (creating it if missing) the regular file ``path`` to append to it and read its end,
    under the rules of :func:`open_file`: a log is never written through a link, into a FIFO or
    into a device."""
    return _open_regular(path, _LOG_FLAGS)[0]


def _open_regular(path: str, flags: int) -> tuple[int, int]:
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link(path) from None
        if exc.errno == errno.ENXIO:  # a socket, or a device with nothing behind it
            raise _not_regular(path, "socket or device") from None
        raise
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise _not_regular(path, _kind(status.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, status.st_size


def read_file(path: str, cap: int | None = None) -> bytes:
    """The whole regular file ``path``, which may have at most ``cap`` bytes (by default its kind's)."""
    cap = cap_for(path) if cap is None else cap
    fd, size = open_file(path)
    try:
        check_size(path, size, cap)
        return _read_capped(fd, path, size, cap)
    finally:
        os.close(fd)


def map_file(path: str, cap: int | None = None) -> Any:
    """The regular file ``path`` as a private, copy-on-write memory map (a ``bytearray`` when it is
    empty); it may have at most ``cap`` bytes (by default its kind's)."""
    cap = cap_for(path) if cap is None else cap
    fd, size = open_file(path)
    try:
        check_size(path, size, cap)
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else bytearray()
    finally:
        os.close(fd)


def check_size(location: str, size: int, cap: int) -> None:
    """Refuse ``location`` when its ``size`` exceeds ``cap``."""
    if size > cap:
        name = location.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        raise CorruptCheckpointError(
            f"{location} has {size} bytes or more, over the {cap} a file named {name!r} may have; it is damaged "
            "or was not written by ckpt_plugin: delete it (or the checkpoint holding it)"
        )


def _read_capped(fd: int, path: str, size: int, cap: int) -> bytes:
    """Read ``fd`` to its end, refusing it as soon as more than ``cap`` bytes arrive."""
    parts: list[bytes] = []
    total = 0
    while True:
        wanted = min(cap + 1 - total, max(size + 1 - total, _READ_STEP))
        part = os.read(fd, wanted)
        if not part:
            return b"".join(parts)
        total += len(part)
        check_size(path, total, cap)
        parts.append(part)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _link(path: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} is a symbolic link; links in a checkpoint are never followed, so nothing outside it is read: "
        "replace the link with the file itself, or delete the checkpoint holding it"
    )


def _not_regular(path: str, kind: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} is a {kind}, not a regular file; only regular files are read from a checkpoint: "
        "remove it, or delete the checkpoint holding it"
    )
