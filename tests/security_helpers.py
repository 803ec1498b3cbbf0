"""Crafting hostile checkpoints: edit a document and re-record every checksum, as an attacker would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ckpt_plugin._checkpoint import METADATA_CHECKSUM_KEY, METADATA_FILE, metadata_checksum
from ckpt_plugin._format import documents
from ckpt_plugin._storage import checksum_bytes


def read_doc(path: Path) -> Any:
    return json.loads(path.read_bytes())


def write_raw(path: Path, data: bytes) -> None:
    """Replace ``path`` by a new file (new inode), as a tool that saves a copy does."""
    temporary = path.with_name(path.name + ".edit")
    temporary.write_bytes(data)
    temporary.replace(path)


def reseal_metadata(directory: Path, edit: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Apply ``edit`` to ``metadata.json`` and record its checksum again."""
    metadata = read_doc(directory / METADATA_FILE)
    if edit is not None:
        edit(metadata)
    metadata[METADATA_CHECKSUM_KEY] = metadata_checksum(metadata)
    write_raw(directory / METADATA_FILE, json.dumps(metadata).encode())
    return metadata


def replace_file(directory: Path, filename: str, data: bytes, *, record_as: str | None = None) -> None:
    """Write ``data`` as ``filename`` and record its size and checksum in ``metadata.json`` (under
    ``record_as`` when given, to name a file that is not where the data is)."""
    write_raw(directory / filename, data)

    def record(metadata: dict[str, Any]) -> None:
        metadata["files"][record_as or filename] = {"size": len(data), "checksum": checksum_bytes(data)}

    reseal_metadata(directory, record)


def edit_document(directory: Path, filename: str, edit: Callable[[Any], Any]) -> None:
    """Apply ``edit`` to the JSON document ``filename`` of a checkpoint (it may return a new root)."""
    document = read_doc(directory / filename)
    result = edit(document)
    document = document if result is None else result
    if filename == METADATA_FILE:
        write_raw(directory / filename, json.dumps(document).encode())
        reseal_metadata(directory)
        return
    replace_file(directory, filename, json.dumps(document).encode())


def reseal_record(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Edit a sealed record (``validation.json``, ``model.json``) and record its own checksum again."""
    document = read_doc(path)
    edit(document)
    write_raw(path, json.dumps(documents.seal(document)).encode())


def key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A fresh elliptic-curve key pair (P-256) as PEM files: ``(name.pem, name.pub)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
