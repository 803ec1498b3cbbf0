"""The documents the registry writes: validation records, production records and history events."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..errors import CorruptCheckpointError
from .._format import codec, documents
from .._format.records import METADATA_FILE, FileRecord
from .._io.info import CheckpointInfo
from .._metadata import utc_timestamp

if TYPE_CHECKING:
    import torch

    from .._storage import Backend

VALIDATION_FILE = "validation.json"
HISTORY_FILE = "history.jsonl"
INTENT_FILE = ".history-intent.json"
"""The event of the change being made, written before the change takes effect."""
LOCK_FILE = ".registry.lock"
PRODUCTION_MODEL_FILE = "model.safetensors"
PRODUCTION_RECORD_FILE = "model.json"
VALIDATED_FORMAT = "ckpt_plugin.validated"
PRODUCTION_FORMAT = "ckpt_plugin.production"
PRODUCTION_FILES = frozenset({PRODUCTION_MODEL_FILE, PRODUCTION_RECORD_FILE})
"""Everything a local promotion writes into ``production/``."""
FORMAT_VERSION = 1


@dataclass
class ProductionSource:
    """What a promotion takes from a validated version."""

    version: Version
    directory: str
    validation: dict[str, Any]
    config: Any
    files: dict[str, FileRecord]
    model_tree: Any
    consolidated: dict[str, torch.Tensor] | None = None
    """A sharded checkpoint's model joined into full tensors: production holds the full weights."""


@dataclass
class SignedVersion:
    """A validated version's documents as its signature covers them."""

    directory: str
    copy: Backend
    where: str
    validation: dict[str, Any]
    metadata: dict[str, Any]
    model_tree: Any
    weights: FileRecord


def actor() -> dict[str, str]:
    """Who makes a change: the user and the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER variable, e.g. in some containers
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname()}


def event(name: str, version: Version | str, *, time: str, **fields: Any) -> dict[str, Any]:
    """A history event; ``time`` is the one the change records (``validated_at`` or
    ``promoted_at``), which orders the history and tells whether the change took effect."""
    return {"time": time, "event": name, "version": str(version), **fields, **actor()}


def source_entry(info: CheckpointInfo, metadata: FileRecord, path: str) -> dict[str, Any]:
    """The ``source`` of a validation record: the raw checkpoint at ``path`` (absolute)."""
    return {
        "path": path,
        "name": info.name,
        "epoch": info.epoch,
        "step": info.step,
        "checksum": metadata.checksum,
        "saved_at": info.timestamp,
    }


def validation_record(
    version: Version, info: CheckpointInfo, files: Mapping[str, FileRecord], results: list[dict[str, Any]], source_path: str
) -> dict[str, Any]:
    """The (unsealed) ``validation.json`` of ``version`` made from checkpoint ``info``."""
    return {
        "format": VALIDATED_FORMAT,
        "format_version": FORMAT_VERSION,
        "version": str(version),
        "source": source_entry(info, files[METADATA_FILE], source_path),
        "metrics": codec.to_json(info.metrics, "metrics"),
        "metric_for_best": info.metric_for_best,
        "mode": info.mode,
        "checks": results,
        "files": {name: file.to_json() for name, file in files.items()},
        "validated_at": utc_timestamp(),
        "validated_by": actor(),
    }


def production_record(
    source: ProductionSource, validated_path: str, previous_versions: list[str], weights: str, record: FileRecord
) -> dict[str, Any]:
    """The sealed production record of ``source`` whose weights are the file ``weights``."""
    validation = source.validation
    document = {
        "format": PRODUCTION_FORMAT,
        "format_version": FORMAT_VERSION,
        "version": str(source.version),
        "source": {**validation["source"], "validated_path": validated_path},
        "metrics": validation["metrics"],
        "metric_for_best": validation["metric_for_best"],
        "mode": validation["mode"],
        "checks": validation["checks"],
        "files": {PRODUCTION_MODEL_FILE: record.to_json()},
        "tied": aliases(source.model_tree),
        "config": source.config,
        "validated_at": validation["validated_at"],
        "validated_by": validation["validated_by"],
        "promoted_at": utc_timestamp(),
        "promoted_by": actor(),
        "previous_versions": previous_versions,
        "model": source.model_tree,
    }
    if weights != PRODUCTION_MODEL_FILE:
        document["weights"] = weights
    return documents.seal(document)


def file_record(document: Mapping[str, Any], filename: str, where: Any) -> FileRecord:
    """The record of ``filename`` in a validated document's ``files``; its absence is damage."""
    record = document["files"].get(filename)
    if record is None:
        raise CorruptCheckpointError(f"{where} records no checksum for {filename}; the record is damaged: validate the checkpoint again")
    return FileRecord.from_json(record)


def aliases(model_tree: Any) -> dict[str, str]:
    """Keys of a flat state dict whose tensor is stored under another key (tied weights)."""
    if not isinstance(model_tree, dict):
        return {}
    return {
        key: node[codec.TENSOR]
        for key, node in model_tree.items()
        if isinstance(node, dict) and node.get(codec.TENSOR) not in (None, key)
    }


def decoded(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored document as the API returns it: no seal, metrics and config decoded."""
    result = {key: value for key, value in document.items() if key != documents.SEAL_KEY}
    for key in ("metrics", "config"):
        if key in result:
            result[key] = codec.from_json(result[key])
    return result


def public(document: Mapping[str, Any]) -> dict[str, Any]:
    """A production record as :meth:`ArtifactRegistry.production` returns it (no layout tree)."""
    return decoded({key: value for key, value in document.items() if key not in ("model", documents.SEAL_KEY)})


def first_promotion(version: str, production_dir: Any) -> str:
    """Why a rollback from the first promoted version is refused, and what to do."""
    return (
        f"version {version} is the first one promoted to {production_dir}; there is nothing to roll back to: a rollback "
        "returns to the version promoted before the current one, so promote another version first"
    )
