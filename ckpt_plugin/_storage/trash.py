"""Delete hidden directories in the background, so that a save does not wait for an old one's unlink.

Retention and re-saves first rename the checkpoint they drop to a hidden name (``.trash.*``,
``.replaced.*`` or a swapped-out ``.tmp.*``), which takes it out of every listing at once. Only
then is the directory handed to :func:`dispose`, which removes its files on one daemon thread.
Unlinking a few hundred MiB of files costs tens of milliseconds of journal and allocator work that
no reader needs to wait for.

- **Crash-safe.** A directory handed over is already out of sight. If the process dies before
  it is gone, the next manager over the same directory finds it by its hidden name and removes
  it in :meth:`~ckpt_plugin._storage.LocalStore.recover`.
- **Bounded.** At most :data:`MAX_PENDING` directories wait; when the thread falls that far
  behind, the caller removes its directory itself.
- **Flushed.** :func:`drain` waits for every handed-over directory (``CheckpointManager.wait``
  and ``close`` call it), and interpreter exit waits up to :data:`EXIT_TIMEOUT_SECONDS`; what is
  left after that is left to recovery.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from collections import deque
from pathlib import Path

MAX_PENDING = 4
"""Directories that may wait for the thread; beyond that the caller deletes."""
IDLE_EXIT_SECONDS = 5.0
"""The thread ends after this long without work and starts again with the next directory."""
EXIT_TIMEOUT_SECONDS = 60.0
"""How long interpreter exit waits for pending deletions before leaving them to recovery."""


def remove_now(path: Path) -> None:
    """Make the rename that hid ``path`` durable, then remove ``path`` and everything under it.

    The parent is fsynced first so that no crash can bring back the name of a half-deleted
    directory; errors are ignored (a directory still there is removed by recovery later).
    """
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    if path.is_symlink():  # a linked checkpoint: remove the link, never what it points to
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class _Collector:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._pending: deque[Path] = deque()
        self._busy = 0
        self._thread: threading.Thread | None = None

    def dispose(self, path: Path) -> None:
        with self._condition:
            if len(self._pending) < MAX_PENDING:
                self._pending.append(path)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ckpt-trash", daemon=True)
                    self._thread.start()
                self._condition.notify_all()
                return
        remove_now(path)

    def _run(self) -> None:
        while True:
            with self._condition:
                if not self._condition.wait_for(lambda: self._pending, timeout=IDLE_EXIT_SECONDS):
                    self._thread = None
                    return
                path = self._pending.popleft()
                self._busy += 1
            try:
                remove_now(path)
            finally:
                with self._condition:
                    self._busy -= 1
                    self._condition.notify_all()

    def drain(self, timeout: float | None) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending and not self._busy, timeout=timeout)


_collector = _Collector()


def dispose(path: Path) -> None:
    """Remove the hidden directory ``path`` in the background (right away if too many are waiting)."""
    _collector.dispose(path)


def drain(timeout: float | None = None) -> bool:
    """Wait until every directory handed to :func:`dispose` is gone; False if ``timeout`` ran out."""
    return _collector.drain(timeout)


def _forget_after_fork() -> None:
    """A forked child has no deletion thread; what its parent had queued is the parent's to finish."""
    global _collector
    _collector = _Collector()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _drain_at_exit() -> None:
    drain(EXIT_TIMEOUT_SECONDS)
