"""What a checkpoint is on disk: its name, its files, and its ``metadata.json``. No I/O.

Format version 1, one directory per checkpoint::

    epoch_100/                  or epoch_100_step_2000/ when a step was given
      model.safetensors         the model's tensors (tied weights once), plain safetensors
      optimizer.safetensors     the optimizer's tensors, when it has any
      state.safetensors         tensors of the scheduler, RNG states and ``extra``, when any
      state.json                the non-tensor skeleton of every item
      metadata.json             epoch, step, metrics, config, provenance, and every file's size
                                and checksum; written last

A sharded checkpoint (saved by every rank of an FSDP / DTensor job) has no ``model.safetensors``
nor ``optimizer.safetensors``: each rank's chunks are in ``model-r{rank}-of-{N}.safetensors`` and
``optim-r{rank}-of-{N}.safetensors``, their layout in ``sharding.json`` (see
:mod:`ckpt_plugin._distributed.layout`), and ``state.json`` marks those items ``{"sharded": true}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import codec, documents
from .names import CHECKPOINT_NAME, is_checkpoint_name
from .records import METADATA_FILE, FileRecord, checksum_bytes

FORMAT_NAME = documents.CHECKPOINT_FORMAT
FORMAT_VERSION = 1
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_TENSORS_FILE = "state.safetensors"
ITEM_FILES = {"model": MODEL_FILE, "optimizer": OPTIMIZER_FILE}
NAME_PATTERN = CHECKPOINT_NAME
"""The grammar of checkpoint names (:data:`ckpt_plugin._format.names.CHECKPOINT_NAME`): use ``fullmatch``."""
METADATA_CHECKSUM_KEY = "metadata_checksum"
SHARDING_FILE = "sharding.json"
SIGNATURE_FILE = "model.sig"
"""The signature bundle of a signed checkpoint or registry version (see :mod:`ckpt_plugin.signing`)."""


def looks_like_checkpoint(name: str) -> bool:
    """Whether ``name`` is exactly one a manager would give a checkpoint directory."""
    return is_checkpoint_name(name)


def item_file(item: str) -> str:
    """The safetensors file that holds the tensors of ``item``."""
    return ITEM_FILES.get(item, EXTRA_TENSORS_FILE)


def item_prefix(item: str) -> str:
    """The prefix of ``item``'s tensor names inside its file (items sharing a file are namespaced)."""
    return "" if item in ITEM_FILES else f"{item}/"


def build_metadata(
    *,
    epoch: int,
    step: int | None,
    metrics: Mapping[str, Any],
    metric_for_best: str | None,
    mode: str,
    config: Any,
    provenance: Mapping[str, Any],
    items: list[str],
    files: Mapping[str, FileRecord],
    sharding: Mapping[str, Any] | None = None,
    transaction: str | None = None,
) -> dict[str, Any]:
    """The content of ``metadata.json``; ``config`` and ``metrics`` must already be JSON-encoded.

    ``transaction`` is the id of the object-store transaction the checkpoint commits in (None
    locally): the manifest names its own prefix, so that a copy of it elsewhere is told apart.
    The last key, ``metadata_checksum``, is the checksum of the compact JSON of all the others,
    so that damage to ``metadata.json`` itself is detected too.
    """
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        "metric_for_best": metric_for_best,
        "mode": mode,
        "config": config,
        "metadata": dict(provenance),
        "items": items,
        "files": {name: record.to_json() for name, record in files.items()},
    }
    if sharding is not None:
        document["sharding"] = dict(sharding)
    if transaction is not None:
        document["transaction"] = transaction
    document[METADATA_CHECKSUM_KEY] = metadata_checksum(document)
    return document


def metadata_checksum(document: Mapping[str, Any]) -> str:
    """The checksum a ``metadata.json`` document records of itself (of every key but that one)."""
    return checksum_bytes(codec.dumps({key: value for key, value in document.items() if key != METADATA_CHECKSUM_KEY}))
