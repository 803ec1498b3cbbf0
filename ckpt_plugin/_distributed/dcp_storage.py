"""A DCP ``StorageWriter`` / ``StorageReader`` pair that writes safetensors and JSON, never pickle.

Each rank writes the chunks it owns into its own files, one per family: ``model-r{rank}-of-{N}``,
``optim-r{rank}-of-{N}`` and ``state-r{rank}-of-{N}.safetensors``. Non-tensor values travel to the
coordinator inside the write results and are stored inline in ``sharding.json``, which the
coordinator writes once every rank has reported its files (name, size, checksum). Used on their
own with ``torch.distributed.checkpoint.save`` / ``load`` they need :class:`JsonSavePlanner` and
:class:`JsonLoadPlanner`::

    dcp.save(state, storage_writer=SafetensorsWriter(path), planner=JsonSavePlanner())
    dcp.load(state, storage_reader=SafetensorsReader(path), planner=JsonLoadPlanner())
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..errors import ConfigurationError, CorruptCheckpointError
from .._format import codec, documents
from .._format.records import FileRecord
from .._io.files import Header
from .._storage import Location
from .files import BackendShardFiles, LocalShardFiles, ShardFiles
from .layout import (
    SHARDING_FILE,
    Chunk,
    PathError,
    Sharding,
    TensorEntry,
    chunk_key,
    file_kind,
    shard_file_name,
    unflatten,
)
from .planners import JsonLoadPlanner

CommitHook = Callable[[Sharding, FileRecord], None]


@dataclasses.dataclass(frozen=True)
class _StoredObject:
    value: Any


def _files_at(location: str | os.PathLike[str] | ShardFiles) -> ShardFiles:
    """The files at a local directory, at a URL (through the backend the URL names, configured by
    the standard environment), or ``location`` itself when it already is a :class:`ShardFiles`."""
    if not isinstance(location, (str, os.PathLike)):
        return location
    place = Location.of(location)  # the edge: DCP users hand a path or a URL straight to the writer or reader
    directory = place.local_dir()
    return LocalShardFiles(directory) if directory is not None else BackendShardFiles(str(place.where), place.backend())


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()  # DCP waits on torch futures
    future.set_result(value)
    return future


class SafetensorsWriter(StorageWriter):
    """Writes each rank's chunks as safetensors and the layout as ``sharding.json``.

    ``location`` is a directory every rank can reach, an object-store URL every rank writes under,
    or a :class:`ShardFiles` (a :class:`BackendShardFiles` with configured storage). ``on_commit``,
    called on the coordinator after ``sharding.json`` is written, with the document and its file
    record, is where a caller commits the checkpoint; an exception it raises makes the save fail
    on every rank.
    """

    def __init__(self, location: str | os.PathLike[str] | ShardFiles, *, on_commit: CommitHook | None = None) -> None:
        super().__init__()
        self.files = _files_at(location)
        self.on_commit = on_commit
        self.is_coordinator = False
        self.sharding: Sharding | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.files = _files_at(checkpoint_id)
        self.sharding = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        world_size = len(plans)
        return [dataclasses.replace(plan, storage_data=(rank, world_size)) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank, world_size = plan.storage_data
        groups: dict[str, dict[str, torch.Tensor]] = {}
        placed: list[tuple[Any, str, str, int]] = []
        results: list[WriteResult] = []
        for item in plan.items:
            key = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                data = planner.resolve_data(item).getvalue()
                results.append(WriteResult(index=item.index, size_in_bytes=len(data), storage_data=_StoredObject(codec.loads(data))))
                continue
            tensor = planner.resolve_data(item).detach()
            offsets = tuple(item.index.offset) if item.index.offset is not None else (0,) * tensor.dim()
            name = shard_file_name(file_kind((key.split(".", 1)[0],)), rank, world_size)
            stored = chunk_key(key, offsets)
            groups.setdefault(name, {})[stored] = tensor
            placed.append((item.index, name, stored, tensor.numel() * tensor.element_size()))
        records = {name: self.files.write_tensors(name, tensors) for name, tensors in groups.items()}
        for index, name, stored, nbytes in placed:
            results.append(WriteResult(index=index, size_in_bytes=nbytes, storage_data=(name, stored, records[name])))
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        sharding = sharding_from_dcp(metadata, results)
        record = self.files.write_bytes(SHARDING_FILE, codec.dumps(sharding.to_json()))
        self.sharding = sharding
        if self.on_commit is not None:
            self.on_commit(sharding, record)

    def storage_meta(self) -> StorageMeta | None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def sharding_from_dcp(metadata: Metadata, results: Iterable[Iterable[WriteResult]]) -> Sharding:
    """The sharding document of a finished DCP save: DCP's global metadata and every rank's results."""
    placed: dict[tuple[str, tuple[int, ...]], tuple[str, str]] = {}
    sharding = Sharding(world_size=0)
    for rank_results in results:
        sharding.world_size += 1
        for result in rank_results:
            stored = result.storage_data
            if isinstance(stored, _StoredObject):
                sharding.objects[result.index.fqn] = stored.value
                continue
            name, key, record = stored
            sharding.files[name] = record
            placed[(result.index.fqn, tuple(result.index.offset or ()))] = (name, key)
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        chunks = []
        for chunk in entry.chunks:
            offsets = tuple(chunk.offsets)
            where = placed.get((key, offsets)) or (placed.get((key, ())) if not any(offsets) else None)
            if where is None:
                raise CorruptCheckpointError(f"no rank reported writing the chunk of {key!r} at offsets {list(offsets)}")
            chunks.append(Chunk(offsets, tuple(chunk.sizes), where[0], where[1]))
        sharding.tensors[key] = TensorEntry(entry.properties.dtype, tuple(entry.size), tuple(chunks))
    sharding.paths = {key: tuple(path) for key, path in (metadata.planner_data or {}).items()}
    return sharding


def read_sharding(files: ShardFiles, record: FileRecord | None = None, where: str = SHARDING_FILE) -> Sharding:
    """Read and check ``sharding.json`` (against ``record`` too, when the caller has one)."""
    data = files.read_bytes(SHARDING_FILE, record)
    parsed = documents.load_json(data, where)  # strict JSON, nesting and size bounded
    return Sharding.from_json(parsed, where)


def dcp_metadata(sharding: Sharding) -> Metadata:
    """DCP's view of a checkpoint, for its load planners; chunk locations go in ``storage_data``."""
    described: dict[str, Any] = {}
    located: dict[MetadataIndex, Chunk | _StoredObject] = {}
    for key, entry in sharding.tensors.items():
        described[key] = TensorStorageMetadata(
            TensorProperties(dtype=entry.dtype),
            torch.Size(entry.shape),
            [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in entry.chunks],
        )
        for chunk in entry.chunks:
            located[MetadataIndex(key, chunk.offsets)] = chunk
    for key, value in sharding.objects.items():
        described[key] = BytesStorageMetadata()
        located[MetadataIndex(key)] = _StoredObject(value)
    return Metadata(state_dict_metadata=described, planner_data=dict(sharding.paths), storage_data=located)


class _ShardReader:
    """Reads shard files, each once, checked against its record, straight into the tensors that
    will keep the chunks where a chunk fills one exactly."""

    def __init__(self, files: ShardFiles, sharding: Sharding, where: str, verify: bool) -> None:
        self.files, self.sharding, self.where, self.verify = files, sharding, where, verify
        self.headers: dict[str, Header] = {}

    def check_headers(self, per_file: Mapping[str, Iterable[tuple[str, Chunk]]]) -> None:
        """Read the header of every file named (each checked against its record, its size against
        the file's) and check that it holds each chunk as recorded, before anything is allocated
        for them: the tensors then need no more memory than the files hold."""
        for name, chunks in per_file.items():
            header = self.headers[name] = self.files.read_header(name, self.sharding.files[name])
            specs = header[1]
            for key, chunk in chunks:
                spec = specs.get(chunk.key)
                if spec is None or spec.shape != chunk.sizes or spec.dtype != self.sharding.tensors[key].dtype:
                    raise self._not_held(key, chunk)

    def _not_held(self, key: str, chunk: Chunk) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.where}: {chunk.file} does not hold the chunk {chunk.key!r} of {key!r} as recorded "
            f"(sizes {list(chunk.sizes)}, {self.sharding.tensors[key].dtype}); restore the file or delete "
            "this checkpoint"
        )

    def read(self, name: str, targets: dict[str, tuple[str, Chunk, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """Read file ``name``; ``targets`` maps each chunk key wanted from it to its tensor key, its
        chunk and the tensor to fill when the chunk fills it whole. Returns every chunk, checked."""

        def destination(spec: Any) -> torch.Tensor | None:
            wanted = targets.get(spec.name)
            if wanted is None or wanted[2] is None:
                return None
            _, chunk, tensor = wanted
            return tensor if spec.shape == chunk.sizes and spec.dtype == tensor.dtype else None

        try:
            tensors = self.files.read_tensors(
                name, self.sharding.files[name], destination, verify=self.verify, header=self.headers.pop(name, None)
            )
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(
                f"{exc}. Tensors being restored may hold part of its bytes; restore another checkpoint before using them"
            ) from None
        for stored, (key, chunk, _) in targets.items():
            tensor = tensors.get(stored)
            if tensor is None or tuple(tensor.shape) != chunk.sizes or tensor.dtype != self.sharding.tensors[key].dtype:
                raise self._not_held(key, chunk)
        return tensors


def _whole(chunk: Chunk, offsets: Any, lengths: Any, target: torch.Tensor) -> torch.Tensor | None:
    """``target`` if a read of ``lengths`` at ``offsets`` in ``chunk`` is the whole chunk and the
    file's bytes can land in ``target`` as they are; else None."""
    if any(offsets) or tuple(lengths) != chunk.sizes:
        return None
    if not (target.device.type == "cpu" and target.is_contiguous() and target.layout == torch.strided):
        return None
    return target


class SafetensorsReader(StorageReader):
    """Reads a checkpoint written by :class:`SafetensorsWriter`, at any world size.

    ``record`` is the size and checksum of ``sharding.json`` when the caller knows it (the manager
    takes it from ``metadata.json``); every shard file is checked against the record in
    ``sharding.json`` before a byte of it is used, unless ``verify`` is False.
    """

    def __init__(
        self, location: str | os.PathLike[str] | ShardFiles, *, record: FileRecord | None = None, verify: bool = True
    ) -> None:
        super().__init__()
        self.files = _files_at(location)
        self.record = record
        self.verify = verify
        self.sharding: Sharding | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.files = _files_at(checkpoint_id)
        self.sharding = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise FileNotFoundError("a sharded ckpt_plugin checkpoint has no per-rank metadata")
        if self.sharding is None:  # read once per checkpoint; reset() forgets it
            self.sharding = read_sharding(self.files, self.record, where=self._where())
        return dcp_metadata(self.sharding)

    def _where(self) -> str:
        return str(self.files)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if not isinstance(planner, JsonLoadPlanner):
            raise ConfigurationError(
                f"{type(self).__name__} stores values as JSON and must be used with "
                "ckpt_plugin._distributed.JsonLoadPlanner (pass planner=JsonLoadPlanner()); the default "
                "planner would unpickle them"
            )
        assert self.sharding is not None
        reader = _ShardReader(self.files, self.sharding, self._where(), self.verify)
        per_file: dict[str, list[Any]] = {}
        for request in plan.items:
            stored = self.storage_data[request.storage_index]
            if request.type == LoadItemType.BYTE_IO:
                planner.load_bytes(request, io.BytesIO(codec.dumps(stored.value)))
            else:
                per_file.setdefault(stored.file, []).append(request)
        for name, requests in per_file.items():
            targets: dict[str, tuple[str, Chunk, torch.Tensor | None]] = {}
            planned = []
            for request in requests:
                chunk = self.storage_data[request.storage_index]
                key = request.storage_index.fqn
                target = planner.resolve_tensor(request).detach()
                if tuple(target.size()) != tuple(request.lengths):
                    raise CorruptCheckpointError(
                        f"{self._where()}: {key!r} is planned as {list(request.lengths)} but the target holds "
                        f"{list(target.size())}"
                    )
                whole = _whole(chunk, request.storage_offsets, request.lengths, target)
                if chunk.key in targets and targets[chunk.key][2] is not None:
                    whole = None  # a second read of the same chunk copies from the first
                targets.setdefault(chunk.key, (key, chunk, whole))
                planned.append((request, chunk, target))
            tensors = reader.read(name, targets)
            for request, chunk, target in planned:
                source = tensors[chunk.key]
                if source is not target:
                    for dim, (start, length) in enumerate(zip(request.storage_offsets, request.lengths)):
                        source = source.narrow(dim, start, length)
                    target.copy_(source)
                planner.commit_tensor(request, target)
            del tensors
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def read_full(
    files: ShardFiles,
    sharding: Sharding,
    *,
    items: Iterable[str] | None = None,
    verify: bool = True,
    where: str = "the checkpoint",
) -> dict[str, Any]:
    """Consolidate a sharded checkpoint in one process: full, plain tensors in the nested state.

    ``items`` limits which top-level items (``model``, ``optimizer``, ...) are read.
    """
    wanted = None if items is None else set(items)

    def included(key: str) -> bool:
        return wanted is None or str(sharding.path_of(key)[0]) in wanted

    flat: dict[str, Any] = {}
    per_file: dict[str, list[tuple[str, Chunk]]] = {}
    for key, entry in sharding.tensors.items():
        if included(key):
            for chunk in entry.chunks:
                per_file.setdefault(chunk.file, []).append((key, chunk))
    reader = _ShardReader(files, sharding, where, verify)
    reader.check_headers(per_file)
    for key, entry in sharding.tensors.items():
        if included(key):
            flat[key] = torch.empty(entry.shape, dtype=entry.dtype)
    for name, chunks in per_file.items():
        targets = {chunk.key: (key, chunk, flat[key] if len(sharding.tensors[key].chunks) == 1 else None) for key, chunk in chunks}
        tensors = reader.read(name, targets)
        for key, chunk in chunks:
            source = tensors[chunk.key]
            if source is flat[key]:
                continue
            target = flat[key]
            for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes)):
                target = target.narrow(dim, start, length)
            target.copy_(source)
        del tensors
    for key, value in sharding.objects.items():
        if included(key):
            try:
                flat[key] = codec.from_json(value)
            except (ValueError, TypeError, KeyError) as exc:
                raise CorruptCheckpointError(f"{where}: the stored value of {key!r} cannot be decoded ({exc})") from None
    try:
        return unflatten(flat, sharding.paths)
    except PathError as exc:
        raise CorruptCheckpointError(
            f"{where}: the key paths in {SHARDING_FILE} are inconsistent: {exc}; restore it or delete this checkpoint"
        ) from None
