"""The one write path and the one read path of a checkpoint's files, over any storage backend.

Writing: :func:`write_tensor_file` streams a safetensors header and every tensor's bytes into a
:class:`~ckpt_plugin._storage.base.Sink`, which hashes them and makes the file durable (fsync
locally, a completed multipart upload remotely). :func:`write_bytes_file` does the same for a
small document.

Reading: every read checks the bytes against the size and checksum recorded at save.

- :func:`read_bytes_file` and :func:`read_json` read small documents whole.
- :func:`open_tensor_file` maps a whole safetensors file (a private memory map locally, one
  buffer filled by parallel ranged GETs remotely) and hashes it before handing out tensors.
- :func:`stream_tensor_file` reads a safetensors file once, front to back, straight into the
  tensors that will hold its data, hashing each chunk right after it lands while the next chunks
  are being read (``preadv`` locally, ranged GETs remotely; both release the GIL).
- :func:`verify_file` checks a file without keeping its data, streaming it through
  :func:`hash_file`, which feeds any hasher (SHA-256 for signatures, say) with bounded memory.

Every function takes ``backend=`` (the local file system when omitted) and a location: an OS path
for the local file system, a URL for an object store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, StorageError
from .._format import documents, limits, tensorformat
from .._format.records import FileRecord, checksum_bytes, format_checksum, new_hasher
from .._format.tensorformat import TensorSpec
from .._storage import LOCAL, Backend

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 8 * 1024 * 1024
"""Bytes written, read and hashed at a time: small enough to be hashed from the CPU cache after
it lands, large enough that a request's overhead does not matter."""
WRITE_CHUNK_BYTES = 16 * 1024 * 1024
READ_AHEAD = 2
"""Chunks being read ahead of the one being hashed, at least (a backend's ``read_concurrency`` may
ask for more); a backend may also set its own ``read_chunk`` size."""

Location = "str | os.PathLike[str]"
Destination = Callable[[TensorSpec], "torch.Tensor | None"]
Header = tuple["bytes | bytearray", dict[str, TensorSpec], int]

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-read")
        return pool


os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of its parent's threads


def _key(location: Any) -> str:
    return os.fspath(location)


def missing(location: Any) -> CorruptCheckpointError:
    """The error for a file a checkpoint records but that is not there."""
    return CorruptCheckpointError(f"{location} is missing; the checkpoint is incomplete: delete it or restore the file")


def check(location: Any, record: FileRecord | None, size: int, checksum: str | None) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``location`` when ``size`` or ``checksum``
    (None: not computed) disagrees with ``record``."""
    if record is None:
        return
    if size != record.size:
        raise CorruptCheckpointError(
            f"{location} has {size} bytes but {record.size} were recorded when it was saved; the file is "
            "truncated or damaged: restore it from a copy or delete this checkpoint"
        )
    if checksum is not None and checksum != record.checksum:
        raise CorruptCheckpointError(
            f"{location} does not match its recorded checksum ({checksum} != {record.checksum}); the file is "
            "damaged: restore it from a copy or delete this checkpoint"
        )


# ---------------------------------------------------------------------------------------- writing


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of ``tensor`` in CPU memory; copies only when it is not already one."""
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_tensor_file(
    location: Any,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    backend: Backend = LOCAL,
) -> FileRecord:
    """Stream ``tensors`` into a new safetensors file at ``location`` and make it durable.

    At most one tensor's contiguous copy (for a tensor that is not contiguous already) is held at a
    time, besides what the backend buffers (nothing locally; see the fsspec backend remotely).
    """
    header, specs = tensorformat.plan(tensors, metadata)
    sink = backend.create(_key(location), specs[-1].end if specs else len(header))
    try:
        sink.write(memoryview(header))
        for spec in specs:
            data = tensor_bytes(tensors[spec.name])
            for begin in range(0, len(data), WRITE_CHUNK_BYTES):
                sink.write(data[begin : begin + WRITE_CHUNK_BYTES])
            del data  # free a contiguous copy before the next tensor makes its own
    except BaseException:
        sink.abort()
        raise
    return sink.close()


def write_bytes_file(location: Any, data: bytes, *, backend: Backend = LOCAL) -> FileRecord:
    """Write ``data`` as a new file at ``location`` and make it durable."""
    sink = backend.create(_key(location))
    try:
        sink.write(memoryview(data))
    except BaseException:
        sink.abort()
        raise
    return sink.close()


def copy_file(
    source: Any,
    target: Any,
    record: FileRecord,
    progress: Callable[[int], None] | None = None,
    *,
    reuse: bool = True,
    backend: Backend = LOCAL,
    target_backend: Backend | None = None,
) -> None:
    """Give ``target`` the content of ``source``, verified against ``record``.

    With ``reuse``, the backend shares or copies the file without moving its bytes through this
    process where it can (a hard link: committed checkpoint files are never written in place, so
    sharing the inode is safe; a server-side copy on an object store). Otherwise the bytes are
    streamed. Either way the result is checked against ``record``, and nothing is left at
    ``target`` when that fails. ``target_backend`` is where ``target`` is when it is not on
    ``backend`` (a download from an object store to a local file, say).
    """
    source, target = _key(source), _key(target)
    writer = target_backend if target_backend is not None else backend
    if writer.fingerprint(target) is not None:  # not ours: never replaced, never removed
        raise StorageError(errno.EEXIST, f"could not create {target}: it already exists; remove it or choose another place")
    try:
        if not (reuse and writer is backend and backend.reuse(source, target)):
            _stream_copy(source, target, record, backend, writer)
        verify_file(target, record, progress, backend=writer, name=source)
    except BaseException:
        writer.delete(target)
        raise


def _stream_copy(source: str, target: str, record: FileRecord, backend: Backend, writer: Backend) -> None:
    scratch = bytearray(min(CHUNK_BYTES, max(record.size, 1)))
    sink = writer.create(target)
    try:
        size = _size(source, backend)
        for offset in range(0, size, len(scratch)):
            view = memoryview(scratch)[: min(len(scratch), size - offset)]
            _read(backend, source, offset, view)
            sink.write(view)
    except BaseException:
        sink.abort()
        raise
    sink.close()


# ---------------------------------------------------------------------------------------- reading


def _size(location: str, backend: Backend) -> int:
    try:
        return backend.size(location)
    except FileNotFoundError:
        raise missing(location) from None


def _read(backend: Backend, location: str, offset: int, into: memoryview) -> None:
    try:
        backend.read_range(location, offset, into)
    except FileNotFoundError:
        raise missing(location) from None


def read_bytes_file(location: Any, record: FileRecord | None = None, *, backend: Backend = LOCAL) -> bytes:
    """Read a small file whole, checking it against ``record`` when one is given; a file larger
    than the cap of its kind is refused unread (see :mod:`ckpt_plugin._storage.door`)."""
    try:
        data = backend.read_bytes(_key(location))
    except FileNotFoundError:
        raise missing(location) from None
    check(location, record, len(data), checksum_bytes(data) if record else None)
    return data


def read_json(location: Any, record: FileRecord | None = None, *, backend: Backend = LOCAL) -> Any:
    """Parse and validate a JSON document of a checkpoint (its schema is chosen by its file name, see
    :mod:`ckpt_plugin._format.documents`), turning damage into :class:`CorruptCheckpointError`."""
    key = _key(location)
    name = key.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return documents.parse(read_bytes_file(location, record, backend=backend), name, str(location))


def verify_file(
    location: Any,
    record: FileRecord,
    progress: Callable[[int], None] | None = None,
    *,
    backend: Backend = LOCAL,
    name: Any = None,
) -> None:
    """Check ``location`` against its recorded size and checksum, streaming it through a reused buffer.

    ``progress`` is called with the byte count of every chunk read, for progress bars. Raises
    :class:`CorruptCheckpointError` naming the file (or ``name``) on any mismatch or when it is missing.
    """
    key = _key(location)
    shown = name if name is not None else location
    size = _size(key, backend)
    if size != record.size:
        check(shown, record, size, None)
    hasher = new_hasher()
    size = hash_file(key, hasher, progress, backend=backend, size=size)
    check(shown, record, size, format_checksum(hasher))


def hash_file(
    location: Any,
    hasher: Any,
    progress: Callable[[int], None] | None = None,
    *,
    backend: Backend = LOCAL,
    size: int | None = None,
) -> int:
    """Feed every byte of ``location`` to ``hasher`` (anything with ``update``, such as a
    ``hashlib`` object) in file order, through reused buffers with the backend's reads in flight;
    return the byte count. Memory stays bounded whatever the file size: at most
    ``max(read_concurrency, 2)`` chunks of the backend's read size.

    ``progress`` is called with the byte count of every chunk read. A missing file raises
    :class:`CorruptCheckpointError` naming it.
    """
    key = _key(location)
    if size is None:
        size = _size(key, backend)
    workers = max(1, backend.read_concurrency)
    step = _chunk_bytes(backend)
    chunks = [(offset, min(step, size - offset)) for offset in range(0, size, step)]
    buffers = [memoryview(bytearray(min(step, size))) for _ in range(min(max(workers, READ_AHEAD), len(chunks)))]
    pool = _pool(workers)
    pending: deque[Any] = deque()
    try:
        for index, (_, length) in enumerate(chunks):
            while len(pending) < len(buffers) and index + len(pending) < len(chunks):
                ahead = index + len(pending)
                start, count = chunks[ahead]
                view = buffers[ahead % len(buffers)][:count]
                pending.append((pool.submit(_read, backend, key, start, view), view))
            future, view = pending.popleft()
            future.result()
            hasher.update(view)
            if progress is not None:
                progress(length)
    finally:
        for future, _ in pending:
            future.cancel()
        wait([future for future, _ in pending])
    return size


def can_receive(tensor: torch.Tensor, spec: TensorSpec) -> bool:
    """Whether the file's bytes for ``spec`` can be read straight into ``tensor``'s memory."""
    import torch

    return (
        tensor.device.type == "cpu"
        and tensor.dtype == spec.dtype
        and tuple(tensor.shape) == spec.shape
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.layout == torch.strided
    )


def read_header(location: Any, record: FileRecord | None, *, backend: Backend = LOCAL) -> Header:
    """Read and check a safetensors header (no tensor data): its bytes, the specs and the file size.

    The size is checked against ``record`` here, so truncation is found before any data moves.
    """
    key = _key(location)
    size = _size(key, backend)
    if record is not None and size != record.size:
        check(location, record, size, None)
    prefix = bytearray(min(8, size))
    _read(backend, key, 0, memoryview(prefix))
    header = prefix
    if len(prefix) == 8:
        (length,) = struct.unpack("<Q", prefix)
        header = bytearray(8 + max(0, min(length, tensorformat.HEADER_LIMIT + 1, size - 8)))  # read in place, never copied
        header[:8] = prefix
        _read(backend, key, 8, memoryview(header)[8:])
    specs, _ = tensorformat.parse(memoryview(header), size, str(location))
    return header, specs, size


def open_tensor_file(
    location: Any, record: FileRecord | None = None, verify: bool = True, *, backend: Backend = LOCAL
) -> dict[str, torch.Tensor]:
    """The tensors of a whole safetensors file, viewing one buffer that holds it without copying.

    Locally the buffer is a private (copy-on-write) memory map, so writing to a returned tensor
    never changes the file. With ``verify`` and a ``record``, the whole file is checked against the
    recorded checksum first.
    """
    import torch

    key = _key(location)
    try:
        if record is not None:
            size = backend.size(key)
            if size != record.size:
                check(location, record, size, None)
        mapped = backend.read_all(key, record.size if record is not None else limits.UNRECORDED_TENSOR_FILE_BYTES)
    except FileNotFoundError:
        raise missing(location) from None
    view = memoryview(mapped)
    size = len(view)
    if verify and record is not None:
        check(location, record, size, checksum_bytes(view))
    specs, _ = tensorformat.parse(view, size, str(location))
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if spec.nbytes == 0:
            tensors[name] = torch.empty(spec.shape, dtype=spec.dtype)
        else:
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=spec.nbytes, offset=spec.start)
            tensors[name] = flat.view(spec.dtype).reshape(spec.shape)
    return tensors


def _byte_view(tensor: torch.Tensor) -> memoryview:
    import torch

    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def stream_tensor_file(
    location: Any,
    record: FileRecord | None,
    destination: Destination,
    *,
    verify: bool = True,
    header: Header | None = None,
    backend: Backend = LOCAL,
) -> dict[str, torch.Tensor]:
    """Read every tensor of the safetensors file at ``location`` into memory, reading each byte once.

    ``destination(spec)`` returns the tensor that receives ``spec``'s bytes (it must pass
    :func:`can_receive`), or None to have a new tensor allocated for it. Returns every tensor of
    the file by name. With ``verify`` the whole file, header included, is hashed during the same
    pass and compared with ``record``; a mismatch raises :class:`CorruptCheckpointError` naming the
    file, after the bytes have landed (the caller decides what that means for its destinations).
    ``header`` is the result of an earlier :func:`read_header` of the same file.
    """
    import torch

    key = _key(location)
    header_bytes, specs, _ = header if header is not None else read_header(key, record, backend=backend)
    hasher = new_hasher() if verify and record is not None else None
    if hasher is not None:
        hasher.update(header_bytes)
    tensors: dict[str, torch.Tensor] = {}
    chunks: list[tuple[memoryview, int]] = []
    step = _chunk_bytes(backend)
    for spec in sorted(specs.values(), key=lambda s: s.start):
        target = destination(spec)
        if target is None or not can_receive(target, spec):
            target = torch.empty(spec.shape, dtype=spec.dtype)
        tensors[spec.name] = target
        if spec.nbytes:
            view = _byte_view(target)
            for begin in range(0, spec.nbytes, step):
                chunks.append((view[begin : begin + step], spec.start + begin))
    _pipeline(backend, key, chunks, hasher)
    if hasher is not None and record is not None:
        check(location, record, record.size, format_checksum(hasher))
    return tensors


def _chunk_bytes(backend: Backend) -> int:
    return int(getattr(backend, "read_chunk", CHUNK_BYTES))


def _pipeline(backend: Backend, key: str, chunks: list[tuple[memoryview, int]], hasher: Any) -> None:
    """Read every chunk (a view and its file offset, in file order), hashing each in order as soon
    as it has landed, with the backend's ``read_concurrency`` reads in flight. A backend with
    ``read_scatter`` gets adjacent chunks as one request of up to its ``read_chunk`` bytes."""
    reading = getattr(backend, "reading", None)
    with reading(key) if reading is not None and chunks else contextlib.nullcontext():
        _read_in_order(backend, key, chunks, hasher)


def _read_in_order(backend: Backend, key: str, chunks: list[tuple[memoryview, int]], hasher: Any) -> None:
    units = _coalesce(chunks, _chunk_bytes(backend)) if hasattr(backend, "read_scatter") else [
        (offset, [view]) for view, offset in chunks
    ]
    workers = backend.read_concurrency
    if hasher is None and workers <= 2 or len(units) < 2 or workers == 0:
        for offset, views in units:
            _read_unit(backend, key, offset, views)
            if hasher is not None:
                for view in views:
                    hasher.update(view)
        return
    pool = _pool(workers)
    depth = max(workers, READ_AHEAD)
    pending = deque(pool.submit(_read_unit, backend, key, offset, views) for offset, views in units[:depth])
    try:
        for index, (_, views) in enumerate(units):
            pending.popleft().result()
            if index + depth < len(units):
                pending.append(pool.submit(_read_unit, backend, key, *units[index + depth]))
            if hasher is not None:
                for view in views:
                    hasher.update(view)
    finally:
        for future in pending:
            future.cancel()
        wait(pending)


def _coalesce(chunks: list[tuple[memoryview, int]], limit: int) -> list[tuple[int, list[memoryview]]]:
    """Adjacent chunks grouped into requests of at most ``limit`` bytes (a chunk may exceed it alone)."""
    units: list[tuple[int, list[memoryview]]] = []
    end = size = -1
    for view, offset in chunks:
        if units and offset == end and size + len(view) <= limit:
            units[-1][1].append(view)
            size += len(view)
        else:
            units.append((offset, [view]))
            size = len(view)
        end = offset + len(view)
    return units


def _read_unit(backend: Backend, location: str, offset: int, views: list[memoryview]) -> None:
    if len(views) == 1:
        _read(backend, location, offset, views[0])
        return
    try:
        backend.read_scatter(location, offset, views)  # type: ignore[attr-defined]
    except FileNotFoundError:
        raise missing(location) from None
