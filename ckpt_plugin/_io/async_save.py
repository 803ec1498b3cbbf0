"""Asynchronous saves: take the snapshot now, write, commit and prune on a background thread.

:class:`AsyncSaver` wraps the synchronous pipeline rather than forking it. A save runs the same
``take snapshot -> write -> commit -> retention`` steps as a synchronous one; only the snapshot
happens on the caller's thread, and its tensors are first copied into a reused
:class:`~ckpt_plugin._io.staging.StagingBuffer`, so training may change its weights as soon as
``save`` returns.

- At most one save is in flight: a new save first waits for the previous one to finish.
- An error raised in the background is raised again by the next ``save``, ``wait`` or ``close``.
- Every live saver is flushed at interpreter exit, when the main thread ends and before thread
  pools stop taking work. A save that fails then is printed, and the process ends with a non-zero
  status. The exit hook holds savers only weakly, so a manager that is no longer referenced is not
  kept alive by it.
- Once the interpreter is exiting, a save runs on the calling thread and raises its own error.
- The background thread runs at a lower scheduling priority (``BACKGROUND_NICENESS``) where the
  system allows it, and the threads it starts inherit it. On a machine whose cores training keeps
  busy, the write then takes the time training leaves idle instead of stretching its steps; the
  write may take longer, and a save that comes before it ends waits for it.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import TypeVar

from .. import _interpreter_exit as interpreter_exit
from ..errors import AsyncSaveError, CheckpointError
from .._format.tensorformat import dtype_code
from .._storage import Commit
from .info import CheckpointInfo
from .staging import Staged, StagingBuffer
from .writer import Snapshot, snapshot_info

T = TypeVar("T")

BACKGROUND_NICENESS = 10
"""How much the background writer's niceness is raised (Linux per-thread ``setpriority``); 0 leaves it."""


class AsyncSaver:
    """Runs one background save at a time over a single reused staging buffer.

    Args:
        threads: threads that copy CPU tensors into the staging buffer (1 or 2; default: 2 where
            there is more than one core).
    """

    def __init__(self, threads: int | None = None) -> None:
        self.buffer = StagingBuffer(threads)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None
        self._error: BaseException | None = None
        self._pid = os.getpid()
        _LIVE.add(self)

    def save(self, take: Callable[[], Snapshot], write: Callable[[Snapshot], T]) -> Snapshot:
        """Wait for the previous save, run ``take`` and stage its tensors, then ``write`` in the background.

        Returns the snapshot once its tensors are staged. Raises the previous save's error, if
        it failed, before taking a new snapshot (that new save is then not made).
        """
        with self._lock:
            self._join()
            self._raise_pending()
            snapshot = take()
            staged = self._stage(snapshot)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-save")
            self._in_flight = interpreter_exit.submit(self._executor, self._run, write, snapshot, staged)
            if interpreter_exit.exiting():  # nobody is left to wait for it: finish it now
                self._join()
                self._raise_pending()
            return snapshot

    @property
    def writing(self) -> bool:
        """Whether a background save is still being written (a snapshot that does not block)."""
        in_flight = self._in_flight
        return in_flight is not None and not in_flight.done()

    def wait(self) -> None:
        """Block until the save in flight (if any) has committed; raise its error if it failed."""
        with self._lock:
            self._join()
            self._raise_pending()

    def drain(self) -> None:
        """Block until the save in flight (if any) has finished, leaving any error for later."""
        with self._lock:
            self._join()

    def close(self) -> None:
        """Flush like :meth:`wait`, then free the staging buffer and stop the background thread.

        The next save allocates and starts them again.
        """
        with self._lock:
            self._join()
            self.buffer.release()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._raise_pending()

    def _stage(self, snapshot: Snapshot) -> Staged:
        names = list(snapshot.items)
        for _, tensors in snapshot.items.values():
            for name, tensor in tensors.items():
                dtype_code(tensor.dtype, name)  # an unstorable dtype fails here, not in the background
        staged = self.buffer.stage([tensors for _, tensors in snapshot.items.values()])
        for item, copies in zip(names, staged.groups):
            snapshot.items[item] = (snapshot.items[item][0], copies)
        return staged

    def _run(self, write: Callable[[Snapshot], object], snapshot: Snapshot, staged: Staged) -> None:
        try:
            if threading.current_thread() is not threading.main_thread():  # not run inline at exit
                _lower_priority()
            staged.wait()
            write(snapshot)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's next save, wait or close
            self._error = exc

    def _join(self) -> None:
        if self._in_flight is not None:
            wait_for([self._in_flight])
            self._in_flight = None

    def _raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is None:
            return
        if isinstance(error, CheckpointError):
            raise error
        raise AsyncSaveError(
            f"a background save failed and was not committed ({type(error).__name__}: {error}); the "
            "checkpoints committed before it are intact. Fix the cause and save again"
        ) from error


_LIVE: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()
_lowered = threading.local()


def _lower_priority() -> None:
    """Raise the calling thread's niceness by ``BACKGROUND_NICENESS``, once per thread (the kernel
    cannot be asked to undo it: an unprivileged thread may only lower its own priority)."""
    if getattr(_lowered, "done", False) or not BACKGROUND_NICENESS or not sys.platform.startswith("linux"):
        return
    _lowered.done = True
    try:
        thread = threading.get_native_id()  # on Linux a thread id names that thread alone
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BACKGROUND_NICENESS))
    except OSError:  # not permitted here (a sandbox, say): the write runs at the usual priority
        pass


def _flush_at_exit() -> None:
    """Finish every save in flight; print each failure and make the exit status say it failed."""
    for saver in list(_LIVE):
        if saver._pid != os.getpid():
            continue
        try:
            saver.wait()
        except BaseException as exc:  # noqa: BLE001 - nobody is left to raise it to
            print("ckpt_plugin: a background checkpoint save failed at interpreter exit; it was not committed:", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
            interpreter_exit.fail_exit_status()


interpreter_exit.before_pools_stop(_flush_at_exit)


def pending_info(store: Commit, snapshot: Snapshot) -> CheckpointInfo:
    """What an asynchronous save returns: the record the checkpoint will have, without its files
    (on an object store, its location without the transaction suffix, which is not known yet)."""
    return snapshot_info(store.backend.join(str(store.root), snapshot.name), snapshot, backend=store.backend)
