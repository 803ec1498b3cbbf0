"""The byte I/O of a sharded checkpoint, kept behind one small seam.

Every read and write of a shard file or of ``sharding.json`` goes through a :class:`ShardFiles`.
The one here works on a local (or shared, network-mounted) directory with the package's atomic,
fsynced file primitives; a storage backend for object stores plugs in by providing the same four
methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CorruptCheckpointError
from ..format.tensorformat import TensorSpec
from ..io.files import read_bytes_file, stream_tensor_file, write_bytes_file, write_tensor_file
from ..storage import FileRecord
from .layout import is_plain_name

Destination = Callable[[TensorSpec], "torch.Tensor | None"]

SAFETENSORS_METADATA = {"format": "pt"}


class ShardFiles(Protocol):
    """Where the files of one sharded checkpoint live."""

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> FileRecord: ...
    def write_bytes(self, name: str, data: bytes) -> FileRecord: ...
    def read_bytes(self, name: str, record: FileRecord | None = None) -> bytes: ...
    def read_tensors(
        self, name: str, record: FileRecord | None, destination: Destination, verify: bool = True
    ) -> dict[str, torch.Tensor]: ...


class LocalShardFiles:
    """The files of one sharded checkpoint in a directory every rank can reach.

    Files are created exclusively and fsynced. A tensor file is read once, front to back, straight
    into the tensors ``destination`` names (new ones where it names none), and hashed in the same
    pass; a mismatch with the record raises :class:`CorruptCheckpointError` naming the file, once
    the bytes have landed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LocalShardFiles({str(self.path)!r})"

    def _file(self, name: str) -> Path:
        if not is_plain_name(name):
            raise CorruptCheckpointError(f"{name!r} is not a plain file name inside {self.path}; refusing to use it")
        return self.path / name

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> FileRecord:
        return write_tensor_file(self._file(name), tensors, SAFETENSORS_METADATA)

    def write_bytes(self, name: str, data: bytes) -> FileRecord:
        return write_bytes_file(self._file(name), data)

    def read_bytes(self, name: str, record: FileRecord | None = None) -> bytes:
        return read_bytes_file(self._file(name), record)

    def read_tensors(
        self, name: str, record: FileRecord | None, destination: Destination, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        return stream_tensor_file(self._file(name), record, destination, verify=verify)
