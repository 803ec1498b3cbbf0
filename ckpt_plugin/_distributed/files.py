"""The byte I/O of a sharded checkpoint, kept behind one small seam.

Every read and write of a shard file or of ``sharding.json`` goes through a :class:`ShardFiles`.
:class:`BackendShardFiles` is the one implementation: the files under one location (a directory,
or an object-store prefix every rank writes under) of any storage
:class:`~ckpt_plugin._storage.Backend`, through the package's one write path and one read path
(:mod:`ckpt_plugin._io.files`). Locally that is direct, fsynced I/O into a staging directory;
remotely, streamed multipart uploads (bounded memory, no whole-file buffer) and parallel ranged
GETs, every byte hashed on the way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CorruptCheckpointError
from .._format.records import FileRecord
from .._format.tensorformat import TensorSpec
from .._io.files import Header, read_bytes_file, read_header, stream_tensor_file, write_bytes_file, write_tensor_file
from .._storage import LOCAL, Backend
from .layout import is_plain_name

Destination = Callable[[TensorSpec], "torch.Tensor | None"]

SAFETENSORS_METADATA = {"format": "pt"}


class ShardFiles(Protocol):
    """Where the files of one sharded checkpoint live."""

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> FileRecord: ...
    def write_bytes(self, name: str, data: bytes) -> FileRecord: ...
    def read_bytes(self, name: str, record: FileRecord | None = None) -> bytes: ...
    def read_header(self, name: str, record: FileRecord | None) -> Header: ...
    def read_tensors(
        self, name: str, record: FileRecord | None, destination: Destination, verify: bool = True,
        header: Header | None = None,
    ) -> dict[str, torch.Tensor]: ...


class BackendShardFiles:
    """The files of one sharded checkpoint under ``location`` on ``backend``.

    ``location`` is a directory every rank can reach (the local file system, the default backend)
    or a prefix on an object store (``s3://bucket/run/epoch_3@<transaction>``). Files are created
    exclusively and made durable (fsynced, or the upload completed) before their record is
    returned. A tensor file is read once, front to back, straight into the tensors
    ``destination`` names (new ones where it names none), and hashed in the same pass; a mismatch
    with the record raises :class:`CorruptCheckpointError` naming the file, once the bytes have
    landed.
    """

    def __init__(self, location: str | os.PathLike[str], backend: Backend = LOCAL) -> None:
        self.location = os.fspath(location)
        self.backend = backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __str__(self) -> str:
        return self.location

    def _file(self, name: str) -> str:
        if not is_plain_name(name):
            raise CorruptCheckpointError(f"{name!r} is not a plain file name inside {self.location}; refusing to use it")
        return self.backend.join(self.location, name)

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> FileRecord:
        return write_tensor_file(self._file(name), tensors, SAFETENSORS_METADATA, backend=self.backend)

    def write_bytes(self, name: str, data: bytes) -> FileRecord:
        return write_bytes_file(self._file(name), data, backend=self.backend)

    def read_bytes(self, name: str, record: FileRecord | None = None) -> bytes:
        return read_bytes_file(self._file(name), record, backend=self.backend)

    def read_header(self, name: str, record: FileRecord | None) -> Header:
        """The checked header of file ``name`` (its size checked against ``record`` first); no tensor data."""
        return read_header(self._file(name), record, backend=self.backend)

    def read_tensors(
        self, name: str, record: FileRecord | None, destination: Destination, verify: bool = True,
        header: Header | None = None,
    ) -> dict[str, torch.Tensor]:
        return stream_tensor_file(
            self._file(name), record, destination, verify=verify, header=header, backend=self.backend
        )


class LocalShardFiles(BackendShardFiles):
    """The files of one sharded checkpoint in a local (or shared, network-mounted) directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, LOCAL)
        self.path = Path(path)


class PreferLocalShardFiles:
    """The files of one sharded checkpoint read from ``files``, except those in ``local`` (name to
    a local path holding the same bytes, checked already), which are read from there."""

    def __init__(self, files: ShardFiles, local: Mapping[str, str]) -> None:
        self.files = files
        self.local = dict(local)

    def __str__(self) -> str:
        return str(self.files)

    def _of(self, name: str) -> ShardFiles:
        path = self.local.get(name)
        return self.files if path is None else BackendShardFiles(os.path.dirname(path), LOCAL)

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> FileRecord:
        raise NotImplementedError("a checkpoint read from two places is never written")

    def write_bytes(self, name: str, data: bytes) -> FileRecord:
        raise NotImplementedError("a checkpoint read from two places is never written")

    def read_bytes(self, name: str, record: FileRecord | None = None) -> bytes:
        return self._of(name).read_bytes(name, record)

    def read_header(self, name: str, record: FileRecord | None) -> Header:
        return self._of(name).read_header(name, record)

    def read_tensors(
        self, name: str, record: FileRecord | None, destination: Destination, verify: bool = True,
        header: Header | None = None,
    ) -> dict[str, torch.Tensor]:
        return self._of(name).read_tensors(name, record, destination, verify, header)
