"""One checkpoint by where it is, without a manager: :func:`info_at` finds it and
:func:`read_checkpoint` reads it, sharded items consolidated.

A framework adapter that is handed a checkpoint's path or URL (Lightning's ``ckpt_path``) uses
these; code that saves or lists checkpoints uses :class:`~ckpt_plugin.CheckpointManager`.
"""

from __future__ import annotations

import os

from ._format.records import METADATA_FILE
from ._io.info import CheckpointInfo
from ._io.reader import read_info
from ._reading import read_checkpoint
from ._storage import Location


def info_at(where: Location | str | os.PathLike[str]) -> CheckpointInfo | None:
    """The :class:`CheckpointInfo` of the checkpoint at ``where`` (a directory, or a prefix on an
    object store), or None when no committed checkpoint is there."""
    location = Location.of(where)
    backend = location.backend()
    root = str(location)
    if backend.fingerprint(backend.join(root, METADATA_FILE)) is None:
        return None
    return read_info(location.where, backend)


__all__ = ["info_at", "read_checkpoint"]
