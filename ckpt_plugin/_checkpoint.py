"""The names this module has always offered, kept where tests and users import them.

What a checkpoint is on disk (its file names and its ``metadata.json``) is
:mod:`ckpt_plugin._format.layout`; :class:`CheckpointInfo` and :func:`parse_metadata` are
:mod:`ckpt_plugin._io.info`'s. Code inside the package imports them from there.
"""

from __future__ import annotations

from ._format.layout import (
    EXTRA_TENSORS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    ITEM_FILES,
    METADATA_CHECKSUM_KEY,
    MODEL_FILE,
    NAME_PATTERN,
    OPTIMIZER_FILE,
    SHARDING_FILE,
    STATE_FILE,
    build_metadata,
    item_file,
    item_prefix,
    looks_like_checkpoint,
    metadata_checksum,
)
from ._format.names import checkpoint_name
from ._format.records import METADATA_FILE
from ._io.info import CheckpointInfo, as_path, parse_metadata

__all__ = [
    "EXTRA_TENSORS_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEM_FILES",
    "METADATA_CHECKSUM_KEY",
    "METADATA_FILE",
    "MODEL_FILE",
    "NAME_PATTERN",
    "OPTIMIZER_FILE",
    "SHARDING_FILE",
    "STATE_FILE",
    "CheckpointInfo",
    "as_path",
    "build_metadata",
    "checkpoint_name",
    "item_file",
    "item_prefix",
    "looks_like_checkpoint",
    "metadata_checksum",
    "parse_metadata",
]
