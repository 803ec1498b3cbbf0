"""What the Lightning and Hugging Face callbacks share, free of either framework.

* :class:`ManagerOptions`: every option of :class:`~ckpt_plugin.CheckpointManager`, with its
  defaults, so that a callback passes any of them through and builds its manager in one place.
* :func:`given_manager`: the ready manager a callback was handed as ``manager=``, refused beside
  manager options.
* :class:`SaveSchedule`: the step, epoch and time triggers of a save; :class:`AutoSchedule`:
  ``every="auto"``.
* :class:`PreemptionStop`: ``save_on_preemption`` (watch the signals while training, stop after
  the save).
* :func:`check_metric_logged`: the check that the metric ranking checkpoints was reported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .auto_interval import AutoInterval
from .errors import ConfigurationError
from .manager import CheckpointManager, check_top_k, config_to_dict, normalize_metrics
from ._preemption import PreemptionWatch, describe


@dataclass(frozen=True)
class ManagerOptions:
    """The parameters of :class:`~ckpt_plugin.CheckpointManager`, with its defaults (see its docs).

    A test holds the fields to ``CheckpointManager.__init__``'s signature, names and defaults, so a
    new manager option reaches both callbacks through here.
    """

    checkpoint_dir: str | os.PathLike[str] = "checkpoints"
    max_checkpoints: int | None = 5
    keep_best: bool = False
    metric_for_best: str | None = None
    mode: str | None = None
    save_rng: bool = True
    incremental: bool = False
    change_detection: str = "checksum"
    async_save: bool = False
    storage_options: Mapping[str, Any] | None = None
    signing_key: str | os.PathLike[str] | None = None
    keep_top_k: int | None = None
    require_metric: bool | None = None
    collective_timeout: float = 600.0
    local_dir: str | os.PathLike[str] | None = None
    keep_local: int = 2
    max_pending_uploads: int = 2

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in ``CheckpointManager.__init__``'s order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> ManagerOptions:
        """The options among ``values`` (a callback's arguments); other names are left out."""
        return cls(**{name: values[name] for name in cls.names() if name in values})

    def build(self) -> CheckpointManager:
        """The manager these options describe (it validates them)."""
        return CheckpointManager(**{name: getattr(self, name) for name in self.names()})


def given_manager(
    manager: CheckpointManager | None, arguments: Mapping[str, Any], defaults: Mapping[str, Any]
) -> CheckpointManager | None:
    """``manager`` as handed to a callback, after checking that no manager option came with it.

    ``arguments`` are the callback's arguments and ``defaults`` its parameters' defaults; a manager
    option whose argument differs from its default was given. Raises :class:`ConfigurationError`
    naming those options (they would be ignored), or for a ``manager`` that is not a manager.
    """
    if manager is None:
        return None
    if not isinstance(manager, CheckpointManager):
        raise ConfigurationError(f"manager must be a CheckpointManager, not {type(manager).__name__}")
    given = [
        name
        for name in ManagerOptions.names()
        if name in arguments and name in defaults and not _same(arguments[name], defaults[name])
    ]
    if given:
        named = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
        raise ConfigurationError(
            f"{named} configure{'s' if len(given) == 1 else ''} the manager the callback builds, but manager= is a "
            "ready one; with manager=, pass them to CheckpointManager(...) instead"
        )
    return manager


def _same(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def check_ranking(keep_top_k: int | None, metric_for_best: str | None, *, metric_known: bool = True) -> None:
    """Validate ``keep_top_k`` against ``metric_for_best`` as the manager does, before it is built."""
    check_top_k(keep_top_k, metric_for_best, metric_known=metric_known)


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """A framework's metrics as the plain numbers a checkpoint records."""
    return normalize_metrics(metrics)


def plain_config(config: Any) -> Any:
    """A framework's config (hyper-parameters, arguments) as the plain data a checkpoint records."""
    return config_to_dict(config)


# ------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class SaveSchedule:
    """When a save falls due: every ``every_n_epochs`` epochs, every ``every_n_steps`` optimizer
    steps, or once ``time_interval`` has passed since the previous save (0 or None: off)."""

    every_n_epochs: int = 0
    every_n_steps: int = 0
    time_interval: timedelta | None = None

    @classmethod
    def exclusive(
        cls, every_n_epochs: int | None, every_n_steps: int | None, time_interval: timedelta | None, *, steps_name: str
    ) -> SaveSchedule:
        """One trigger, validated as ``ModelCheckpoint`` does; ``every_n_epochs=1`` when none is given.

        ``steps_name`` is what the caller calls the step trigger, for the messages.
        """
        for name, value in (("every_n_epochs", every_n_epochs), (steps_name, every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigurationError(f"{name} must be a whole number of at least 0 (0 or None: off), not {value!r}")
        if time_interval is not None and not isinstance(time_interval, timedelta):
            raise ConfigurationError(
                f"train_time_interval must be a datetime.timedelta, not {time_interval!r}; e.g. timedelta(hours=1)"
            )
        given = [
            f"{name}={value!r}"
            for name, value, on in (
                ("every_n_epochs", every_n_epochs, bool(every_n_epochs)),
                (steps_name, every_n_steps, bool(every_n_steps)),
                ("train_time_interval", time_interval, time_interval is not None),
            )
            if on
        ]
        if len(given) > 1:
            raise ConfigurationError(
                f"{' and '.join(given)} are exclusive save schedules, as in ModelCheckpoint; keep one and drop the "
                f"other{'s' if len(given) > 2 else ''}"
            )
        if every_n_epochs is None and every_n_steps is None and time_interval is None:
            every_n_epochs = 1
        return cls(every_n_epochs or 0, every_n_steps or 0, time_interval)

    def epoch_due(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (counted from 0) saves."""
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0

    def step_due(self, step: int) -> bool:
        """Whether the end of optimizer step ``step`` (counted from 1) saves."""
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def time_due(self, elapsed_seconds: float) -> bool:
        """Whether ``elapsed_seconds`` since the previous save make a save due."""
        return self.time_interval is not None and elapsed_seconds >= self.time_interval.total_seconds()


@dataclass(frozen=True)
class AutoSchedule:
    """``every="auto"``: save when :meth:`CheckpointManager.due <ckpt_plugin.CheckpointManager.due>`
    says so, at the interval Young and Daly's rule gives for the measured save cost and the MTBF
    (``mtbf``, or learned from the run's restarts), clamped to ``[min_interval, max_interval]``."""

    mtbf: str | float | None = None
    min_interval: str | float = 10.0
    max_interval: str | float = "6h"

    @classmethod
    def chosen(
        cls, every: str | None, mtbf: str | float | None, min_interval: str | float, max_interval: str | float,
        *, fixed: list[str],
    ) -> AutoSchedule | None:
        """The automatic schedule ``every`` asks for, or None; ``fixed`` names the fixed schedules
        also given (``every_n_epochs=1``, ...), which ``every="auto"`` refuses."""
        if every is None:
            if mtbf is not None:
                raise ConfigurationError(f"mtbf={mtbf!r} only applies with every='auto'; pass both, or drop mtbf")
            return None
        if every != "auto":
            raise ConfigurationError(f"every must be 'auto' or left out, not {every!r}; for a fixed interval use the every_n_* options")
        if fixed:
            raise ConfigurationError(f"every='auto' chooses when to save by itself; drop {' and '.join(fixed)}")
        AutoInterval(mtbf, min_interval=min_interval, max_interval=max_interval)  # refuses a bad duration now
        return cls(mtbf, min_interval, max_interval)

    def due(self, manager: CheckpointManager, step: int) -> bool:
        """Whether ``manager`` should save after optimizer step ``step``; call once per step."""
        return manager.due(step, mtbf=self.mtbf, min_interval=self.min_interval, max_interval=self.max_interval)


# ----------------------------------------------------------------------------------------- preemption


class PreemptionStop:
    """``save_on_preemption``: record SIGTERM / SIGUSR1 while training, then save and stop.

    The training loop calls :meth:`start` when training starts, asks :meth:`requested` after each
    optimizer step (with a vote across ranks, so that every rank stops after the same step), saves,
    and calls :meth:`stop` for the message to show; :meth:`end` puts the handlers back in any case.
    Off (``enabled=False``), nothing is installed and :meth:`requested` is always False.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._watch = PreemptionWatch()

    def start(self) -> None:
        """Start watching the signals (when enabled); a signal recorded earlier is forgotten."""
        if self.enabled:
            self._watch.install()

    def requested(self, any_rank: Callable[[bool], bool]) -> bool:
        """Whether a signal arrived on any rank; ``any_rank`` turns this rank's flag into the job's."""
        return self.enabled and bool(any_rank(self._watch.requested))

    def stop(self, manager: CheckpointManager, step: int, resume: str) -> str:
        """Wait until the checkpoint just saved is on disk, put the handlers back, and return the
        message saying so; ``resume`` says how to resume (``"fit(..., ckpt_path='last')"``)."""
        manager.wait()
        signal_name = describe(self._watch.received)
        self._watch.uninstall()
        return (
            f"received {signal_name}: saved a checkpoint at step {step} in {manager.checkpoint_dir} "
            f"and stopped training; resume with {resume}"
        )

    def end(self) -> None:
        """Put back the signal handlers found at :meth:`start`; idempotent."""
        self._watch.uninstall()


# -------------------------------------------------------------------------------------- metric check


def check_metric_logged(
    metric: str | None, metrics: Mapping[str, Any], *, ranked_by: str, reported: str, fix: str
) -> None:
    """Refuse a save whose ``metrics`` lack ``metric``, the one that ranks the checkpoints.

    ``metric=None`` ranks nothing, so anything passes. ``ranked_by`` names what ranks by it
    (``", which keep_top_k ranks checkpoints by,"`` or ``""``), ``reported`` how the framework
    reports metrics (``"logged"``, ``"evaluation"``), and ``fix`` how to report it there.
    """
    if metric is None or metric in metrics:
        return
    names = ", ".join(sorted(metrics)) or "none"
    raise ConfigurationError(f"metric_for_best={metric!r}{ranked_by} is not among the {reported} metrics ({names}); {fix}")


__all__ = [
    "AutoSchedule",
    "ManagerOptions",
    "PreemptionStop",
    "SaveSchedule",
    "check_metric_logged",
    "check_ranking",
    "given_manager",
    "plain_config",
    "plain_metrics",
]
