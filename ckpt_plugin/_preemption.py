"""Noticing that a scheduler wants the job gone: SIGTERM (Kubernetes, spot instances, SLURM) and SIGUSR1
(SLURM's warning signal, ``--signal=USR1@90``).

A :class:`PreemptionWatch` only records the signal; the training loop asks :attr:`~PreemptionWatch.requested`
between steps, saves, and stops. Nothing is saved inside the signal handler, which may run at any point
of a step. Framework-free: both training callbacks use it.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Sequence
from types import FrameType
from typing import Any

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class PreemptionWatch:
    """Records the preemption signals while installed, and puts the previous handlers back afterwards.

    While installed, the signals do not run the handlers they had before (a default SIGTERM handler
    would end the process before the checkpoint is written); :meth:`uninstall` restores them as they
    were. Installing is possible only on the main thread (Python's rule); elsewhere it warns and
    watches nothing.
    """

    def __init__(self, signals: Sequence[int] = PREEMPTION_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a preemption signal arrived since :meth:`install`."""
        return self.received is not None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Start recording the signals; idempotent. Clears a signal recorded earlier."""
        self.received = None
        if self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "save_on_preemption: signal handlers can only be installed on the main thread; "
                "this run will not save on SIGTERM or SIGUSR1",
                UserWarning,
                stacklevel=3,
            )
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)

    def uninstall(self) -> None:
        """Put back the handlers found at :meth:`install`; idempotent."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum


def describe(signum: int | None) -> str:
    """``"SIGTERM"`` for a signal number (or ``"a preemption signal"``)."""
    if signum is None:
        return "a preemption signal"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


__all__ = ["PREEMPTION_SIGNALS", "PreemptionWatch", "describe"]
