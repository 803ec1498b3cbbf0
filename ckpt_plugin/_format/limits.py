"""How many bytes each kind of file in a checkpoint tree may have, in one place. No I/O.

Every read of a checkpoint tree passes the guarded opener (:mod:`ckpt_plugin._storage.door`), which
looks up the cap of the file's kind here by its name, refuses a larger file before reading it, and
never reads more than the cap even from a file that grows while it is read. The caps are far above
what ckpt_plugin writes, so they only ever stop damage or an attack.

Tensor files have no cap of their own: they are bounded by the size ``metadata.json`` records for
them, and their safetensors header by :data:`ckpt_plugin._format.tensorformat.HEADER_LIMIT`.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

UNRECORDED_TENSOR_FILE_BYTES = 2**63 - 1
"""The cap of a tensor file read without a recorded size (``verify=False``): none but the file's own,
which a private memory map locally, or a buffer of the object's size remotely, holds."""

DEFAULT_DOCUMENT_BYTES = 64 * MiB
"""The cap of a document of a kind not named in :data:`DOCUMENT_CAPS` (an index, a trainer state)."""

DOCUMENT_CAPS: dict[str, int] = {
    "metadata.json": 16 * MiB,  # epoch, metrics, config and a record per file
    "state.json": 64 * MiB,  # the skeleton of every item, one entry per optimizer parameter
    "sharding.json": 64 * MiB,  # one entry per chunk of every rank
    ".listing.json": 64 * MiB,  # one summary per checkpoint of the directory
    "validation.json": 16 * MiB,  # a registry version's record
    "model.json": 4 * MiB,  # the production record (locally) or pointer (on an object store)
    "history.jsonl": 256 * MiB,  # the registry's history: grows with every promotion
    ".saves.jsonl": 256 * MiB,  # the save log: grows with every save
    "model.sig": 64 * MiB,  # a signature bundle, one digest per file
}
"""The cap of each document kind, by file name."""


def cap_for(location: str) -> int:
    """The most bytes the file at ``location`` (a path or URL; its last component decides) may have."""
    name = location.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return DOCUMENT_CAPS.get(name, DEFAULT_DOCUMENT_BYTES)
