"""The save pipeline: snapshot the state, write its files, commit them as one checkpoint.

``take_snapshot`` is the only step that must hold training: it splits each state tree into a
JSON skeleton and the tensors it references. ``write_snapshot`` streams those tensors to a hidden
staging directory, writes the JSON, and commits the directory atomically. Keeping the two apart
lets an asynchronous save run the second on a background worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .._format import codec, shards
from .._format.layout import (
    EXTRA_TENSORS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDING_FILE,
    STATE_FILE,
    build_metadata,
    item_file,
    item_prefix,
)
from .._format.names import checkpoint_name, is_plain_file_name
from .._format.records import METADATA_FILE, FileRecord
from .._storage import LOCAL, Backend, BeforeCommit, Commit, Transaction
from .files import write_bytes_file, write_tensor_file
from .info import CheckpointInfo, as_path

if TYPE_CHECKING:
    import torch

SAFETENSORS_METADATA = {"format": "pt"}
MODEL_INDEX_FILE = shards.index_name(MODEL_FILE)


@dataclass
class Snapshot:
    """Everything one checkpoint will hold, split into JSON skeletons and tensors."""

    epoch: int
    step: int | None
    metrics: dict[str, Any]
    config: Any
    metric_for_best: str | None
    mode: str
    provenance: dict[str, Any]
    items: dict[str, tuple[Any, dict[str, torch.Tensor]]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    pending_provenance: Future[dict[str, Any]] | None = None
    """Provenance entries still being gathered (git), folded in before ``metadata.json`` is written."""
    sharded: ShardedPart | None = None

    @property
    def name(self) -> str:
        return checkpoint_name(self.epoch, self.step)

    def tensors_by_file(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors to write, grouped by file; ``model.safetensors`` is always present."""
        sharded_model = self.sharded is not None and "model" in self.sharded.items
        files: dict[str, dict[str, torch.Tensor]] = {} if sharded_model else {MODEL_FILE: {}}
        for item, (_, tensors) in self.items.items():
            if not tensors:
                continue
            group = files.setdefault(item_file(item), {})
            prefix = item_prefix(item)
            group.update({prefix + name: tensor for name, tensor in tensors.items()})
        return files

    def state_document(self) -> dict[str, Any]:
        """The content of ``state.json``: each item's skeleton and where its tensors are.

        An item of a sharded checkpoint is marked ``{"sharded": true}``: ``sharding.json`` holds it.
        """
        items: dict[str, Any] = {item: {"sharded": True} for item in (self.sharded.items if self.sharded else ())}
        for item, (skeleton, tensors) in self.items.items():
            items[item] = {"file": item_file(item) if tensors else None, "prefix": item_prefix(item), "tree": skeleton}
        return {"items": items}

    def item_names(self) -> list[str]:
        return [*(self.sharded.items if self.sharded else ()), *self.items]


@dataclass
class ShardedPart:
    """The part of a checkpoint that every rank wrote: the items in ``sharding.json`` and the
    records of the files already under the transaction's prefix."""

    items: list[str]
    files: dict[str, FileRecord]
    world_size: int


def take_snapshot(
    states: Mapping[str, Any],
    *,
    epoch: int,
    step: int | None,
    metrics: dict[str, Any],
    config: Any,
    metric_for_best: str | None,
    mode: str,
    provenance: dict[str, Any],
    files: Mapping[str, bytes] | None = None,
) -> Snapshot:
    """Encode every state tree in ``states`` (``model``, ``optimizer``, ...; None values skipped).

    ``files`` are extra files to write as they are (name to bytes). Raises
    :class:`~ckpt_plugin.errors.EncodingError` naming the key path of any value that cannot be
    stored, or :class:`~ckpt_plugin.errors.ConfigurationError` for a bad extra file; nothing has
    touched the disk by then.
    """
    snapshot = Snapshot(
        epoch=epoch,
        step=step,
        metrics=codec.to_json(metrics, "metrics"),
        config=codec.to_json(config, "config"),
        metric_for_best=metric_for_best,
        mode=mode,
        provenance=codec.to_json(provenance, "metadata"),
        files=_extra_files(files),
    )
    for item, tree in states.items():
        if tree is not None:
            snapshot.items[item] = codec.encode(tree, item)
    return snapshot


ModelWriter = Callable[[Backend, str, "dict[str, torch.Tensor]", dict[str, FileRecord], dict[str, Any]], None]
"""Writes the model's tensors under a transaction's prefix (through the backend), adding each file it
makes to the file records and noting in the ``state.json`` document where the model now lives."""


def write_snapshot(
    store: Commit,
    snapshot: Snapshot,
    write_model: ModelWriter | None = None,
    before_commit: BeforeCommit | None = None,
    *,
    txn: Transaction | None = None,
) -> CheckpointInfo:
    """Write ``snapshot`` under a fresh transaction and commit it; on any failure leave nothing behind.

    ``write_model`` replaces the plain ``model.safetensors`` writer (the incremental writer shards the
    model and reuses unchanged shards); every other step, the commit included, is shared.
    ``before_commit`` (to sign the checkpoint, say) is called once every file is under the
    transaction's prefix, with the backend, the prefix, and the files the commit itself will write
    (name to bytes: ``metadata.json`` on an object store, where writing it is the commit; nothing
    locally, where it is written before the directory is renamed into place). What it writes under
    the prefix commits with the checkpoint. ``txn`` is a transaction begun on ``store`` whose prefix
    already holds files (those of ``snapshot.sharded``, written by every rank); it is committed here.
    """
    backend = store.backend
    txn = store.begin(snapshot.name) if txn is None else txn
    try:
        files: dict[str, FileRecord] = dict(snapshot.sharded.files) if snapshot.sharded else {}
        document = snapshot.state_document()
        for filename, tensors in snapshot.tensors_by_file().items():
            if filename == MODEL_FILE and write_model is not None:
                write_model(backend, txn.prefix, tensors, files, document)
            else:
                files[filename] = write_tensor_file(
                    backend.join(txn.prefix, filename), tensors, SAFETENSORS_METADATA, backend=backend
                )
        for filename, data in snapshot.files.items():
            files[filename] = write_bytes_file(backend.join(txn.prefix, filename), data, backend=backend)
        files[STATE_FILE] = write_bytes_file(backend.join(txn.prefix, STATE_FILE), codec.dumps(document), backend=backend)
        if snapshot.pending_provenance is not None:
            snapshot.provenance.update(codec.to_json(snapshot.pending_provenance.result(), "metadata"))
            snapshot.pending_provenance = None
        metadata = build_metadata(
            epoch=snapshot.epoch,
            step=snapshot.step,
            metrics=snapshot.metrics,
            metric_for_best=snapshot.metric_for_best,
            mode=snapshot.mode,
            config=snapshot.config,
            provenance=snapshot.provenance,
            items=snapshot.item_names(),
            files=files,
            sharding={"world_size": snapshot.sharded.world_size} if snapshot.sharded else None,
            transaction=txn.id,
        )
        manifest = codec.dumps(metadata)
        location = store.commit(txn, manifest, before_commit)
    except BaseException:
        store.abort(txn)
        raise
    return snapshot_info(location, snapshot, files, backend)


def snapshot_info(
    location: str | Path, snapshot: Snapshot, files: dict[str, FileRecord] | None = None, backend: Backend = LOCAL
) -> CheckpointInfo:
    """The record of ``snapshot`` committed at ``location`` (``files`` empty while it is still being written)."""
    return CheckpointInfo(
        path=as_path(location),
        epoch=snapshot.epoch,
        step=snapshot.step,
        metrics=codec.from_json(snapshot.metrics),
        metric_for_best=snapshot.metric_for_best,
        mode=snapshot.mode,
        timestamp=snapshot.provenance.get("timestamp"),
        files=dict(files or {}),
        items=tuple(snapshot.item_names()),
        backend=backend,
    )


RESERVED_FILES = frozenset(
    {METADATA_FILE, STATE_FILE, MODEL_FILE, MODEL_INDEX_FILE, OPTIMIZER_FILE, EXTRA_TENSORS_FILE, SHARDING_FILE}
)


def _extra_files(files: Mapping[str, bytes] | None) -> dict[str, bytes]:
    """Check the extra files of a save: plain, unreserved names and bytes (or str, as UTF-8)."""
    checked: dict[str, bytes] = {}
    for name, data in (files or {}).items():
        if not is_plain_file_name(name):
            raise ConfigurationError(
                f"extra file name {name!r} must be a plain file name, without a directory or leading dot"
            )
        if name in RESERVED_FILES or name.endswith(".safetensors"):
            raise ConfigurationError(
                f"extra file name {name!r} is reserved for the checkpoint's own files; choose another name"
            )
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigurationError(f"extra file {name!r} must be bytes or str, not {type(data).__name__}")
        checked[name] = bytes(data)
    return checked
