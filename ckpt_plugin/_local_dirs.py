"""Local directories written beside checkpoints: an exported model, the links and resume markers
a framework's own resume looks for.

Each operation is atomic on a POSIX file system: a directory appears whole through one rename
(:func:`publish_dir`), a link is replaced in one rename (:func:`set_link`), and what a link points
to is never touched by removing it (:func:`remove_link`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ._storage import LocalStore, remove_link, set_link, symlinks


def publish_dir(parent: Path, name: str, fill: Callable[[Path], object]) -> Path:
    """Create ``parent/name`` whole: ``fill`` writes its files into a hidden staging directory,
    which is then renamed into place (an existing ``name`` is replaced only as the store's
    publish allows). On any error the staging directory is removed and the error raised."""
    store = LocalStore(parent)
    store.ensure_writable()
    staging = store.staging_dir(name)
    try:
        fill(staging)
        return store.publish(staging, name)
    except BaseException:
        store.discard(staging)
        raise


def remove_dirs(parent: Path, doomed: Callable[[str, str], bool]) -> None:
    """Remove each visible entry of ``parent`` for which ``doomed(name, path)`` is true."""
    store = LocalStore(parent)
    for entry in list(store.entries()):
        if doomed(entry.name, entry.path):
            store.remove(entry.name)


__all__ = ["publish_dir", "remove_dirs", "remove_link", "set_link", "symlinks"]
