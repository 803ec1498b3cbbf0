"""Everything that touches the file system: atomic commits, listing, checksums, deletion.

A checkpoint is a directory. It is written under a hidden staging name in the same parent, every
file is fsynced, and the directory is renamed into place, then the parent is fsynced. Readers
list only visible names, so they see whole checkpoints or nothing. Replacing an existing
checkpoint swaps the two directories in one ``renameat2(RENAME_EXCHANGE)`` where the kernel has it;
elsewhere the old one is first renamed aside and put back by :meth:`LocalStore.recover` if the
process dies in between. Deletion renames the directory aside before removing its files (in the
background, see :mod:`ckpt_plugin.trash`), so a half-deleted checkpoint is never visible either.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from . import directio, tensorformat, trash
from .errors import CorruptCheckpointError, StorageError

CHECKSUM_ALGORITHM = "xxh3_64"
CHUNK_BYTES = 16 * 1024 * 1024
PARALLEL_HASH_BYTES = 1024 * 1024
STAGING_PREFIX = ".tmp."
TRASH_PREFIX = ".trash."
REPLACED_PREFIX = ".replaced."
STALE_STAGING_SECONDS = 6 * 3600
_HOST_TAG = format(zlib.crc32(socket.gethostname().encode()), "08x")


@dataclass(frozen=True)
class FileRecord:
    """The size and checksum of one file of a checkpoint, as recorded in ``metadata.json``."""

    size: int
    checksum: str

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "checksum": self.checksum}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FileRecord:
        return cls(int(data["size"]), str(data["checksum"]))  # type: ignore[arg-type]


def new_hasher() -> xxhash.xxh3_64:
    return xxhash.xxh3_64()


def format_checksum(hasher: xxhash.xxh3_64) -> str:
    return f"{CHECKSUM_ALGORITHM}:{hasher.hexdigest()}"


def checksum_bytes(data: bytes | memoryview) -> str:
    """The recorded checksum string of ``data``."""
    return format_checksum(xxhash.xxh3_64(data))


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


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of ``tensor`` in CPU memory; copies only when it is not already one."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensor_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> FileRecord:
    """Stream ``tensors`` into a new safetensors file at ``path``, hashing as it goes, and fsync it.

    A large file is written with direct I/O where the file system allows it (see
    :mod:`ckpt_plugin.directio`): the bytes go from memory to the disk without allocating page
    cache for them, through two reused buffers. Otherwise each large chunk is hashed on a helper
    thread while the calling thread writes it (both release the GIL), and writeback to the disk is
    started as the file grows, so the final fsync has little left to wait for. Either way the
    extra memory stays that of the one tensor that may need a contiguous copy, plus the buffers.
    """
    header, specs = tensorformat.plan(tensors, metadata)
    size = specs[-1].end if specs else len(header)
    hasher = new_hasher()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            direct = size >= directio.MIN_FILE_BYTES and directio.enable(fd)
            with directio.DirectSink(fd, hasher) if direct else _ChunkWriter(fd, hasher) as writer:
                writer.write(memoryview(header))
                for spec in specs:
                    data = tensor_bytes(tensors[spec.name])
                    for begin in range(0, len(data), CHUNK_BYTES):
                        writer.write(data[begin : begin + CHUNK_BYTES])
                    del data  # free a contiguous copy before the next tensor makes its own
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _storage_error(exc, "write", path) from exc
    return FileRecord(size, format_checksum(hasher))


class _ChunkWriter:
    """Writes and hashes a file's chunks in order, overlapping the two for large chunks."""

    def __init__(self, fd: int, hasher: xxhash.xxh3_64) -> None:
        self._fd = fd
        self._hasher = hasher
        self._pool: ThreadPoolExecutor | None = None
        self._offset = 0
        self._flushed = 0

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def write(self, chunk: memoryview) -> None:
        if len(chunk) < PARALLEL_HASH_BYTES:
            self._hasher.update(chunk)
            _write_all(self._fd, chunk)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash")
            hashed = self._pool.submit(self._hasher.update, chunk)
            try:
                _write_all(self._fd, chunk)
            finally:
                hashed.result()
        self._offset += len(chunk)
        if self._offset - self._flushed >= CHUNK_BYTES:
            start_writeback(self._fd, self._flushed, self._offset - self._flushed)
            self._flushed = self._offset


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


def write_bytes_file(path: Path, data: bytes) -> FileRecord:
    """Write ``data`` to a new file at ``path`` and fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, memoryview(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _storage_error(exc, "write", path) from exc
    return FileRecord(len(data), checksum_bytes(data))


def _check(path: Path, record: FileRecord | None, size: int, checksum: str | None) -> None:
    if record is None:
        return
    if size != record.size:
        raise CorruptCheckpointError(
            f"{path} has {size} bytes but {record.size} were recorded when it was saved; the file is "
            "truncated or damaged: restore it from a copy or delete this checkpoint"
        )
    if checksum is not None and checksum != record.checksum:
        raise CorruptCheckpointError(
            f"{path} does not match its recorded checksum ({checksum} != {record.checksum}); the file is "
            "damaged: restore it from a copy or delete this checkpoint"
        )


def read_bytes_file(path: Path, record: FileRecord | None = None) -> bytes:
    """Read a small file whole, checking it against ``record`` when one is given."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing; the checkpoint is incomplete: delete it or restore the file") from None
    _check(path, record, len(data), checksum_bytes(data) if record else None)
    return data


def verify_file(path: Path, record: FileRecord, progress: Callable[[int], None] | None = None) -> None:
    """Check ``path`` against its recorded size and checksum, streaming it in chunks.

    ``progress`` is called with the byte count of every chunk read, for progress bars.
    Raises :class:`CorruptCheckpointError` naming the file on any mismatch or when it is missing.
    """
    _check(path, record, *_hash_file(path, record, progress))


def _hash_file(path: Path, record: FileRecord, progress: Callable[[int], None] | None) -> tuple[int, str | None]:
    """The size and checksum of ``path``; the checksum is None when the size already disagrees."""
    hasher = new_hasher()
    size = 0
    try:
        with open(path, "rb") as handle:
            on_disk = os.fstat(handle.fileno()).st_size
            if on_disk != record.size:
                return on_disk, None
            while chunk := handle.read(CHUNK_BYTES):
                hasher.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(len(chunk))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing; the checkpoint is incomplete: delete it or restore the file") from None
    return size, format_checksum(hasher)


def link_or_copy(
    source: Path,
    target: Path,
    record: FileRecord,
    progress: Callable[[int], None] | None = None,
    *,
    link: bool = True,
) -> None:
    """Give ``target`` the content of ``source``, verified against ``record``.

    With ``link``, a hard link is made where the file system allows one (committed checkpoint
    files are never written in place, so sharing the inode is safe and deleting ``source`` later
    leaves ``target`` intact); otherwise, or without ``link``, the file is copied and fsynced.
    Either way the result is checked against ``record``, and nothing is left at ``target`` when
    that fails.
    """
    try:
        if not link:
            raise OSError(errno.EPERM, "copy requested")
        os.link(source, target)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{source} is missing; the checkpoint is incomplete: delete it or restore the file") from None
    except FileExistsError as exc:  # not ours: never replaced, never removed
        raise _storage_error(exc, "create", target) from exc
    except OSError:
        _copy_file(source, target)
    try:
        _check(source, record, *_hash_file(target, record, progress))
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to the new file ``target``; on failure remove ``target`` only if it was created here."""
    try:
        reader = open(source, "rb")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{source} is missing; the checkpoint is incomplete: delete it or restore the file") from None
    except OSError as exc:
        raise _storage_error(exc, "read", source) from exc
    with reader:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise _storage_error(exc, "create", target) from exc
        try:
            try:
                while chunk := reader.read(CHUNK_BYTES):
                    _write_all(fd, memoryview(chunk))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise _storage_error(exc, "copy a file to", target) from exc


def append_line(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Append one line to a log file (created if missing) in a single write, and fsync it unless
    ``durable`` is False (for a log whose last lines may be lost in a power cut).

    A last line left unterminated by a writer that died is terminated first, so it never runs
    into the new one. Callers that append concurrently must hold a lock.
    """
    line = data.rstrip(b"\n") + b"\n"
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
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
    temporary = path.parent / f"{STAGING_PREFIX}{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{path.name}"
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


def open_tensor_file(path: Path, record: FileRecord | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """Map a safetensors file and return its tensors, viewing the file's pages without copying them.

    The map is private (copy-on-write), so writing to a returned tensor never changes the file.
    With ``verify`` and a ``record``, the whole file is checked against the recorded checksum first.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if record is not None and size != record.size:
                _check(path, record, size, None)
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing; the checkpoint is incomplete: delete it or restore the file") from None
    view = memoryview(mapped)
    if verify and record is not None:
        _check(path, record, size, format_checksum(xxhash.xxh3_64(view)))
    specs, _ = tensorformat.parse(view, size, str(path))
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if spec.nbytes == 0:
            tensors[name] = torch.empty(spec.shape, dtype=spec.dtype)
        else:
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=spec.nbytes, offset=spec.start)
            tensors[name] = flat.view(spec.dtype).reshape(spec.shape)
    return tensors


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
    """A directory of checkpoint directories on a local (POSIX) file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def ensure_writable(self) -> None:
        """Create the root if needed and prove it is writable, or raise :class:`StorageError`."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Named like a staging directory, so that recover() removes it if the process dies here.
            probe = self.root / f"{STAGING_PREFIX}{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.probe"
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            raise _storage_error(exc, "create checkpoints in", self.root) from exc

    def staging_dir(self, name: str) -> Path:
        """Create and return a hidden directory in which to write checkpoint ``name``."""
        path = self.root / f"{STAGING_PREFIX}{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{name}"
        try:
            path.mkdir()
        except OSError as exc:
            raise _storage_error(exc, "create a staging directory in", self.root) from exc
        return path

    def commit(self, staging: Path, name: str) -> Path:
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

        It is out of every listing when this returns; :func:`ckpt_plugin.trash.drain` waits until
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
        """Remove a hidden entry this store made: a link is unlinked, never followed."""
        if path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def visible(self) -> Iterator[os.DirEntry[str]]:
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
        files ckpt_plugin does not own.
        """
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        now = time.time()
        for entry in entries:
            kind, tail, match = _hidden_kind(entry.name)
            if kind is None or (only is not None and tail != only):
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

    @staticmethod
    def _staging_is_dead(match: re.Match[str], entry: os.DirEntry[str], now: float) -> bool:
        host, pid = match["host"], int(match["pid"])
        if host == _HOST_TAG and pid > 0:
            return pid != os.getpid() and not _pid_alive(pid)
        try:
            return now - entry.stat(follow_symlinks=False).st_mtime > STALE_STAGING_SECONDS
        except FileNotFoundError:
            return False


_COMMIT_ATTEMPTS = 8
_HIDDEN_NAMES = {
    STAGING_PREFIX: re.compile(r"\.tmp\.(?P<host>[0-9a-f]{8})\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{12}\.(?P<tail>[^.].*)"),
    TRASH_PREFIX: re.compile(r"\.trash\.[0-9a-f]{12}\.(?P<tail>[^.].*)"),
    REPLACED_PREFIX: re.compile(r"\.replaced\.[0-9a-f]{12}\.(?P<tail>[^.].*)"),
}


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
