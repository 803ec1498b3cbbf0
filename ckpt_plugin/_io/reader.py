"""Read a committed checkpoint back into a dict of state trees, checking every checksum."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, Union

from ..errors import CorruptCheckpointError
from .._format import codec, shards
from .._format.layout import SIGNATURE_FILE, STATE_FILE
from .._format.records import METADATA_FILE, FileRecord
from .._storage import LOCAL, Backend
from .files import open_tensor_file, read_json
from .info import CheckpointInfo, parse_metadata

if TYPE_CHECKING:
    import torch

Device = Union[str, "torch.device", None]


class ShardedReader(Protocol):
    """Reads the per-rank sharded items of a checkpoint back whole, as plain state trees.

    The layers above ``io/`` pass one in (the package's is
    :func:`ckpt_plugin._distributed.consolidate.read_sharded_items`), so that the read path needs
    nothing of ``distributed/``.
    """

    def __call__(
        self,
        location: Any,
        records: Mapping[str, FileRecord],
        items: Iterable[str],
        *,
        verify: bool = ...,
        map_location: Any = ...,
        backend: Backend | None = ...,
    ) -> dict[str, Any]: ...


def read_info(location: Any, backend: Backend = LOCAL, record: FileRecord | None = None) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of the checkpoint at ``location``, from its verified ``metadata.json``."""
    location = str(location)
    return parse_metadata(location, read_json(backend.join(location, METADATA_FILE), record, backend=backend), backend)


def foreign_files(info: CheckpointInfo) -> list[str]:
    """The names inside the checkpoint ``info`` that its format does not name, sorted: anything
    but ``metadata.json``, the files it records and the signature. ckpt_plugin never wrote them and
    never reads them; a tool that reads whatever a directory holds (the HF Trainer's resume, which
    unpickles ``rng_state.pth`` or ``optimizer.pt``) must not be given such a checkpoint."""
    named = {METADATA_FILE, SIGNATURE_FILE, *info.files}
    return sorted(name for name in info.backend.list(info.location) if name not in named)


def item_shards(
    location: Any, files: Mapping[str, FileRecord], filename: str, verify: bool = True, *, backend: Backend = LOCAL
) -> list[str]:
    """The files holding the item stored as ``filename`` in the checkpoint at ``location``: itself,
    or the shards its index names (the one shard-index parser)."""
    if not shards.is_index(filename):
        return [filename]
    path = backend.join(str(location), filename)
    record = files.get(filename)
    if verify and record is None:
        raise CorruptCheckpointError(f"{path} has no recorded checksum in {METADATA_FILE}")
    try:
        return shards.shard_files(read_json(path, record if verify else None, backend=backend))
    except ValueError as exc:
        raise CorruptCheckpointError(f"{path} is not a valid index ({exc}); restore it or delete this checkpoint") from None


def read_checkpoint(
    info: CheckpointInfo,
    *,
    map_location: Device = None,
    verify: bool = True,
    items: tuple[str, ...] | None = None,
    sharded_reader: ShardedReader,
) -> dict[str, Any]:
    """Load ``info`` as the dict described in the README (``model``, ``optimizer``, ``epoch``, ...).

    Tensors view the files through a private memory map until moved to ``map_location``. With
    ``verify`` every file is checked against its recorded size and checksum first. ``items``
    restricts which state trees are read (for example ``("model",)`` for inference).
    ``sharded_reader`` reads the items stored as per-rank shards.
    """
    metadata = read_json(info.file(METADATA_FILE), backend=info.backend)
    parse_metadata(info.location, metadata, info.backend)  # checks its layout; its files were recorded in ``info`` at listing
    state = read_json(info.file(STATE_FILE), info.files.get(STATE_FILE) if verify else None, backend=info.backend)
    opened: dict[str, dict[str, torch.Tensor]] = {}

    def tensors_of(filename: str, prefix: str) -> dict[str, torch.Tensor]:
        if filename not in opened:
            record = info.files.get(filename)
            if verify and record is None:
                raise CorruptCheckpointError(f"{info.file(filename)} has no recorded checksum in {METADATA_FILE}")
            tensors = open_item_files(info.location, info.files, filename, verify=verify, backend=info.backend)
            if map_location is not None:
                import torch

                device = torch.device(map_location)
                tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
            opened[filename] = tensors
        tensors = opened[filename]
        if not prefix:
            return tensors
        return {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}

    result: dict[str, Any] = {
        "model": None,
        "optimizer": None,
        "epoch": info.epoch,
        "metrics": dict(info.metrics),
        "config": codec.from_json(metadata.get("config"), info.file(METADATA_FILE), "config"),
        "metadata": {
            **codec.from_json(metadata.get("metadata", {}), info.file(METADATA_FILE), "metadata"),
            "metric_for_best": info.metric_for_best,
            "mode": info.mode,
            "format_version": metadata.get("format_version"),
            "path": str(info.path),
        },
    }
    if info.step is not None:
        result["step"] = info.step
    sharded = [
        item
        for item, entry in state["items"].items()
        if entry.get("sharded") is True and (items is None or item in items)
    ]
    if sharded:
        result.update(
            sharded_reader(
                info.location, info.files, sharded, verify=verify, map_location=map_location, backend=info.backend
            )
        )
    for item, entry in state["items"].items():
        if (items is not None and item not in items) or item in sharded:
            continue
        tensors = tensors_of(entry["file"], entry.get("prefix", "")) if entry.get("file") else {}
        result[item] = codec.decode(entry.get("tree"), tensors, info.file(STATE_FILE), item)
    return result


def open_item_files(
    location: Any, files: Mapping[str, FileRecord], filename: str, *, verify: bool = True, backend: Backend = LOCAL
) -> dict[str, torch.Tensor]:
    """The tensors of the item stored as ``filename`` in the checkpoint at ``location``: one
    safetensors file, or every shard a Hugging Face index names. With ``verify`` each file is checked
    against its record in ``files`` (a file without one is reported as damage)."""
    tensors: dict[str, torch.Tensor] = {}
    for name in item_shards(location, files, filename, verify, backend=backend):
        path = backend.join(str(location), name)
        record = files.get(name)
        if verify and record is None:
            raise CorruptCheckpointError(f"{path} has no recorded checksum in {METADATA_FILE}")
        tensors.update(open_tensor_file(path, record, verify=verify, backend=backend))
    return tensors
