"""Everything that touches the file system: atomic commits, listing, checksums, deletion.

A checkpoint is a directory. It is written under a hidden staging name in the same parent, every
file is fsynced, and the directory is renamed into place, then the parent is fsynced. Readers
list only visible names, so they see whole checkpoints or nothing. Replacing an existing
checkpoint swaps the two directories in one ``renameat2(RENAME_EXCHANGE)`` where the kernel has it;
elsewhere the old one is first renamed aside and put back by :meth:`LocalStore.recover` if the
process dies in between. Deletion renames the directory aside before removing its files (in the
background, see :mod:`ckpt_plugin._storage.trash`), so a half-deleted checkpoint is never visible either.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from .. import _interpreter_exit as interpreter_exit
from ..errors import CorruptCheckpointError, StorageError
from .._format.names import FILE_NAME_PATTERN
from .._format.records import METADATA_FILE, FileRecord, format_checksum, new_hasher
from . import directio, door, trash
from .base import BeforeCommit, Entry, Transaction

CHUNK_BYTES = 16 * 1024 * 1024
PARALLEL_HASH_BYTES = 1024 * 1024
STAGING_PREFIX = ".tmp."
TRASH_PREFIX = ".trash."
REPLACED_PREFIX = ".replaced."
STALE_STAGING_SECONDS = 6 * 3600
PROBE_TAIL = "probe"
"""The tail of the staging name :meth:`LocalStore.ensure_writable` creates and removes at once."""
_HOST_TAG = format(zlib.crc32(socket.gethostname().encode()), "08x")


def temporary_path(path: Path) -> Path:
    """A hidden name beside ``path`` for something this process writes before it takes ``path``'s
    place (a staging directory, a file published by :func:`publish_made`, a probe).

    The name is unmistakable (``.tmp.<host>.<pid>.<random>.<name>``) and records its writer, so
    :meth:`LocalStore.recover` removes it, and only it, once that writer is dead.
    """
    return path.parent / f"{STAGING_PREFIX}{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{path.name.lstrip('.')}"


def _storage_error(exc: OSError, action: str, path: Path | str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "the disk is full (or a size quota was hit); free space or choose another checkpoint_dir"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the directory is not writable; fix its permissions or choose another checkpoint_dir"
    else:
        hint = "check that the path exists, is a directory and is writable"
    error = StorageError(exc.errno, f"could not {action} {path}: {exc.strerror or exc}; {hint}")
    error.filename = str(path)
    return error


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalSink:
    """A new local file being written: hashed as it grows, fsynced on :meth:`close`.

    A large file (its size known up front) is written with direct I/O where the file system allows
    it (see :mod:`ckpt_plugin._storage.directio`): the bytes go from memory to the disk without allocating
    page cache for them, through two reused buffers. Otherwise each large chunk is hashed on a
    helper thread while the calling thread writes it (both release the GIL), and writeback to the
    disk is started as the file grows, so the final fsync has little left to wait for. Either way
    no extra memory is held but the direct-I/O buffers.
    """

    def __init__(self, path: str, size: int | None = None) -> None:
        self.path = path
        self._hasher = new_hasher()
        self._pool: ThreadPoolExecutor | None = None
        self._offset = 0
        self._flushed = 0
        self._direct: directio.DirectSink | None = None
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise _storage_error(exc, "write", path) from exc
        if size is not None and size >= directio.MIN_FILE_BYTES and directio.enable(self._fd):
            self._direct = directio.DirectSink(self._fd, self._hasher)

    def write(self, chunk: memoryview | bytes) -> None:
        assert self._fd is not None, "write after close"
        chunk = memoryview(chunk)
        try:
            if self._direct is not None:
                self._direct.write(chunk)
                self._offset += len(chunk)
                return
            if len(chunk) < PARALLEL_HASH_BYTES:
                self._hasher.update(chunk)
                _write_all(self._fd, chunk)
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash")
                hashed = interpreter_exit.submit(self._pool, self._hasher.update, chunk)
                try:
                    _write_all(self._fd, chunk)
                finally:
                    hashed.result()
        except OSError as exc:
            raise _storage_error(exc, "write", self.path) from exc
        self._offset += len(chunk)
        if self._offset - self._flushed >= CHUNK_BYTES:
            start_writeback(self._fd, self._flushed, self._offset - self._flushed)
            self._flushed = self._offset

    def close(self) -> FileRecord:
        assert self._fd is not None, "close after close"
        try:
            if self._direct is not None:
                direct, self._direct = self._direct, None
                direct.__exit__(None, None, None)  # writes the last block and cuts the file to size
            os.fsync(self._fd)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, "write", self.path) from exc
        self._release()
        return FileRecord(self._offset, format_checksum(self._hasher))

    def abort(self) -> None:
        if self._fd is not None:
            self._release()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _release(self) -> None:
        if self._direct is not None:
            direct, self._direct = self._direct, None
            direct.__exit__(StorageError, None, None)  # gives its buffers back without writing
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class LocalBackend:
    """The local (POSIX) file system. Locations are OS paths; ``reuse`` is a hard link, ``read_all``
    a private memory map and ``read_range`` one ``preadv``. Every read opens the file through the
    guarded door (:mod:`.door`): no link followed, regular files only, sizes capped."""

    read_concurrency = 1
    """One reader thread, ahead of the thread that hashes: a local file read in order from one
    descriptor gets the kernel's read-ahead, which more threads reading pieces of it only defeat
    (``benchmarks/restore.py``: a cold restore was slower with two readers and slower still with four)."""

    def __init__(self, root: str | os.PathLike[str] = "") -> None:
        self.root = os.fspath(Path(root).expanduser()) if root else ""
        self._open_reads: dict[str, list[int]] = {}
        """Files held open by :meth:`reading`: the descriptor and how many streams use it."""
        self._open_reads_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalBackend({self.root!r})"

    def join(self, base: str, *names: str) -> str:
        return os.path.join(base, *names)

    def directory_of(self, key: str) -> Path:
        """The directory ``key`` names, for a library that walks a directory itself (an object
        store has no such path, and no such method)."""
        return Path(key)

    def append_line(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Append one line to the log file ``key`` in a single write (see :func:`append_line`). A
        file system has appends; an object store has none, and a log there is one object per line."""
        append_line(Path(key), data, durable=durable)

    def create(self, key: str, size: int | None = None) -> LocalSink:
        return LocalSink(os.fspath(key), size)

    def read_range(self, key: str, offset: int, into: memoryview) -> None:
        with self._open_reads_lock:
            held = self._open_reads.get(key)
            if held is not None:
                held[1] += 1
        if held is None:
            fd, _ = _guarded(door.open_file, key)
            try:
                read_exactly(fd, key, into, offset)
            finally:
                os.close(fd)
            return
        try:
            read_exactly(held[0], key, into, offset)
        finally:
            self._release(key, held)

    @contextlib.contextmanager
    def reading(self, key: str) -> Iterator[None]:
        """Hold ``key`` open while a stream reads all of it in order: every :meth:`read_range` of it
        then reads one descriptor, whose sequential pattern the kernel's read-ahead follows (a
        file opened again for every piece looks like random reads, and gets no read-ahead)."""
        with self._open_reads_lock:
            held = self._open_reads.get(key)
            if held is None:
                fd, _ = _guarded(door.open_file, key)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                held = self._open_reads[key] = [fd, 0]
            held[1] += 1
        try:
            yield
        finally:
            self._release(key, held)

    def _release(self, key: str, held: list[int]) -> None:
        with self._open_reads_lock:
            held[1] -= 1
            if held[1] == 0:
                del self._open_reads[key]
                os.close(held[0])

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        return _guarded(door.read_file, key, limit)

    def read_all(self, key: str, limit: int | None = None) -> Any:
        return _guarded(door.map_file, key, limit)

    def size(self, key: str) -> int:
        return os.stat(key).st_size

    def list(self, prefix: str) -> Iterator[str]:
        try:
            with os.scandir(prefix) as entries:
                yield from (entry.name for entry in entries)
        except (FileNotFoundError, NotADirectoryError):
            return

    def fingerprint(self, key: str) -> str | None:
        try:
            stat = os.stat(key)
        except OSError:
            return None
        return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"  # not ctime: a link changes it

    def reuse(self, src: str, dst: str) -> bool:
        try:
            os.link(src, dst)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise _storage_error(exc, f"link {src} to", dst) from exc
        return True

    def delete(self, key: str) -> None:
        try:
            os.unlink(key)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error(exc, "delete", key) from exc

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(prefix, ignore_errors=True)


def _guarded(read: Callable[..., Any], key: str, *args: Any) -> Any:
    """``read(key, *args)``, one of the door's reads, with a failure of the file system as a
    :class:`StorageError` (a missing file stays :class:`FileNotFoundError`)."""
    try:
        return read(key, *args)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _storage_error(exc, "read", key) from exc


LOCAL = LocalBackend()
"""The local file system, for reads and writes of absolute or relative paths."""


def read_exactly(fd: int, path: str, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` with ``preadv`` (which releases the GIL)."""
    while buffer:
        try:
            count = os.preadv(fd, [buffer], offset)
        except OSError as exc:
            raise _storage_error(exc, "read", path) from exc
        if count == 0:
            raise CorruptCheckpointError(
                f"{path} ended early while being read; it was truncated: restore it or delete this checkpoint"
            )
        buffer = buffer[count:]
        offset += count


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to the disk, without waiting.

    Uses Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op where that is unavailable. It
    guarantees nothing on its own: durability still comes from the fsync that follows.
    """
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        try:
            function = getattr(_libc(), "sync_file_range", None)
        except (OSError, TypeError):  # no C library to load (not a POSIX system)
            function = None
        if function is not None:
            function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            function.restype = ctypes.c_int
        _SYNC_FILE_RANGE = function or False
    if _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE: Any = None


def append_line(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Append one line to a log file (created if missing) in a single write, and fsync it unless
    ``durable`` is False (for a log whose last lines may be lost in a power cut).

    A last line left unterminated by a writer that died is terminated first, so it never runs
    into the new one. Callers that append concurrently must hold a lock. The log must be a regular
    file, not a link (:func:`.door.open_log`; ``CorruptCheckpointError`` otherwise).
    """
    line = data.rstrip(b"\n") + b"\n"
    try:
        fd = door.open_log(os.fspath(path))
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            _write_all(fd, memoryview(line))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _storage_error(exc, "append to", path) from exc


def publish_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create the file ``path`` atomically from what ``write`` writes to a hidden temporary file.

    The temporary file is fsynced and then linked into place, so ``path`` appears whole or not at
    all, and an existing file at ``path`` is never replaced (:class:`StorageError` instead).
    """

    def make(temporary: Path) -> None:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())

    publish_made(path, make)


def publish_made(path: Path, make: Callable[[Path], object]) -> None:
    """Like :func:`publish_file`, for a ``make`` that creates and fsyncs the temporary file at the
    path it is given (such as :func:`write_tensor_file`)."""
    temporary = temporary_path(path)
    try:
        make(temporary)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system
            if path.exists():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
            os.rename(temporary, path)
        fsync_dir(path.parent)
    except FileExistsError as exc:
        raise StorageError(errno.EEXIST, f"{path} already exists and is never overwritten; remove it or choose another path") from exc
    except OSError as exc:
        raise _storage_error(exc, "write", path) from exc
    finally:
        temporary.unlink(missing_ok=True)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2``); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(first))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalStore:
    """A directory of checkpoint directories on a local (POSIX) file system: the rename commit.

    A checkpoint is written into a hidden staging directory (:meth:`begin`), every file fsynced,
    and :meth:`commit` writes ``metadata.json``, fsyncs the directory and renames it into place
    (swapping it with an older checkpoint of the same name in one ``renameat2``), then fsyncs
    the parent.
    """

    def __init__(self, root: str | os.PathLike[str], backend: LocalBackend | None = None) -> None:
        self.root = Path(root).expanduser()
        self.backend = backend if backend is not None else LOCAL

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def summary_dir(self) -> Path:
        """Where a listing may keep its summary cache file: the directory itself."""
        return self.root

    def identity(self, location: str | os.PathLike[str]) -> str:
        """What changes whenever the checkpoint at ``location`` is replaced (its directory's identity)."""
        return directory_identity(location)

    def occupant(self, name: str) -> Path | None:
        """What a commit of ``name`` would replace in place, if anything is there."""
        target = self.root / name
        return target if os.path.lexists(target) else None

    def committed_at(self, location: str | os.PathLike[str]) -> str | None:
        """``location`` when a committed checkpoint is there (its ``metadata.json`` exists), else None."""
        path = Path(location)
        return os.fspath(path) if (path / METADATA_FILE).is_file() else None

    @property
    def url(self) -> str:
        return str(self.root)

    # ------------------------------------------------------------------ the Commit protocol

    def begin(self, name: str) -> Transaction:
        """Create a hidden staging directory for checkpoint ``name`` (the root must exist:
        :meth:`ensure_writable`)."""
        return Transaction(name, os.fspath(self.staging_dir(name)))

    def commit(self, txn: Transaction, manifest: bytes, before_commit: BeforeCommit | None = None) -> str:
        """Write ``manifest`` as ``metadata.json`` into the staging directory and rename it into
        place; ``before_commit`` runs on the complete staging directory, before the rename."""
        sink = self.backend.create(os.path.join(txn.prefix, METADATA_FILE))
        try:
            sink.write(manifest)
        except BaseException:
            sink.abort()
            raise
        sink.close()
        if before_commit is not None:
            before_commit(self.backend, txn.prefix, {})
        return os.fspath(self.publish(Path(txn.prefix), txn.name))

    def abort(self, txn: Transaction) -> None:
        self.discard(Path(txn.prefix))

    def visible(self) -> Iterator[Entry]:
        """Every visible entry of the root; ``fingerprint`` is empty when it holds no readable
        ``metadata.json`` (a foreign directory: committed checkpoints always have one)."""
        for entry in self.entries():
            yield Entry(entry.name, entry.path, directory_identity(entry.path))

    def location(self, name: str) -> str | None:
        path = self.root / name
        return os.fspath(path) if path.is_dir() else None

    # ------------------------------------------------------------------ directories

    def ensure_writable(self, entry: str = "probe") -> None:
        """Create the root if needed and prove it is writable, or raise :class:`StorageError`.

        The proof is a directory named like the staging directory of ``entry``, so that recovery
        removes it if this process dies meanwhile, also recovery limited to that entry
        (``recover(only=entry)``, for a root that holds more than this store's entries).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = temporary_path(self.root / entry)
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            raise _storage_error(exc, "create checkpoints in", self.root) from exc

    def staging_dir(self, name: str) -> Path:
        """Create and return a hidden directory in which to write checkpoint ``name``."""
        path = temporary_path(self.root / name)
        try:
            path.mkdir()
        except OSError as exc:
            raise _storage_error(exc, "create a staging directory in", self.root) from exc
        return path

    def publish(self, staging: Path, name: str) -> Path:
        """Make ``staging`` visible as ``name``, atomically replacing any checkpoint of that name.

        Two writers committing the same name at once both succeed, in some order: the later one
        replaces the earlier one, as a later save does.
        """
        final = self.root / name
        try:
            fsync_dir(staging)
            for _ in range(_COMMIT_ATTEMPTS):
                if os.path.lexists(final):
                    if self._replace(staging, final, name):
                        return final
                    continue
                try:
                    os.rename(staging, final)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        continue  # another writer committed this name first: replace its checkpoint
                    raise
                fsync_dir(self.root)
                return final
            raise OSError(errno.EBUSY, f"other writers kept replacing {name} ({_COMMIT_ATTEMPTS} attempts)")
        except OSError as exc:
            raise _storage_error(exc, f"commit checkpoint {name} in", self.root) from exc

    def _replace(self, staging: Path, final: Path, name: str) -> bool:
        """Swap ``staging`` in for the existing ``final``; False when ``final`` vanished meanwhile."""
        try:
            exchanged = _exchange(staging, final)
        except FileNotFoundError:
            return False
        if exchanged:
            fsync_dir(self.root)
            trash.dispose(staging)  # now the replaced checkpoint, out of sight
            return True
        aside = self.root / f"{REPLACED_PREFIX}{uuid.uuid4().hex[:12]}.{name}"
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            return False
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            trash.dispose(aside)  # another writer's checkpoint took the name in between
            return False
        fsync_dir(self.root)
        trash.dispose(aside)
        return True

    def discard(self, staging: Path) -> None:
        """Remove a staging directory after a failed write."""
        shutil.rmtree(staging, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Delete checkpoint ``name``: hide it with one rename, then remove its files in the background.

        It is out of every listing when this returns; :func:`ckpt_plugin._storage.trash.drain` waits until
        its files are gone, and :meth:`recover` removes what a dead process left of it.
        """
        hidden = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}.{name}"
        try:
            os.rename(self.root / name, hidden)
        except FileNotFoundError:
            return  # another manager over the same directory deleted it first
        except OSError as exc:
            raise _storage_error(exc, f"delete checkpoint {name} from", self.root) from exc
        trash.dispose(hidden)

    def _remove_hidden(self, path: Path) -> None:
        """Remove a hidden entry this store made: a directory with what it holds, or a file (a dead
        writer's temporary); a link is unlinked, never followed."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def entries(self) -> Iterator[os.DirEntry[str]]:
        """The visible entries of the root (hidden staging and trash names are skipped)."""
        try:
            with os.scandir(self.root) as entries:
                yield from (entry for entry in entries if not entry.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):  # no directory there: no checkpoints
            return

    def recover(self, only: str | None = None) -> None:
        """Finish what dead writers left: restore a checkpoint set aside by an interrupted
        replacement, and remove stale staging and trash directories. Live writers are left alone.

        With ``only``, just the leftovers of entry ``only`` are handled, for a root that also holds
        files ckpt_plugin does not own; the writability probes of dead writers always are (every
        user of the root makes them).
        """
        now = time.time()
        for entry, kind, tail, match in self._hidden_entries():
            if only is not None and tail != only:
                continue
            if kind == REPLACED_PREFIX:
                original = self.root / tail
                if not os.path.lexists(original):
                    os.rename(entry.path, original)
                    fsync_dir(self.root)
                else:
                    self._remove_hidden(Path(entry.path))
            elif kind == TRASH_PREFIX:
                self._remove_hidden(Path(entry.path))
            elif self._staging_is_dead(match, entry, now):
                self._remove_hidden(Path(entry.path))
        if only is not None:
            self.remove_dead_probes()

    def remove_dead_probes(self) -> None:
        """Remove the writability probes (:meth:`ensure_writable`) of writers that died while
        making one, judged as staging directories are: by pid on this host, by age for others."""
        now = time.time()
        for entry, kind, tail, match in self._hidden_entries():
            if kind == STAGING_PREFIX and tail == PROBE_TAIL and self._staging_is_dead(match, entry, now):
                self._remove_hidden(Path(entry.path))

    def _hidden_entries(self) -> Iterator[tuple[os.DirEntry[str], str, str, re.Match[str]]]:
        """The entries of the root named exactly as this module names hidden ones, with their kind,
        the entry they belong to and the parsed name."""
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            kind, tail, match = _hidden_kind(entry.name)
            if kind is not None and match is not None:
                yield entry, kind, tail, match

    @staticmethod
    def _staging_is_dead(match: re.Match[str], entry: os.DirEntry[str], now: float) -> bool:
        host, pid = match["host"], int(match["pid"])
        if host == _HOST_TAG and pid > 0:
            return pid != os.getpid() and not _pid_alive(pid)
        try:
            return now - entry.stat(follow_symlinks=False).st_mtime > STALE_STAGING_SECONDS
        except FileNotFoundError:
            return False


def directory_identity(path: str) -> str:
    """What tells one written checkpoint directory from another at the same path.

    The directory's inode alone is not enough: inodes are reused once a replaced checkpoint is
    deleted, and files can be copied into a directory in place. ``metadata.json`` is rewritten by
    every save, so its inode, size and change times complete the key. Empty when it cannot be read.
    """
    try:
        directory = os.stat(path)
        metadata = os.stat(os.path.join(path, METADATA_FILE))
    except OSError:
        return ""
    return f"{directory.st_ino}:{metadata.st_ino}:{metadata.st_size}:{metadata.st_mtime_ns}:{metadata.st_ctime_ns}"


_COMMIT_ATTEMPTS = 8
_TAIL = rf"(?P<tail>{FILE_NAME_PATTERN})"  # the entry a hidden name belongs to: a plain name, no control characters
_HIDDEN_NAMES = {
    STAGING_PREFIX: re.compile(
        rf"\.tmp\.(?P<host>[0-9a-f]{{8}})\.(?P<pid>[0-9]{{1,10}})\.[0-9a-f]{{12}}\.{_TAIL}", re.ASCII
    ),
    TRASH_PREFIX: re.compile(rf"\.trash\.[0-9a-f]{{12}}\.{_TAIL}", re.ASCII),
    REPLACED_PREFIX: re.compile(rf"\.replaced\.[0-9a-f]{{12}}\.{_TAIL}", re.ASCII),
}
"""The hidden names this module gives entries, matched in full; any other hidden name is foreign."""


def _hidden_kind(name: str) -> tuple[str | None, str, re.Match[str] | None]:
    """Which hidden name of this module ``name`` is exactly (prefix, the entry it belongs to), if any."""
    for prefix, pattern in _HIDDEN_NAMES.items():
        match = pattern.fullmatch(name)
        if match is not None:
            return prefix, match["tail"], match
    return None, "", None


LINK_PREFIX = ".link."


def set_link(link: Path, target: Path) -> None:
    """Atomically make ``link`` a symbolic link to the directory ``target``.

    The link is stored relative to its own directory, so it survives moving the whole tree. An
    existing link of that name is replaced in one rename; a real file or directory is never replaced.
    """
    temporary = link.parent / f"{LINK_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:12]}"
    try:
        if link.exists() and not link.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists and is not a link", str(link))
        os.symlink(os.path.relpath(target, link.parent), temporary, target_is_directory=True)
        os.replace(temporary, link)
        fsync_dir(link.parent)
    except OSError as exc:
        if temporary.is_symlink():
            os.unlink(temporary)
        raise _storage_error(exc, "create the link", link) from exc


def symlinks(directory: Path) -> dict[str, Path]:
    """The visible symbolic links directly inside ``directory``, mapped to the paths they point to."""
    found: dict[str, Path] = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_symlink() and not entry.name.startswith("."):
                    found[entry.name] = Path(directory, os.readlink(entry.path))
    except FileNotFoundError:
        pass
    return found


def remove_link(link: Path) -> None:
    """Remove the symbolic link ``link``, never what it points to; a missing link is not an error."""
    try:
        if link.is_symlink():
            os.unlink(link)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _storage_error(exc, "remove the link", link) from exc
