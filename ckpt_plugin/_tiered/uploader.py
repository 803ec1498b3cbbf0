"""The background uploader: one thread that drains the pending journal, oldest save first.

Each pending save is handed to an ``upload(name, seq)`` callable (which copies it, commits it on
the durable tier, marks it done in the journal and applies retention). A failure of the store is
retried with exponential backoff; a failure that retrying cannot mend (a damaged local copy, a
missing signing key) is not. When the retries are spent the uploader stops, keeping every save
pending, and holds an :class:`~ckpt_plugin.errors.UploadError`: the next :meth:`Uploader.raise_failure`,
:meth:`Uploader.wait` or :meth:`Uploader.wait_for_room` raises it (once), and uploading resumes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import (
    ConfigurationError,
    CorruptCheckpointError,
    EncodingError,
    ForeignFileError,
    IncompatibleCheckpointError,
    SignatureError,
    UploadError,
)
from .journal import PendingJournal

PERMANENT = (ConfigurationError, CorruptCheckpointError, EncodingError, ForeignFileError, IncompatibleCheckpointError, SignatureError)
"""Failures that a retry cannot mend: raised at once instead of retried."""


class Uploader:
    """Uploads the journal's pending saves in save order on one background thread.

    ``attempts`` tries per save, waiting ``backoff`` seconds after the first failure and twice as
    long after each next one, at most ``max_backoff``.
    """

    def __init__(
        self,
        journal: PendingJournal,
        upload: Callable[[str, int], None],
        *,
        ready: Callable[[str, int], bool] = lambda name, seq: True,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.journal = journal
        self._upload = upload
        self._ready = ready
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._cond = threading.Condition()
        self._failure: UploadError | None = None
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        """Start uploading what the journal holds (call after each journal entry)."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="ckpt-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def raise_failure(self) -> None:
        """Raise the upload failure held since the last call, if any, and resume uploading."""
        with self._cond:
            failure, self._failure = self._failure, None
            self._cond.notify_all()
        if failure is not None:
            raise failure

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending; raise a failure instead. False when ``timeout`` passed."""
        return self.wait_for_room(0, timeout)

    def wait_for_room(self, limit: int, timeout: float | None = None) -> bool:
        """Block until at most ``limit`` saves are pending (the oldest uploads finish first); raise
        the failure that stops the uploads instead. False when ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.kick()
        with self._cond:
            while self._failure is None and len(self.journal) > limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        self.raise_failure()
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the thread after the upload in progress (what is pending stays in the journal)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def busy(self) -> bool:
        """Whether an upload is in progress now."""
        with self._cond:
            return self._busy

    def _next(self) -> tuple[str, int] | None:
        with self._cond:
            while not self._stopping and (self._failure is not None or (task := self._first()) is None):
                self._cond.wait()
            if self._stopping:
                return None
            self._busy = True
            return task

    def _first(self) -> tuple[str, int] | None:
        """The oldest pending save, once it is ready (its local commit is not still in progress)."""
        pending = self.journal.pending()
        return pending[0] if pending and self._ready(*pending[0]) else None

    def _run(self) -> None:
        while (task := self._next()) is not None:
            try:
                self._with_retries(*task)
            except BaseException as exc:  # noqa: BLE001 - held and raised to the caller, never lost
                failure = UploadError(
                    f"could not upload {task[0]} to the durable tier ({type(exc).__name__}: {exc}); it stays in "
                    "local_dir and its upload is tried again"
                )
                failure.__cause__ = exc
                with self._cond:
                    self._failure = failure
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _with_retries(self, name: str, seq: int) -> None:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                self._upload(name, seq)
                return
            except PERMANENT:
                raise
            except Exception:
                if attempt == self.attempts:
                    raise
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, timeout=delay):
                    raise UploadError(f"the upload of {name} was stopped")
            delay = min(delay * 2, self.max_backoff)
