"""What ``metadata.json`` records of every file: its size and checksum. No I/O.

The write path hashes the bytes it streams with :func:`new_hasher` and records
:func:`format_checksum`; the read path recomputes it and compares. :data:`METADATA_FILE` is the
manifest that holds these records, written last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import xxhash

CHECKSUM_ALGORITHM = "xxh3_64"
METADATA_FILE = "metadata.json"
"""The manifest of a checkpoint, written last: its presence is what commits a checkpoint."""


@dataclass(frozen=True)
class FileRecord:
    """The size and checksum of one file of a checkpoint, as recorded in ``metadata.json``."""

    size: int
    checksum: str

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "checksum": self.checksum}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FileRecord:
        return cls(int(data["size"]), str(data["checksum"]))  # type: ignore[arg-type]


def new_hasher() -> xxhash.xxh3_64:
    """A fresh hasher of the recorded checksum algorithm."""
    return xxhash.xxh3_64()


def format_checksum(hasher: xxhash.xxh3_64) -> str:
    """The recorded checksum string of everything ``hasher`` was given."""
    return f"{CHECKSUM_ALGORITHM}:{hasher.hexdigest()}"


def checksum_bytes(data: bytes | memoryview) -> str:
    """The recorded checksum string of ``data``."""
    return format_checksum(xxhash.xxh3_64(data))
