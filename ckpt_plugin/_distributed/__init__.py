"""Sharded checkpoints for FSDP2 / DTensor models, with no pickle.

DCP (``torch.distributed.checkpoint``) plans who writes which chunk and how to reshard on load;
this package supplies its storage layer (:class:`SafetensorsWriter`, :class:`SafetensorsReader`)
and planners that store non-tensor values as JSON (:class:`JsonSavePlanner`,
:class:`JsonLoadPlanner`). :class:`~ckpt_plugin.CheckpointManager` uses them when
``torch.distributed`` is initialized and the state holds DTensors, on a local directory or an
object-store URL (:class:`BackendShardFiles` moves the bytes through any storage backend).
"""

from .dcp_storage import SafetensorsReader, SafetensorsWriter, read_full, read_sharding
from .files import BackendShardFiles, LocalShardFiles, ShardFiles
from .layout import SHARDING_FILE, Sharding
from .planners import JsonLoadPlanner, JsonSavePlanner

__all__ = [
    "BackendShardFiles",
    "JsonLoadPlanner",
    "JsonSavePlanner",
    "LocalShardFiles",
    "SHARDING_FILE",
    "SafetensorsReader",
    "SafetensorsWriter",
    "ShardFiles",
    "Sharding",
    "read_full",
    "read_sharding",
]
