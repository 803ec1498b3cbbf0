"""One manager per ``local_dir``: an OS file lock that a live manager holds on its ``local_dir``.

Two managers draining one ``local_dir`` would upload, prune and journal over each other, so the
second one (in this process or another) is refused with what to do instead. The lock is an OS lock
(``flock``), so a process that dies, even by ``kill -9``, releases it: it never blocks the next
manager.
"""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from ..errors import ConfigurationError

LOCK_FILE = ".manager.lock"


class LocalDirLock:
    """The lock of one ``local_dir``, held by at most one live manager."""

    def __init__(self, local_dir: str | os.PathLike[str]) -> None:
        self.local_dir = Path(local_dir)
        self._lock = filelock.FileLock(self.local_dir / LOCK_FILE, timeout=0, thread_local=False)

    def hold(self) -> None:
        """Take the lock unless this manager holds it; :class:`ConfigurationError` when another does."""
        if self._lock.is_locked:
            return
        self.local_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise ConfigurationError(
                f"local_dir {self.local_dir} is in use by another live CheckpointManager (in this process or "
                "another). Close that manager first (manager.close()), or give this one a local_dir of its own; "
                "in a distributed job every rank needs its own, such as local_dir=f'/local/nvme/run/rank{rank}'"
            ) from None

    def release(self) -> None:
        """Give the lock up (a no-op when this manager does not hold it)."""
        self._lock.release(force=True)
