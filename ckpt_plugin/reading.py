"""Read a whole checkpoint, sharded items included.

:func:`ckpt_plugin.io.reader.read_checkpoint` with the consolidation of
:mod:`ckpt_plugin.distributed` plugged in as its sharded-item reader. The read path in ``io/``
sits below ``distributed/``, so it is given the reader instead of importing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .format.records import FileRecord
from .io import reader
from .io.info import CheckpointInfo
from .storage import Backend


def read_sharded_items(
    location: Any,
    records: Mapping[str, FileRecord],
    items: Iterable[str],
    *,
    verify: bool = True,
    map_location: Any = None,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """:func:`ckpt_plugin.distributed.consolidate.read_sharded_items`, imported on first use
    (it loads ``torch.distributed``)."""
    from .distributed.consolidate import read_sharded_items as consolidate

    return consolidate(location, records, items, verify=verify, map_location=map_location, backend=backend)


def read_checkpoint(info: CheckpointInfo, **options: Any) -> dict[str, Any]:
    """:func:`ckpt_plugin.io.reader.read_checkpoint` of ``info`` (same ``options``), reading sharded
    items through :func:`read_sharded_items`."""
    return reader.read_checkpoint(info, sharded_reader=read_sharded_items, **options)
