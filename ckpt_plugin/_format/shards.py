"""Sharded safetensors in the Hugging Face convention: file names and the index document. No I/O.

A sharded item is stored as ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json``, whose ``weight_map`` names the shard holding each tensor, so
``transformers`` and ``safetensors`` tooling open it as they open any sharded model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

INDEX_SUFFIX = ".safetensors.index.json"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def is_index(filename: str) -> bool:
    """Whether ``filename`` is a sharded item's index document."""
    return filename.endswith(INDEX_SUFFIX)


def index_name(filename: str) -> str:
    """``model.safetensors`` -> ``model.safetensors.index.json``."""
    return filename.removesuffix(".safetensors") + INDEX_SUFFIX


def shard_name(filename: str, index: int, count: int) -> str:
    """``model.safetensors``, 1, 3 -> ``model-00001-of-00003.safetensors``."""
    return f"{filename.removesuffix('.safetensors')}-{index:05d}-of-{count:05d}.safetensors"


def build_index(weight_map: Mapping[str, str], total_size: int) -> dict[str, Any]:
    """The index document: ``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``."""
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


def shard_files(index: Mapping[str, Any]) -> list[str]:
    """The shard files an index refers to, in name order; ``ValueError`` if it is malformed."""
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError("the index has no weight_map of tensor name to shard file")
    files = sorted(set(weight_map.values()))
    for name in files:
        if "/" in name or name.startswith("."):
            raise ValueError(f"the index refers to {name!r}, which is not a file of this checkpoint")
    return files


def item_files(filenames: Iterable[str], filename: str) -> list[str]:
    """The files of a checkpoint that hold the item stored as ``filename``: ``[filename]`` itself,
    or its index followed by its shards, found by name among ``filenames``."""
    names = set(filenames)
    if filename in names:
        return [filename]
    index = index_name(filename)
    stem = filename.removesuffix(".safetensors")
    found = sorted(name for name in names if (match := _SHARD.match(name)) is not None and match["stem"] == stem)
    return ([index] if index in names else []) + found
