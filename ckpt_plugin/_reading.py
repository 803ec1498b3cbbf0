"""Read a whole checkpoint, sharded items included.

:func:`ckpt_plugin._io.reader.read_checkpoint` with the consolidation of
:mod:`ckpt_plugin._distributed` plugged in as its sharded-item reader. The read path in ``io/``
sits below ``distributed/``, so it is given the reader instead of importing it.
"""

from __future__ import annotations

from typing import Any

from ._io import reader
from ._io.info import CheckpointInfo


def _consolidate(*args: Any, **options: Any) -> dict[str, Any]:
    from ._distributed.consolidate import read_sharded_items as consolidate  # loads torch.distributed

    return consolidate(*args, **options)


read_sharded_items: reader.ShardedReader = _consolidate
""":func:`ckpt_plugin._distributed.consolidate.read_sharded_items`, imported on first use."""


def read_checkpoint(info: CheckpointInfo, **options: Any) -> dict[str, Any]:
    """:func:`ckpt_plugin._io.reader.read_checkpoint` of ``info`` (same ``options``), reading sharded
    items through :func:`read_sharded_items`."""
    return reader.read_checkpoint(info, sharded_reader=read_sharded_items, **options)
