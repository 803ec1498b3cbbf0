"""Sharded checkpoints for FSDP2 / DTensor models, with no pickle: the storage layer and planners
that ``torch.distributed.checkpoint`` (DCP) can use directly.

:class:`SafetensorsWriter` / :class:`SafetensorsReader` are a DCP ``StorageWriter`` /
``StorageReader`` that write and read safetensors shards plus a JSON ``sharding.json``;
:class:`JsonSavePlanner` / :class:`JsonLoadPlanner` store non-tensor values as JSON.
:class:`~ckpt_plugin.CheckpointManager` uses them itself when the state holds DTensors.
"""

from ._distributed import (
    SHARDING_FILE,
    BackendShardFiles,
    JsonLoadPlanner,
    JsonSavePlanner,
    LocalShardFiles,
    SafetensorsReader,
    SafetensorsWriter,
    ShardFiles,
    Sharding,
    read_full,
    read_sharding,
)

__all__ = [
    "SHARDING_FILE",
    "BackendShardFiles",
    "JsonLoadPlanner",
    "JsonSavePlanner",
    "LocalShardFiles",
    "SafetensorsReader",
    "SafetensorsWriter",
    "ShardFiles",
    "Sharding",
    "read_full",
    "read_sharding",
]
