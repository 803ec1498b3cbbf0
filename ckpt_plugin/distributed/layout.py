"""The sharding document of a sharded checkpoint, ``sharding.json``: build it, check it. No I/O.

A sharded checkpoint stores every tensor as chunks, each a tensor of its own in one rank's
safetensors file. The document records, for every flattened state key:

- a tensor: its dtype, global shape, and each chunk's offsets and sizes in the global tensor,
  with the file and the key that hold it;
- any other value (learning rates, ``betas``, parameter names): the value itself, as codec JSON;
- the path of the key in the nested state (``["optimizer", "param_groups", 0, "lr"]``).

It also records each shard file's size and checksum, and a checksum of itself. Everything read
from disk is checked here before use: file names are single plain path components, chunks lie
inside their tensor and cover it exactly once, dtypes are on the safetensors list. Anything else
raises :class:`~ckpt_plugin.errors.CorruptCheckpointError` naming the document and the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint import SHARDING_FILE
from ..errors import CorruptCheckpointError
from ..format import codec, tensorformat
from ..storage import FileRecord, checksum_bytes

FORMAT_NAME = "ckpt_plugin.sharding"
FORMAT_VERSION = 1
CHECKSUM_KEY = "sharding_checksum"
FILE_KINDS = {"model": "model", "optimizer": "optim"}
"""The file family of each top-level state item; every other item's chunks go to ``state-r…`` files."""

PathItem = str | int
MAX_LIST_INDEX = 1 << 20


def shard_file_name(kind: str, rank: int, world_size: int) -> str:
    """The file of rank ``rank`` for one family: ``model-r0-of-2.safetensors``."""
    return f"{kind}-r{rank}-of-{world_size}.safetensors"


def file_kind(path: tuple[PathItem, ...]) -> str:
    """The file family (``model``, ``optim`` or ``state``) of the state key at ``path``."""
    return FILE_KINDS.get(str(path[0]), "state") if path else "state"


def chunk_key(fqn: str, offsets: tuple[int, ...]) -> str:
    """The name of one chunk inside its safetensors file: the key and the chunk's offsets."""
    return f"{fqn}@{','.join(str(offset) for offset in offsets)}"


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` is a single plain path component (no directory, no dot file)."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it lies in the global tensor and where it is stored."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    key: str


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the state: dtype, global shape and its chunks."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass
class Sharding:
    """The content of ``sharding.json``."""

    world_size: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, tuple[PathItem, ...]] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)

    def path_of(self, key: str) -> tuple[PathItem, ...]:
        return self.paths.get(key, (key,))

    def items(self) -> list[str]:
        """The top-level state items stored (``model``, ``optimizer``, ...), in order of appearance."""
        seen: dict[str, None] = {}
        for key in [*self.tensors, *self.objects]:
            seen.setdefault(str(self.path_of(key)[0]), None)
        return list(seen)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "world_size": self.world_size,
            "tensors": {
                key: {
                    "dtype": tensorformat.dtype_code(entry.dtype, key),
                    "shape": list(entry.shape),
                    "chunks": [
                        {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.file, "key": c.key}
                        for c in entry.chunks
                    ],
                }
                for key, entry in self.tensors.items()
            },
            "objects": self.objects,
            "paths": {key: list(path) for key, path in self.paths.items()},
            "files": {name: record.to_json() for name, record in self.files.items()},
        }
        document[CHECKSUM_KEY] = _checksum(document)
        return document

    @classmethod
    def from_json(cls, data: Any, where: str) -> Sharding:
        """Check a parsed ``sharding.json`` and return it; :class:`CorruptCheckpointError` otherwise."""
        return _Parser(where).parse(data)


def _checksum(document: Mapping[str, Any]) -> str:
    return checksum_bytes(codec.dumps({key: value for key, value in document.items() if key != CHECKSUM_KEY}))


class _Parser:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where} is not a valid sharding document: {why}; restore it or delete this checkpoint")

    def ints(self, value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
            raise self.fail(f"{what} must be a list of whole numbers")
        if length is not None and len(value) != length:
            raise self.fail(f"{what} has {len(value)} dimensions, not {length}")
        return tuple(value)

    def mapping(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a JSON object")
        return value

    def parse(self, data: Any) -> Sharding:
        data = self.mapping(data, "the document")
        if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
            raise self.fail(f"format {data.get('format')!r} version {data.get('format_version')!r} is not {FORMAT_NAME!r} {FORMAT_VERSION}")
        if data.get(CHECKSUM_KEY) != _checksum(data):
            raise CorruptCheckpointError(
                f"{self.where} does not match its recorded checksum; the file is damaged: restore it or delete this checkpoint"
            )
        world_size = data.get("world_size")
        if type(world_size) is not int or world_size < 1:
            raise self.fail(f"world_size {world_size!r} is not a positive whole number")
        files: dict[str, FileRecord] = {}
        for name, record in self.mapping(data.get("files"), "files").items():
            if not is_plain_name(name):
                raise self.fail(f"file name {name!r} is not a plain file name")
            record = self.mapping(record, f"files[{name!r}]")
            if type(record.get("size")) is not int or record["size"] < 0 or not isinstance(record.get("checksum"), str):
                raise self.fail(f"files[{name!r}] needs a size and a checksum")
            files[name] = FileRecord.from_json(record)
        sharding = Sharding(world_size=world_size, files=files)
        for key, entry in self.mapping(data.get("tensors"), "tensors").items():
            sharding.tensors[key] = self.tensor(key, self.mapping(entry, f"tensors[{key!r}]"), files)
        sharding.objects = dict(self.mapping(data.get("objects"), "objects"))
        for key, path in self.mapping(data.get("paths"), "paths").items():
            if not isinstance(path, list) or not path or not all(
                type(p) is str or (type(p) is int and 0 <= p < MAX_LIST_INDEX) for p in path
            ):
                raise self.fail(f"paths[{key!r}] must be a non-empty list of keys and indices")
            if not isinstance(path[0], str):
                raise self.fail(f"paths[{key!r}] must start with an item name")
            sharding.paths[key] = tuple(path)
        both = set(sharding.tensors) & set(sharding.objects)
        if both:
            raise self.fail(f"{sorted(both)[0]!r} is both a tensor and an object")
        return sharding

    def tensor(self, key: str, entry: dict[str, Any], files: Mapping[str, FileRecord]) -> TensorEntry:
        try:
            dtype = tensorformat.dtype_of(entry.get("dtype"))  # type: ignore[arg-type]
        except (KeyError, TypeError):
            raise self.fail(f"tensor {key!r} has unknown dtype {entry.get('dtype')!r}") from None
        shape = self.ints(entry.get("shape"), f"the shape of {key!r}")
        chunks_data = entry.get("chunks")
        if not isinstance(chunks_data, list):
            raise self.fail(f"the chunks of {key!r} must be a list")
        chunks: list[Chunk] = []
        covered = 0
        for index, chunk in enumerate(chunks_data):
            chunk = self.mapping(chunk, f"chunk {index} of {key!r}")
            offsets = self.ints(chunk.get("offsets"), f"the offsets of chunk {index} of {key!r}", len(shape))
            sizes = self.ints(chunk.get("sizes"), f"the sizes of chunk {index} of {key!r}", len(shape))
            if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
                raise self.fail(f"chunk {index} of {key!r} lies outside the tensor's shape {list(shape)}")
            name, stored = chunk.get("file"), chunk.get("key")
            if not isinstance(name, str) or name not in files or not isinstance(stored, str):
                raise self.fail(f"chunk {index} of {key!r} names a file that is not listed, or no key")
            chunks.append(Chunk(offsets, sizes, name, stored))
            covered += math.prod(sizes)
        for i, first in enumerate(chunks):
            for second in chunks[i + 1 :]:
                if _overlap(first, second):
                    raise self.fail(f"two chunks of {key!r} overlap, at offsets {list(first.offsets)} and {list(second.offsets)}")
        if covered != math.prod(shape):
            raise self.fail(f"the chunks of {key!r} cover {covered} of its {math.prod(shape)} elements")
        return TensorEntry(dtype, shape, tuple(chunks))


def _overlap(first: Chunk, second: Chunk) -> bool:
    if not all(first.sizes) or not all(second.sizes):
        return False
    return all(
        a < b + bs and b < a + as_
        for a, as_, b, bs in zip(first.offsets, first.sizes, second.offsets, second.sizes)
    )


def unflatten(flat: Mapping[str, Any], paths: Mapping[str, tuple[PathItem, ...]]) -> dict[str, Any]:
    """Rebuild the nested state from flattened keys and their paths (integers index lists)."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        path = paths.get(key, (key,))
        node: Any = root
        for here, after in zip(path[:-1], path[1:]):
            empty: Any = [] if isinstance(after, int) else {}
            node = _child(node, here, empty)
        _put(node, path[-1], value)
    return root


def _child(node: Any, key: PathItem, empty: Any) -> Any:
    if isinstance(node, list):
        assert isinstance(key, int)
        node.extend([None] * (key + 1 - len(node)))
        if node[key] is None:
            node[key] = empty
        return node[key]
    return node.setdefault(key, empty)


def _put(node: Any, key: PathItem, value: Any) -> None:
    if isinstance(node, list):
        assert isinstance(key, int)
        node.extend([None] * (key + 1 - len(node)))
    node[key] = value
