"""Provenance recorded with every checkpoint: when, from which code, on which machine."""

from __future__ import annotations

import datetime
import functools
import platform
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    from importlib import metadata as importlib_metadata

    import torch  # a save has imported it already

    from ._version import __version__

    try:
        safetensors_version: str | None = importlib_metadata.version("safetensors")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - a core dependency
        safetensors_version = None
    return {
        "torch_version": torch.__version__,
        "safetensors_version": safetensors_version,
        "ckpt_plugin_version": __version__,
    }


def git_state(cwd: str | None = None) -> tuple[str | None, bool | None]:
    """The commit hash of the repository holding ``cwd`` and whether its tree is dirty.

    Returns ``(None, None)`` outside a repository or where git is not installed.
    """

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(("git", *args), cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head.strip(), (bool(status.strip()) if status is not None else None)


def utc_timestamp() -> str:
    """The current time in ISO 8601, UTC, e.g. ``2026-11-26T10:30:00.123456+00:00``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def git_provenance(cwd: str | None = None) -> dict[str, Any]:
    """The ``git_hash`` and ``git_dirty`` entries of :func:`provenance`, for the repository holding ``cwd``."""
    git_hash, git_dirty = git_state(cwd)
    return {"git_hash": git_hash, "git_dirty": git_dirty}


def git_provenance_in_background(cwd: str | None = None) -> Future[dict[str, Any]]:
    """Start :func:`git_provenance` on a short-lived thread, so that the ``git`` calls run while a
    save writes its files; the future holds the entries."""
    future: Future[dict[str, Any]] = Future()

    def run() -> None:
        try:
            future.set_result(git_provenance(cwd))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
            future.set_exception(exc)

    threading.Thread(target=run, name="ckpt-git", daemon=True).start()
    return future


def provenance(*, git: bool = True) -> dict[str, Any]:
    """Everything needed to trace a checkpoint back to the run that wrote it.

    With ``git=False`` the git entries are left None, to be filled in later with
    :func:`git_provenance` (an asynchronous save asks git on its background thread, a synchronous
    one while it writes its files).
    """
    return {
        "timestamp": utc_timestamp(),
        **(git_provenance() if git else {"git_hash": None, "git_dirty": None}),
        "python_version": platform.python_version(),
        **_library_versions(),
        "hostname": socket.gethostname(),
        "command": list(sys.argv),
    }
