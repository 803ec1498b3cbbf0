"""Read a committed checkpoint back into a dict of state trees, checking every checksum."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import codec, shards
from .format import documents
from .checkpoint import METADATA_FILE, STATE_FILE, CheckpointInfo, parse_metadata
from .errors import CorruptCheckpointError
from .storage import FileRecord, open_tensor_file, read_bytes_file

Device = str | torch.device | None


def read_json(path: Path, record: FileRecord | None = None) -> Any:
    """Parse and validate a JSON document of a checkpoint (its schema is chosen by its file name, see
    :mod:`ckpt_plugin.format.documents`), turning damage into :class:`CorruptCheckpointError`."""
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0  # reported by the read below
    if size > documents.MAX_DOCUMENT_BYTES:
        raise CorruptCheckpointError(f"{path} has {size} bytes, far more than any document ckpt_plugin writes; delete it")
    return documents.parse(read_bytes_file(path, record), path.name, str(path))


def read_checkpoint(
    info: CheckpointInfo,
    *,
    map_location: Device = None,
    verify: bool = True,
    items: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Load ``info`` as the dict described in the README (``model``, ``optimizer``, ``epoch``, ...).

    Tensors view the files through a private memory map until moved to ``map_location``. With
    ``verify`` every file is checked against its recorded size and checksum first. ``items``
    restricts which state trees are read (for example ``("model",)`` for inference).
    """
    metadata = read_json(info.path / METADATA_FILE)
    parse_metadata(info.path, metadata)  # checks its layout; its files were recorded in ``info`` at listing
    state = read_json(info.path / STATE_FILE, info.files.get(STATE_FILE) if verify else None)
    opened: dict[str, dict[str, torch.Tensor]] = {}

    def tensors_of(filename: str, prefix: str) -> dict[str, torch.Tensor]:
        if filename not in opened:
            record = info.files.get(filename)
            if verify and record is None:
                raise CorruptCheckpointError(f"{info.path / filename} has no recorded checksum in {METADATA_FILE}")
            tensors = open_item_files(info.path, info.files, filename, verify=verify)
            if map_location is not None:
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
        "config": codec.from_json(metadata.get("config"), str(info.path / METADATA_FILE), "config"),
        "metadata": {
            **codec.from_json(metadata.get("metadata", {}), str(info.path / METADATA_FILE), "metadata"),
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
        from .distributed.consolidate import read_sharded_items

        result.update(read_sharded_items(info.path, info.files, sharded, verify=verify, map_location=map_location))
    for item, entry in state["items"].items():
        if (items is not None and item not in items) or item in sharded:
            continue
        tensors = tensors_of(entry["file"], entry.get("prefix", "")) if entry.get("file") else {}
        result[item] = codec.decode(entry.get("tree"), tensors, str(info.path / STATE_FILE), item)
    return result


def open_item_files(
    directory: Path, files: Mapping[str, FileRecord], filename: str, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of the item stored as ``filename`` in ``directory``: one safetensors file, or every
    shard a Hugging Face index names. With ``verify`` each file is checked against its record in
    ``files`` (a file without one is reported as damage)."""

    def record_of(name: str) -> FileRecord | None:
        record = files.get(name)
        if verify and record is None:
            raise CorruptCheckpointError(f"{directory / name} has no recorded checksum in {METADATA_FILE}")
        return record

    if not shards.is_index(filename):
        return open_tensor_file(directory / filename, record_of(filename), verify=verify)
    try:
        names = shards.shard_files(read_json(directory / filename, record_of(filename) if verify else None))
    except ValueError as exc:
        raise CorruptCheckpointError(f"{directory / filename} is not a valid index ({exc}); restore it or delete this checkpoint") from None
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        tensors.update(open_tensor_file(directory / name, record_of(name), verify=verify))
    return tensors
