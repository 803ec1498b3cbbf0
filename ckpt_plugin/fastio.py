"""Storage-level helpers for fast restore and incremental checkpoints.

:func:`stream_tensor_file` reads a safetensors file once, front to back, straight into the
tensors that will hold its data, and folds checksum verification into that same pass: each chunk
is hashed right after it lands, while it is still in the CPU cache. The read of the next chunk
runs on a helper thread (``preadv`` releases the GIL) while the current one is hashed, so on a
machine with two cores the copy and the hash overlap.

:func:`link_file` hard-links a file of an earlier checkpoint into a staging directory, which is
how an incremental checkpoint shares the shards that did not change.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from . import tensorformat
from .errors import CorruptCheckpointError, StorageError
from .storage import FileRecord, format_checksum, new_hasher
from .tensorformat import TensorSpec

CHUNK_BYTES = 8 * 1024 * 1024
"""Bytes read and hashed at a time: small enough to be hashed from the CPU cache after it lands."""
SCRATCH_BYTES = CHUNK_BYTES
READ_AHEAD = 2
"""Chunks being read ahead of the one being hashed."""
READERS = 2
"""Reader threads; 0 reads and hashes every chunk on the calling thread."""

Destination = Callable[[TensorSpec], "torch.Tensor | None"]

_READER: ThreadPoolExecutor | None = None


def _reader() -> ThreadPoolExecutor:
    global _READER
    if _READER is None:
        _READER = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="ckpt-read")
    return _READER


def _forget_reader() -> None:
    """A forked child (a data loader worker, say) has none of its parent's threads."""
    global _READER
    _READER = None


os.register_at_fork(after_in_child=_forget_reader)


def _missing(path: Path) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path} is missing; the checkpoint is incomplete: delete it or restore the file")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def can_receive(tensor: torch.Tensor, spec: TensorSpec) -> bool:
    """Whether the file's bytes for ``spec`` can be read straight into ``tensor``'s memory."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype == spec.dtype
        and tuple(tensor.shape) == spec.shape
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.layout == torch.strided
    )


def read_header(path: Path, record: FileRecord | None) -> tuple[bytes, dict[str, TensorSpec], int]:
    """Read and check a safetensors header (no tensor data): its bytes, the specs and the file size.

    The size is checked against ``record`` here, so truncation is found before any data moves.
    """
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) == 8:
                (length,) = struct.unpack("<Q", prefix)
                header = prefix + handle.read(min(length, tensorformat.HEADER_LIMIT + 1))
            else:
                header = prefix
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as exc:
        raise StorageError(exc.errno, f"could not read {path}: {exc.strerror or exc}") from exc
    if record is not None and size != record.size:
        raise CorruptCheckpointError(
            f"{path} has {size} bytes but {record.size} were recorded when it was saved; the file is "
            "truncated or damaged: restore it from a copy or delete this checkpoint"
        )
    specs, _ = tensorformat.parse(memoryview(header), size, str(path))
    return header, specs, size


def stream_tensor_file(
    path: Path,
    record: FileRecord | None,
    destination: Destination,
    *,
    verify: bool = True,
    header: tuple[bytes, dict[str, TensorSpec], int] | None = None,
) -> dict[str, torch.Tensor]:
    """Read every tensor of the safetensors file at ``path`` into memory, reading each byte once.

    ``destination(spec)`` returns the tensor that receives ``spec``'s bytes (it must pass
    :func:`can_receive`), or None to have a new tensor allocated for it. Returns every tensor of
    the file by name. With ``verify`` the whole file, header included, is hashed during the same
    pass and compared with ``record``; a mismatch raises :class:`CorruptCheckpointError` naming the
    file, after the bytes have landed (the caller decides what that means for its destinations).
    ``header`` is the result of an earlier :func:`read_header` of the same file.
    """
    header_bytes, specs, _ = header if header is not None else read_header(path, record)
    hasher = new_hasher() if verify and record is not None else None
    if hasher is not None:
        hasher.update(header_bytes)
    tensors: dict[str, torch.Tensor] = {}
    chunks: list[tuple[memoryview, int]] = []
    for spec in sorted(specs.values(), key=lambda s: s.start):
        target = destination(spec)
        if target is None or not can_receive(target, spec):
            target = torch.empty(spec.shape, dtype=spec.dtype)
        tensors[spec.name] = target
        if spec.nbytes:
            view = _byte_view(target)
            for begin in range(0, spec.nbytes, CHUNK_BYTES):
                chunks.append((view[begin : begin + CHUNK_BYTES], spec.start + begin))
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _missing(path) from None
    try:
        _pipeline(fd, path, chunks, hasher)
    finally:
        os.close(fd)
    if hasher is not None and record is not None:
        _compare(path, format_checksum(hasher), record)
    return tensors


def hash_tensor_file(path: Path, record: FileRecord) -> None:
    """Check the whole file against ``record`` without keeping its data (a scratch buffer is reused)."""
    scratch = torch.empty(min(SCRATCH_BYTES, max(record.size, 1)), dtype=torch.uint8)
    header_bytes, _, size = read_header(path, record)
    hasher = new_hasher()
    hasher.update(header_bytes)
    view = _byte_view(scratch)
    start = len(header_bytes)
    chunks = [(view[: min(len(view), size - offset)], offset) for offset in range(start, size, len(view))]
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _missing(path) from None
    try:
        for chunk, offset in chunks:
            _read_exactly(fd, path, chunk, offset)
            hasher.update(chunk)
    finally:
        os.close(fd)
    _compare(path, format_checksum(hasher), record)


def _compare(path: Path, checksum: str, record: FileRecord) -> None:
    if checksum != record.checksum:
        raise CorruptCheckpointError(
            f"{path} does not match its recorded checksum ({checksum} != {record.checksum}); the file is "
            "damaged: restore it from a copy or delete this checkpoint"
        )


def _read_exactly(fd: int, path: Path, buffer: memoryview, offset: int) -> None:
    while buffer:
        try:
            count = os.preadv(fd, [buffer], offset)
        except OSError as exc:
            raise StorageError(exc.errno, f"could not read {path}: {exc.strerror or exc}") from exc
        if count == 0:
            raise CorruptCheckpointError(
                f"{path} ended early while being read; it was truncated: restore it or delete this checkpoint"
            )
        buffer = buffer[count:]
        offset += count


def _pipeline(fd: int, path: Path, chunks: list[tuple[memoryview, int]], hasher: object | None) -> None:
    if hasher is None or len(chunks) < 2 or READERS == 0:
        for chunk, offset in chunks:
            _read_exactly(fd, path, chunk, offset)
            if hasher is not None:
                hasher.update(chunk)  # type: ignore[attr-defined]
        return
    pool = _reader()
    pending = deque(pool.submit(_read_exactly, fd, path, *chunk) for chunk in chunks[:READ_AHEAD])
    try:
        for index, (chunk, _) in enumerate(chunks):
            pending.popleft().result()
            if index + READ_AHEAD < len(chunks):
                pending.append(pool.submit(_read_exactly, fd, path, *chunks[index + READ_AHEAD]))
            hasher.update(chunk)  # type: ignore[attr-defined]
    finally:
        for future in pending:
            future.cancel()
        wait(pending)


def link_file(source: Path, target: Path, identity: tuple[int, int, int]) -> bool:
    """Hard-link ``source`` as ``target`` if it is still the file ``identity`` describes.

    Returns False, leaving nothing at ``target``, where the file is gone or was replaced, or the
    file system has no hard links, so that the caller writes the file instead.
    """
    try:
        os.link(source, target)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise StorageError(exc.errno, f"could not link {source} to {target}: {exc.strerror or exc}") from exc
    if file_identity(target) != identity:
        os.unlink(target)
        return False
    return True


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """``(device, inode, size)`` of ``path``, or None when it is gone."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size)
