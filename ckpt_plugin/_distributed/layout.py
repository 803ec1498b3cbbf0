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

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from .._format import codec, tensorformat
from .._format.layout import SHARDING_FILE
from .._format.records import FileRecord, checksum_bytes

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
        try:
            actual = _checksum(data)
        except (ValueError, TypeError, RecursionError):  # a number JSON cannot write back (1e999 reads as inf)
            actual = None
        if data.get(CHECKSUM_KEY) != actual:
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
        self.check_stored_bytes(sharding)
        return sharding

    def check_stored_bytes(self, sharding: Sharding) -> None:
        """Each chunk is stored under a key of its own, and the chunks of a file need no more bytes
        than the file is recorded to hold (a reader checks that record against the file itself
        before it allocates anything): what the document declares is bounded by what the files hold."""
        needed = dict.fromkeys(sharding.files, 0)
        owners: dict[tuple[str, str], str] = {}
        for key, entry in sharding.tensors.items():
            for chunk in entry.chunks:
                place = (chunk.file, chunk.key)
                if place in owners:
                    raise self.fail(
                        f"chunks of {owners[place]!r} and {key!r} both name the stored chunk {chunk.key!r} of {chunk.file}"
                    )
                owners[place] = key
                needed[chunk.file] += math.prod(chunk.sizes) * entry.dtype.itemsize
                if needed[chunk.file] > sharding.files[chunk.file].size:
                    raise self.fail(
                        f"the chunks stored in {chunk.file} need {needed[chunk.file]} bytes or more (up to a chunk "
                        f"of {key!r} of sizes {list(chunk.sizes)}), but the file is recorded with "
                        f"{sharding.files[chunk.file].size}"
                    )

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
        problem = tiling_problem(shape, chunks)
        if problem is not None:
            raise self.fail(f"the chunks of {key!r} {problem}")
        return TensorEntry(dtype, shape, tuple(chunks))


MAX_CORNERS = 1 << 22
"""The most chunk corners :func:`tiling_problem` counts for one tensor (chunks times two to the
number of dimensions the tensor is split along): real layouts split one to three dimensions."""


def tiling_problem(shape: tuple[int, ...], chunks: Sequence[Chunk]) -> str | None:
    """What keeps ``chunks`` (each inside ``shape``) from covering the tensor exactly once, or None.

    The work is linear in the number of chunks. Write a chunk ``[a, b)`` as the signed sum of its
    corners: its indicator is ``sum over corners c of (-1)**(number of coordinates of c taken from
    b) * H_c``, where ``H_c`` is the indicator of the orthant ``x >= c``. The ``H_c`` of distinct
    points are linearly independent, so the chunks cover every element exactly once if and only if
    their corners, counted with these signs, add up to the signed corners of the whole tensor.
    Dimensions that every chunk spans whole factor out and are left aside.
    """
    held = [chunk for chunk in chunks if all(chunk.sizes)]  # an empty chunk holds nothing
    total = math.prod(shape)
    covered = sum(math.prod(chunk.sizes) for chunk in held)
    if covered > total:
        return f"overlap: they hold {covered} elements for its {total}"
    if covered < total:
        return f"cover {covered} of its {total} elements"
    if total == 0:
        return None
    split = [d for d in range(len(shape)) if any(c.offsets[d] != 0 or c.sizes[d] != shape[d] for c in held)]
    if len(held) << len(split) > MAX_CORNERS:
        return f"split it along {len(split)} dimensions into {len(held)} chunks, more than a layout this release reads"
    signs = [(pick, -1 if sum(pick) % 2 else 1) for pick in itertools.product((False, True), repeat=len(split))]
    counts: dict[tuple[int, ...], int] = {}
    for chunk in held:
        for pick, sign in signs:
            corner = tuple(chunk.offsets[d] + chunk.sizes[d] if upper else chunk.offsets[d] for d, upper in zip(split, pick))
            counts[corner] = counts.get(corner, 0) + sign
    whole = {tuple(shape[d] if upper else 0 for d, upper in zip(split, pick)): sign for pick, sign in signs}
    if {corner: count for corner, count in counts.items() if count} != whole:
        return "overlap, and leave as many elements uncovered"
    return None


class PathError(ValueError):
    """The key paths of a sharding document do not describe one tree; the message says where."""


class _Branch(dict):  # type: ignore[type-arg]
    """A node of the tree being rebuilt, as opposed to a stored value (which may be a dict too)."""

    def __init__(self, path: tuple[PathItem, ...] = ()) -> None:
        super().__init__()
        self.path = path


def unflatten(flat: Mapping[str, Any], paths: Mapping[str, tuple[PathItem, ...]]) -> dict[str, Any]:
    """Rebuild the nested state from flattened keys and their paths (integers index lists).

    Each path must end at a place of its own: never inside a stored value (a tensor's rows, a
    stored dict), never where another key's value or branch is. The integer indices under one node
    must be exactly ``0..n-1``, so the lists rebuilt hold as many items as there are keys. Raises
    :class:`PathError` otherwise.
    """
    root = _Branch()
    for key, value in flat.items():
        path = paths.get(key, (key,))
        node = root
        for depth, here in enumerate(path[:-1]):
            if here not in node:
                node[here] = _Branch(path[: depth + 1])
            child = node[here]
            if type(child) is not _Branch:
                raise PathError(f"the path of {key!r} leads into the stored value at {list(path[: depth + 1])}")
            node = child
        if path[-1] in node:
            raise PathError(f"the path of {key!r}, {list(path)}, is already taken by another key or its items")
        node[path[-1]] = value
    return _built(root)


def _built(root: _Branch) -> dict[str, Any]:
    """The plain tree of ``root``: branches with integer keys ``0..n-1`` become lists."""
    done: dict[int, Any] = {}
    stack: list[tuple[_Branch, bool]] = [(root, False)]
    while stack:  # children before parents, without recursion
        branch, expanded = stack.pop()
        if not expanded:
            stack.append((branch, True))
            stack.extend((child, False) for child in branch.values() if type(child) is _Branch)
            continue
        items = {key: done.pop(id(child)) if type(child) is _Branch else child for key, child in branch.items()}
        done[id(branch)] = _as_list(items, branch.path) if branch is not root else dict(items)
    return done[id(root)]


def _as_list(items: dict[PathItem, Any], path: tuple[PathItem, ...]) -> Any:
    """``items`` as a list when its keys are list indices (exactly ``0..n-1``), else as they are."""
    indices = [key for key in items if type(key) is int]
    if not indices:
        return items
    if len(indices) != len(items):
        raise PathError(f"the node at {list(path)} holds both names and list indices")
    if set(indices) != set(range(len(indices))):
        raise PathError(f"the list at {list(path)} has indices {sorted(indices)[:4]}..., not exactly 0..{len(indices) - 1}")
    return [items[index] for index in range(len(indices))]
