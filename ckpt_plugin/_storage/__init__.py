"""Everything that touches bytes on a device, behind one interface (:mod:`.base`).

- :mod:`.local`: the local file system, with the rename commit (``renameat2``, fsync, hard links,
  ``preadv``, private memory maps).
- :mod:`.fsspec`: object stores and any other fsspec URL, with the manifest commit.
- :mod:`.faults`: a wrapper that injects failures into any backend, for tests.

:func:`open_store` picks one from a location: a URL (``scheme://...``) goes to fsspec, anything
else is a local path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .._format.records import FileRecord, checksum_bytes
from .base import Backend, BeforeCommit, Commit, Entry, Sink, Transaction, with_backend
from .fsspec import STALE_SECONDS, is_url, new_transaction_id, remove_leftovers
from .location import Location
from .local import (
    CHUNK_BYTES,
    LOCAL,
    STAGING_PREFIX,
    LocalBackend,
    LocalStore,
    append_line,
    directory_identity,
    fsync_dir,
    publish_file,
    publish_made,
    remove_link,
    set_link,
    symlinks,
    temporary_path,
)


def open_store(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Any:
    """The :class:`Commit` (with its ``backend``) for a checkpoint directory or URL.

    ``storage_options`` are passed to fsspec for URLs (credentials, ``endpoint_url``, ``client_kwargs``
    and so on); with none, the store's standard environment applies (for S3: ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``).
    """
    if is_url(location):
        from .fsspec import ManifestStore

        return ManifestStore(str(location), storage_options)
    if storage_options:
        from ..errors import ConfigurationError

        raise ConfigurationError(
            f"storage_options only apply to URLs such as s3://bucket/run; {location} is a local path"
        )
    return LocalStore(location)


def backend_of(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Backend:
    """The backend that reaches ``location`` (a URL or a local path)."""
    if is_url(location):
        from .fsspec import FsspecBackend

        return FsspecBackend(str(location), storage_options)
    return LOCAL


__all__ = [
    "CHUNK_BYTES",
    "LOCAL",
    "STAGING_PREFIX",
    "STALE_SECONDS",
    "Backend",
    "BeforeCommit",
    "Commit",
    "Entry",
    "FileRecord",
    "LocalBackend",
    "LocalStore",
    "Location",
    "Sink",
    "Transaction",
    "append_line",
    "backend_of",
    "checksum_bytes",
    "directory_identity",
    "fsync_dir",
    "is_url",
    "new_transaction_id",
    "open_store",
    "publish_file",
    "remove_leftovers",
    "remove_link",
    "set_link",
    "symlinks",
    "temporary_path",
    "with_backend",
]
