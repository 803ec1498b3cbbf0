"""``Location``: where checkpoints live, decided once at the edge of the package.

A location is a local path or a URL together with the ``storage_options`` that reach it. It opens
the backend once and hands the same one to everything that reads or writes there, so one
manager, registry or plot makes one fsspec file system (and one reachability probe), not one
per call. Code above ``storage/`` receives a :class:`Location` and never looks at the string
again to decide between local and remote.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .base import Backend
from .fsspec import is_url


class Location:
    """A checkpoint directory or object-store prefix, with the options that reach it.

    Build one with :meth:`of` at the edge (a constructor, a CLI argument) and pass it down.
    """

    __slots__ = ("_backend", "_lock", "storage_options", "where")

    def __init__(self, where: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
                 _backend: Backend | None = None) -> None:
        if is_url(where):
            self.where: str | Path = str(where).rstrip("/")
        else:
            if storage_options:
                raise ConfigurationError(
                    f"storage_options only apply to URLs such as s3://bucket/run; {where} is a local path"
                )
            self.where = Path(where).expanduser()
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self._backend = _backend
        self._lock = threading.Lock()

    @classmethod
    def of(cls, where: Location | str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Location:
        """``where`` as a location: a :class:`Location` is returned as it is (``storage_options``
        must then be left out), anything else is read as a path or URL."""
        if isinstance(where, Location):
            if storage_options and dict(storage_options) != where.storage_options:
                raise ConfigurationError(
                    f"{where} already carries its storage_options; pass the options when the Location is made, not again"
                )
            return where
        return cls(where, storage_options)

    @property
    def remote(self) -> bool:
        """Whether this is an object-store URL (committed by manifest) rather than a local path."""
        return isinstance(self.where, str)

    @property
    def path(self) -> Path:
        """The local directory; a :class:`ConfigurationError` for a URL."""
        if isinstance(self.where, str):
            raise ConfigurationError(f"{self.where} is a URL, not a local directory")
        return self.where

    def local_dir(self) -> Path | None:
        """The local directory, or None for an object-store prefix (which has no directory of its own)."""
        return None if isinstance(self.where, str) else self.where

    def is_missing_directory(self) -> bool:
        """Whether this is a local path with no directory there. An object-store prefix is never
        missing: it exists once something is written below it, so only a listing can tell."""
        return not isinstance(self.where, str) and not self.where.is_dir()

    def same_place(self, other: Location | str | os.PathLike[str]) -> bool:
        """Whether ``other`` names this place: the same URL (trailing ``/`` aside), or the same
        directory once ``~`` and links are resolved."""
        other = other if isinstance(other, Location) else Location(other)
        if isinstance(self.where, str) or isinstance(other.where, str):
            return self.where == other.where
        return os.path.realpath(self.where) == os.path.realpath(other.where)

    def same_store(self, other: Location) -> bool:
        """Whether ``other`` is on the same kind of store: both URLs of one scheme, or both local."""
        if isinstance(self.where, str) and isinstance(other.where, str):
            return self.where.split("://", 1)[0] == other.where.split("://", 1)[0]
        return isinstance(self.where, str) == isinstance(other.where, str)

    def dated_by(self, name: str) -> str:
        """What carries this place's modification time: the directory itself, or on an object store
        (whose prefixes have no times) the object ``name`` inside it."""
        return f"{self.where}/{name}" if isinstance(self.where, str) else str(self.where)

    def backend(self) -> Backend:
        """The backend that reaches this location, opened on first use and then shared."""
        with self._lock:
            if self._backend is None:
                if isinstance(self.where, str):
                    from .fsspec import FsspecBackend

                    self._backend = FsspecBackend(self.where, self.storage_options)
                else:
                    from .local import LOCAL

                    self._backend = LOCAL
            return self._backend

    def commit_store(self) -> Any:
        """The :class:`~ckpt_plugin._storage.base.Commit` for checkpoints at this location: the rename
        commit for a directory, the manifest commit for a URL, over :meth:`backend`."""
        if isinstance(self.where, str):
            from .fsspec import ManifestStore

            return ManifestStore(self.where, backend=self.backend())  # type: ignore[arg-type]
        if self.where.exists() and not self.where.is_dir():
            raise ConfigurationError(f"checkpoint_dir {self.where} is a file, not a directory; choose another path")
        from .local import LocalStore

        return LocalStore(self.where)

    def child(self, *names: str) -> Location:
        """A location below this one (``run/validated`` from ``run``), sharing its backend."""
        if isinstance(self.where, str):
            url = "/".join([self.where, *names])
            return Location(url, self.storage_options, _backend=self._backend_if_open())
        return Location(self.where.joinpath(*names))

    def sibling(self, name: str) -> Location:
        """The location named ``name`` beside this one (``run/validated`` from ``run/checkpoints``)."""
        if isinstance(self.where, str):
            parent = self.where.rsplit("/", 1)[0]
            return Location(f"{parent}/{name}", self.storage_options, _backend=self._backend_if_open())
        return Location(self.where.parent / name)

    def _backend_if_open(self) -> Backend | None:
        with self._lock:
            return self._backend

    def __str__(self) -> str:
        return str(self.where)

    def __repr__(self) -> str:
        return f"Location({str(self.where)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Location):
            return NotImplemented
        return self.where == other.where and self.storage_options == other.storage_options

    def __hash__(self) -> int:
        return hash(self.where)

    def __getstate__(self) -> dict[str, Any]:  # sent to other ranks: the backend travels without its threads
        return {"where": self.where, "storage_options": self.storage_options, "_backend": self._backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.where = state["where"]
        self.storage_options = state["storage_options"]
        self._backend = state["_backend"]
        self._lock = threading.Lock()
