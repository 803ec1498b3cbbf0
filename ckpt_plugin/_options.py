"""The validated options of a :class:`~ckpt_plugin.CheckpointManager`, as one frozen value.

:class:`SaveSettings` is what the save strategies and the collective save read (the ranking
metric and mode, RNG capture, the collective timeout, ...); :func:`check_top_k` is shared with the
framework callbacks, which validate before they build a manager.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import _retention as retention
from .errors import ConfigurationError
from ._io.incremental import DETECTION_MODES

DEFAULT_METRIC = "loss"
"""What ``keep_best`` and :meth:`CheckpointManager.best` rank by when nothing else says."""


@dataclass(frozen=True)
class SaveSettings:
    """A manager's options once validated (see :class:`~ckpt_plugin.CheckpointManager` for each)."""

    max_checkpoints: int | None
    keep_top_k: int
    """How many of the best checkpoints retention keeps (0: none; 1: ``keep_best``)."""
    metric_for_best: str | None
    mode: str
    mode_given: bool
    """Whether ``mode`` was given, rather than defaulted to ``"min"`` (then a recorded one wins)."""
    save_rng: bool
    incremental: bool
    change_detection: str
    async_save: bool
    signing_key: str | os.PathLike[str] | None
    strict_metric: bool
    """Whether the first save must record ``metric_for_best``."""
    collective_timeout: float

    @classmethod
    def validated(
        cls,
        *,
        max_checkpoints: int | None,
        keep_best: bool,
        metric_for_best: str | None,
        mode: str | None,
        save_rng: bool,
        incremental: bool,
        change_detection: str,
        async_save: bool,
        signing_key: str | os.PathLike[str] | None,
        keep_top_k: int | None,
        require_metric: bool | None,
        collective_timeout: float,
    ) -> SaveSettings:
        """The settings for these manager arguments, or :class:`ConfigurationError` naming the fix."""
        if mode is not None and mode not in retention.MODES:
            raise ConfigurationError(f"mode must be 'min' or 'max', not {mode!r}")
        if keep_best and metric_for_best is None:
            metric_for_best = DEFAULT_METRIC
        _check_max_checkpoints(max_checkpoints)
        if change_detection not in DETECTION_MODES:
            raise ConfigurationError(f"change_detection must be 'checksum' or 'version', not {change_detection!r}")
        if keep_best and metric_for_best is not None and not isinstance(metric_for_best, str):
            raise ConfigurationError(f"metric_for_best must be a metric name, not {metric_for_best!r}")
        check_top_k(keep_top_k, metric_for_best)
        if isinstance(collective_timeout, bool) or not isinstance(collective_timeout, (int, float)) or not collective_timeout > 0:
            raise ConfigurationError(f"collective_timeout must be a number of seconds above 0, not {collective_timeout!r}")
        return cls(
            max_checkpoints=max_checkpoints,
            keep_top_k=keep_top_k if keep_top_k is not None else int(bool(keep_best)),
            metric_for_best=metric_for_best,
            mode=mode if mode is not None else "min",
            mode_given=mode is not None,
            save_rng=save_rng,
            incremental=bool(incremental),
            change_detection=change_detection,
            async_save=bool(async_save),
            signing_key=signing_key,
            strict_metric=keep_top_k is not None if require_metric is None else bool(require_metric),
            collective_timeout=float(collective_timeout),
        )

    @property
    def keep_best(self) -> bool:
        """Whether retention keeps any best checkpoint (``keep_top_k`` above 0)."""
        return self.keep_top_k > 0

    def retention_policies(self) -> list[retention.RetentionPolicy]:
        """The retention policies these settings ask for (empty: keep everything)."""
        return retention.policies_for(self.max_checkpoints, self.keep_best, self.metric_for_best, self.mode, self.keep_top_k)


class BestMetricCheck:
    """Checks that saves record ``metric_for_best``: the first save must when the settings are
    strict, and a save without it is warned about once."""

    def __init__(self, settings: SaveSettings) -> None:
        self._settings = settings
        self._first_checked = False
        self._warned = False

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        settings = self._settings
        metric = settings.metric_for_best
        if not settings.keep_best or metric is None:
            return
        if settings.strict_metric and not self._first_checked:
            if metric not in metrics:
                recorded = ", ".join(sorted(metrics)) or "none"
                raise ConfigurationError(
                    f"keep_top_k={settings.keep_top_k} ranks checkpoints by metric_for_best={metric!r}, "
                    f"but the first save records no such metric (recorded: {recorded}); pass it in metrics= "
                    "or choose one of these as metric_for_best"
                )
            self._first_checked = True
        if self._warned or retention.as_float(metrics.get(metric)) is not None:
            return
        self._warned = True
        recorded = ", ".join(sorted(metrics)) or "none"
        warnings.warn(
            f"keep_best ranks checkpoints by {metric!r}, but this save's metrics do not "
            f"hold a number for it (recorded: {recorded}); such checkpoints are never the best. "
            "Log the metric or pass another metric_for_best. (This warning is shown once.)",
            UserWarning,
            stacklevel=3,
        )


def _check_max_checkpoints(max_checkpoints: Any) -> None:
    if max_checkpoints is not None and (
        isinstance(max_checkpoints, bool) or not isinstance(max_checkpoints, int) or max_checkpoints < 1
    ):
        raise ConfigurationError(
            f"max_checkpoints must be a whole number of at least 1, or None to keep every checkpoint; got {max_checkpoints!r}"
        )


def check_top_k(keep_top_k: int | None, metric_for_best: str | None, *, metric_known: bool = True) -> None:
    """Validate ``keep_top_k`` (and, when ``metric_known``, that ``metric_for_best`` is set).

    Raises :class:`ConfigurationError` naming the fix.
    """
    if keep_top_k is None:
        return
    if isinstance(keep_top_k, bool) or not isinstance(keep_top_k, int) or keep_top_k < 1:
        raise ConfigurationError(
            f"keep_top_k must be a whole number of at least 1 (or None; keep_best=False keeps no best); got {keep_top_k!r}"
        )
    if metric_known and metric_for_best is None:
        raise ConfigurationError(
            f"keep_top_k={keep_top_k} keeps the best checkpoints by metric_for_best, but metric_for_best is None; "
            "pass metric_for_best or drop keep_top_k"
        )
