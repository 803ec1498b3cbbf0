"""PyTorch Lightning integration: one callback that hands every checkpoint to a ``CheckpointManager``.

    from ckpt_plugin.lightning import CheckpointCallback

    trainer = pl.Trainer(callbacks=[CheckpointCallback("checkpoints", max_checkpoints=3,
                                                       metric_for_best="val_loss", mode="min")])
    trainer.fit(model, datamodule)
    trainer.fit(model, datamodule, ckpt_path="last")   # resume: loops, optimizers, schedulers, RNG
    trainer.test(model, datamodule, ckpt_path="best")
    model = load_from_checkpoint(MyModule, "checkpoints")   # inference: hparams, then the best weights

How it fits into Lightning:

* ``CheckpointCallback`` decides *when* to save, with ``ModelCheckpoint``'s schedules: at the end of
  every ``every_n_epochs``-th training epoch (after its validation, so the metrics are known) or of
  validation, after every ``every_n_train_steps`` optimizer steps, once ``train_time_interval`` has
  passed, and, with ``save_on_preemption``, after the step during which SIGTERM or SIGUSR1 came.
* ``ManagerCheckpointIO``, a ``CheckpointIO`` plugin that the callback installs on the strategy,
  decides *how*: Lightning's checkpoint dict is split into the manager's items (weights, optimizer,
  scheduler, and the rest as ``extra``) and written without pickle. Loading a ckpt_plugin
  checkpoint directory rebuilds the same dict; any other path goes to the plugin it wraps.
* Lightning resolves ``ckpt_path="best"`` through ``best_model_path`` of the first checkpoint
  callback and ``ckpt_path="last"`` through ``ModelCheckpoint``'s (private) scan for last files or
  the ``ckpt_path`` of an ``OnExceptionCheckpoint``, and makes every ``OnExceptionCheckpoint`` resume
  a ``fit()`` without ``ckpt_path``. The callback is therefore a ``ModelCheckpoint`` that answers
  both from the manager and writes no ``.ckpt`` file, so a fresh ``fit()`` starts fresh;
  ``auto_resume=True`` makes it an ``OnExceptionCheckpoint`` too.
* Beside a ``ModelCheckpoint``, the callback's state holds only what torch's weights-only loader
  reads, it saves after the other checkpoint callbacks, and loads outside ``fit`` hand no callback
  the state of an older checkpoint.

Under DDP every rank takes the same decisions from replicated state (the epoch and step) or from
one collective (rank zero's clock, broadcast; any rank's preemption signal, all-reduced), every rank
enters the same collectives (Lightning's save barrier, then one broadcast of rank zero's outcome),
only global rank zero writes, and an error on rank zero is raised on every rank instead of
leaving the others waiting.

With ``async_save=True`` a save returns once its snapshot is staged; the callback predicts the
list of checkpoints the background commit will leave (retention is pure), waits for the save in
flight before anything resolves or loads ``"last"``/``"best"``, and flushes at the end of ``fit``
(raising a background failure on every rank) or on an exception (warning, so the training error
is the one raised). A batch or epoch that does not save does nothing but a modulo check (and the
clock or preemption collective when those options are on).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import _data_state as data_state, errors
from ._lightning_loaders import LoaderPositions
from ._callback_core import (
    AutoSchedule,
    ManagerOptions,
    PreemptionStop,
    SaveSchedule,
    check_metric_logged,
    check_ranking,
    given_manager,
    plain_metrics,
)
from . import CheckpointInfo, Location, capture_rng_state, portable_rng_state, restore_rng_state
from .sampler import ResumableDistributedSampler
from ._checkpoint import METADATA_FILE
from .errors import CheckpointError, ConfigurationError, EncodingError
from .manager import CheckpointManager
from .one_checkpoint import info_at, read_checkpoint

_MOVED_TO_ITEMS = {"optimizer_states": "optimizer", "lr_schedulers": "scheduler"}


def split_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Split Lightning's checkpoint dict into the manager's ``save`` arguments.

    The weights become ``model``; a single optimizer's and a single scheduler's state become
    ``optimizer`` and ``scheduler``, so the files read like a plain PyTorch checkpoint. Everything
    else (loops, callback states, hyper-parameters, precision state, ...) goes into ``extra``.
    """
    rest = dict(checkpoint)
    if "state_dict" not in rest:
        raise EncodingError("the Lightning checkpoint holds no 'state_dict'; nothing to save")
    parts: dict[str, Any] = {"model": rest.pop("state_dict"), "optimizer": None, "scheduler": None}
    layout: dict[str, str] = {}
    for key, item in _MOVED_TO_ITEMS.items():
        states = rest.get(key)
        if isinstance(states, list) and len(states) == 1 and isinstance(states[0], Mapping):
            parts[item] = rest.pop(key)[0]
            layout[key] = item
    parts["extra"] = {"lightning": rest, "layout": layout}
    return parts


def join_checkpoint(loaded: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild Lightning's checkpoint dict from a checkpoint loaded by the manager."""
    extra = loaded.get("extra")
    if not isinstance(extra, Mapping) or "lightning" not in extra:
        path = loaded.get("metadata", {}).get("path", "this checkpoint")
        raise errors.IncompatibleCheckpointError(
            f"{path} was not written by ckpt_plugin.lightning.CheckpointCallback, so it holds no Lightning "
            "trainer state; load its weights with CheckpointManager.load() and model.load_state_dict() instead"
        )
    checkpoint = dict(extra["lightning"])
    checkpoint["state_dict"] = loaded["model"]
    for key, item in extra.get("layout", {}).items():
        checkpoint[key] = [loaded[item]]
    return checkpoint


def checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The :class:`CheckpointInfo` of ``path`` if it is a ckpt_plugin checkpoint directory, else None."""
    return info_at(Path(path))


@dataclass
class SaveRequest:
    """What the callback asks ``ManagerCheckpointIO`` to save with Lightning's dict, and what came of it.

    Travels as the ``storage_options`` of ``trainer.save_checkpoint``. The plugin fills ``outcome``
    (or ``error``) instead of raising, so that a failure on rank zero never leaves the other ranks
    waiting in Lightning's save barrier.
    """

    epoch: int
    step: int
    metrics: dict[str, Any]
    config: Any
    error: BaseException | None = None
    info: CheckpointInfo | None = None
    outcome: dict[str, Any] | None = None


class ManagerCheckpointIO(CheckpointIO):
    """A ``CheckpointIO`` that saves and loads Lightning checkpoints through a ``CheckpointManager``.

    ``save_checkpoint`` writes through the manager when it gets a :class:`SaveRequest` as
    ``storage_options`` (that is how :class:`CheckpointCallback` saves). ``load_checkpoint`` reads
    any ckpt_plugin checkpoint directory, verifying checksums and executing no code. Every other
    path and call goes to ``fallback`` (Lightning's own plugin), so tools that keep their own
    temporary files, such as the tuner, keep working.
    """

    def __init__(self, manager: CheckpointManager, fallback: CheckpointIO | None = None) -> None:
        self.manager = manager
        self.fallback = fallback
        self.callback_states = True
        """Whether loads hand the callbacks their saved states. Off while validating, testing or
        predicting: another checkpoint callback's state (a ``ModelCheckpoint``'s ``best_model_path``)
        must not be rewound to what it was when an older checkpoint was saved."""
        self.fitting = False
        """Set while ``fit`` runs: a checkpoint loaded then is resumed from, so it must hold the training state."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` through the manager (for a :class:`SaveRequest`) or the fallback."""
        if not isinstance(storage_options, SaveRequest):
            self._fallback("save", path).save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        request = storage_options
        if request.error is not None:
            return
        try:
            if self.manager.async_save:
                info, names = self._save_async(checkpoint, request)
            else:
                info = self._save(checkpoint, request)
                names = [entry.name for entry in self.manager.checkpoints()]
            request.info = info
            request.outcome = {"saved": info.name, "checkpoints": names}
        except Exception as exc:  # raised on every rank by the callback once all ranks are past the barrier
            request.error = exc

    def _save(self, checkpoint: dict[str, Any], request: SaveRequest) -> CheckpointInfo:
        return self.manager.save(
            epoch=request.epoch,
            step=request.step,
            metrics=request.metrics,
            config=request.config,
            **split_checkpoint(checkpoint),
        )

    def _save_async(self, checkpoint: dict[str, Any], request: SaveRequest) -> tuple[CheckpointInfo, list[str]]:
        """Start an asynchronous save; return its pending record and the checkpoints there will be once it commits.

        The save is listed only after its background commit, so the list is predicted: the
        checkpoints committed so far (the previous save is flushed first, which the manager would
        do anyway) plus the pending one, less what retention will prune. Retention is pure, so
        the prediction is what the background worker will do.
        """
        manager = self.manager
        manager.wait(uploads=False)
        committed = manager.checkpoints()
        info = self._save(checkpoint, request)
        entries = sorted([entry for entry in committed if entry.name != info.name] + [info], key=lambda entry: entry.sort_key)
        return info, [entry.name for entry in manager.retained(entries, protect=info)]

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a ckpt_plugin checkpoint directory as Lightning's dict, or defer to the fallback."""
        self.manager.wait(uploads=False)  # the save in flight may be the checkpoint asked for
        info = _checkpoint_to_load(self.manager, path)
        if info is None:
            return self._fallback("load", path).load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        checkpoint = join_checkpoint(self.manager.read(info, map_location=_device(map_location)))
        if self.fitting and "optimizer_states" not in checkpoint:
            raise errors.IncompatibleCheckpointError(
                f"{info.path} was saved with save_weights_only=True: it holds the model weights but no optimizer, "
                "scheduler or callback state, so fit(ckpt_path=...) cannot resume training from it. Use it with "
                "validate/test/predict(ckpt_path=...) or load the weights with load_from_checkpoint(), "
                "and save with save_weights_only=False to be able to resume"
            )
        if not self.callback_states:
            checkpoint.pop("callbacks", None)
        return checkpoint

    def _info(self, path: Any) -> CheckpointInfo | None:
        return _manager_checkpoint(self.manager, path)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove a file written through the fallback; the manager's checkpoints are pruned only by retention."""
        if self._info(path) is not None:
            raise ConfigurationError(
                f"{path} is a ckpt_plugin checkpoint; it is deleted only by the manager's retention "
                "(max_checkpoints, keep_best), never through Lightning"
            )
        self._fallback("remove", path).remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear down the fallback plugin."""
        if self.fallback is not None:
            self.fallback.teardown()

    def _fallback(self, action: str, path: Any) -> CheckpointIO:
        if self.fallback is None:
            raise CheckpointError(
                f"cannot {action} {path}: it is not a ckpt_plugin checkpoint directory and no other "
                "CheckpointIO plugin is configured"
            )
        return self.fallback


def _manager_checkpoint(manager: CheckpointManager, path: Any) -> CheckpointInfo | None:
    """The checkpoint Lightning names by ``path`` (a directory, or on an object store the URL of its
    manifest, see :func:`_lightning_path`), or None when it is not one of ours."""
    return manager.checkpoint_at(_without_manifest(os.fspath(path)))


def _checkpoint_to_load(manager: CheckpointManager, path: Any) -> CheckpointInfo | None:
    """The checkpoint a load of ``path`` reads: the one :func:`_manager_checkpoint` finds, or the
    manager's latest when ``path`` is the manager's own directory (``fit(ckpt_path=checkpoint_dir)``
    resumes as ``ckpt_path="last"`` does); None when ``path`` is not ours."""
    if not _is_checkpoint_dir(manager, path):
        return _manager_checkpoint(manager, path)
    latest = manager.latest()
    if latest is None:
        raise errors.CheckpointNotFoundError(
            f"{path} holds no checkpoint yet, so there is nothing to load; leave ckpt_path out to start fresh, "
            "or pass ckpt_path='last', which resumes when there is a checkpoint and starts fresh when there is none"
        )
    return latest


def _is_checkpoint_dir(manager: CheckpointManager, path: Any) -> bool:
    """Whether ``path`` names the manager's ``checkpoint_dir`` itself (written as the manager was given it)."""
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    return isinstance(where, str) and Location(where).same_place(manager.checkpoint_dir)


def _without_manifest(location: str) -> str:
    """The location of a checkpoint from that of its manifest (what Lightning gets on an object
    store, see :func:`_lightning_path`); any other location as it is."""
    return location.removesuffix("/" + METADATA_FILE)


def _lightning_path(info: CheckpointInfo | None) -> str | None:
    """What Lightning is given as a checkpoint's path: its directory, or on an object store its
    manifest (Lightning asks the file system for the modification time of ``ckpt_path="last"``, and
    an object store has times for objects only)."""
    if info is None:
        return None
    return Location(info.location).dated_by(METADATA_FILE)  # Lightning reads the modification time of what it is given


class CheckpointCallback(ModelCheckpoint):
    """Save pickle-free checkpoints through a :class:`~ckpt_plugin.CheckpointManager`.

    Args:
        checkpoint_dir: the manager's directory, one sub-directory per checkpoint, or an object
            store URL (``s3://bucket/run/checkpoints``); ``storage_options`` configure its fsspec
            file system as for ``CheckpointManager``.
        max_checkpoints: keep this many most recent checkpoints; ``None`` keeps all.
        keep_best: never delete the best checkpoint by ``metric_for_best`` (``keep_top_k=1``).
            Default: on when there is a ``metric_for_best``, off without one.
        metric_for_best: a metric logged with ``self.log`` that ranks checkpoints for ``keep_best``,
            ``keep_top_k`` and ``ckpt_path="best"``. ``None`` ranks nothing, as ``ModelCheckpoint``'s
            ``monitor=None``: the ``max_checkpoints`` latest are kept, no metric needs to be logged,
            and ``"best"`` is the latest (``keep_best=True`` or ``keep_top_k`` with it is refused).
        mode: ``"min"`` if a lower ``metric_for_best`` is better, ``"max"`` if a higher one is.
        every_n_epochs: save at the end of every n-th training epoch (after its validation). The
            default is 1 unless ``every_n_train_steps`` or ``train_time_interval`` is given; the three
            are exclusive, as in ``ModelCheckpoint``.
        async_save: take each checkpoint's snapshot on the training thread and write, commit and
            prune it in the background (see ``CheckpointManager(async_save=True)``). The end of
            ``fit`` waits for the last save and raises its error, if it failed.
        incremental: hard-link the model shards that did not change since the previous checkpoint
            instead of writing them again (frozen backbones, adapters); ``change_detection`` is
            ``"checksum"`` or ``"version"`` as for ``CheckpointManager``.
        manager: a ready manager to use instead of building one; the manager options (every
            ``CheckpointManager`` parameter) are then refused, the callback's own (schedule,
            ``auto_resume``, ...) apply.
        auto_resume: make ``fit()`` without ``ckpt_path`` continue from the latest checkpoint in
            ``checkpoint_dir`` when there is one (for preemptible jobs that rerun the same command).
            Off by default: a fresh ``fit()`` starts fresh, and ``fit(ckpt_path="last")`` resumes.
        keep_top_k: keep the k best checkpoints by ``metric_for_best`` besides the
            ``max_checkpoints`` most recent (``ModelCheckpoint(save_top_k=k)`` is
            ``max_checkpoints=1, keep_top_k=k``).
        every_n_train_steps: save after every n-th optimizer step (mid-epoch checkpoints).
        train_time_interval: save after the first step that ends once this ``timedelta`` has passed
            since the previous save (or the start of training). Rank zero's clock decides, for every rank.
        save_on_train_epoch_end: save the epoch's checkpoint at the end of the training epoch
            (``True``) or at the end of validation (``False``); ``None`` chooses as ``ModelCheckpoint``
            does (at the end of validation when it runs other than once per epoch).
        save_weights_only: save only the model's weights and the loop counters: no optimizer,
            scheduler or callback state. Such a checkpoint serves ``validate``/``test``/``predict``;
            ``fit(ckpt_path=...)`` refuses to resume from it.
        save_on_preemption: on SIGTERM or SIGUSR1, finish the current optimizer step, save a
            checkpoint (waiting for an asynchronous save in flight), and stop: ``fit`` raises
            Lightning's ``SIGTERMException`` (a ``SystemExit``), as Lightning does on SIGTERM. Under DDP
            every rank stops after the same step when any rank is signalled. Resume with
            ``fit(ckpt_path="last")``, or by rerunning ``fit()`` with ``auto_resume=True``. The signal handlers found at the start of training are put back
            when it ends.
        signing_key, save_rng, require_metric, collective_timeout: as for ``CheckpointManager``,
            which takes every manager option the callback passes on: ``signing_key`` signs each
            checkpoint; ``save_rng`` is off because the callback's own state carries the RNG states
            (on, the checkpoints record them too); ``require_metric`` is off because saves may come
            before the first validation (the callback checks ``metric_for_best`` once one ran).
        local_dir, keep_local, max_pending_uploads: as for ``CheckpointManager``: checkpoints
            commit in ``local_dir`` and upload to ``checkpoint_dir`` in the background.
        every: ``"auto"`` saves when :meth:`CheckpointManager.due <ckpt_plugin.CheckpointManager.due>`
            says so: at the interval ``sqrt(2 * C * MTBF)`` (Young and Daly) for the measured save cost
            ``C``, re-evaluated as it changes, with ``every_n_*`` and ``train_time_interval`` left out.
            The final state is saved when training ends, and ``save_on_preemption`` stays in force.
        mtbf, min_interval, max_interval: with ``every="auto"``: the mean time between failures
            (seconds, or ``"6h"``; learned from the run's restarts when left out) and the bounds of
            the interval.

    Each checkpoint records ``trainer.callback_metrics`` as its metrics and the module's (and
    datamodule's) ``hparams`` as its config. ``fit(ckpt_path="last")`` restores everything
    Lightning checkpoints (loops, optimizers, schedulers, callback states, and the state of a
    stateful dataloader such as torchdata's ``StatefulDataLoader``) plus the global RNG states, so
    a resumed run continues bitwise identically, also from a checkpoint taken mid-epoch. Where
    Lightning's own record of the loader is not exact (an epoch's end with a sampler that owns its
    generator, a loader without a length) the callback corrects it (:mod:`ckpt_plugin._lightning_loaders`).
    ``ckpt_path="best"`` loads the best.

    Lightning knows two kinds of checkpoint callbacks: it looks up ``ckpt_path="best"`` and
    ``"last"`` through a ``ModelCheckpoint``, and makes every ``OnExceptionCheckpoint`` resume a
    ``fit()`` without ``ckpt_path``. The callback is therefore a ``ModelCheckpoint`` whose every
    saving hook is its own (it never writes a ``.ckpt`` file), and an ``OnExceptionCheckpoint`` only
    with ``auto_resume=True`` (the instance then becomes an :class:`AutoResumingCheckpointCallback`).
    Being a checkpoint callback, it keeps Lightning from adding its default ``ModelCheckpoint``: with
    it in ``callbacks`` no ``.ckpt`` file is written. ``Trainer(enable_checkpointing=False)`` refuses
    every checkpoint callback, this one included, in the Trainer's constructor (before any callback
    code runs), with a message about a ``ModelCheckpoint``, the class this callback derives from:
    leave that option at its default.

    ``fit(ckpt_path=...)`` also takes one of the checkpoints' directories (or URLs), and the
    ``checkpoint_dir`` itself, which resumes from the latest checkpoint as ``ckpt_path="last"`` does.
    """

    _STATE_KEY = "CheckpointCallback"

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] = "checkpoints",
        max_checkpoints: int | None = 5,
        keep_best: bool | None = None,
        metric_for_best: str | None = "val_loss",
        mode: str = "min",
        every_n_epochs: int | None = None,
        manager: CheckpointManager | None = None,
        async_save: bool = False,
        incremental: bool = False,
        change_detection: str = "checksum",
        storage_options: Mapping[str, Any] | None = None,
        *,
        auto_resume: bool = False,
        keep_top_k: int | None = None,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        save_on_train_epoch_end: bool | None = None,
        save_weights_only: bool = False,
        save_on_preemption: bool = False,
        signing_key: str | os.PathLike[str] | None = None,
        save_rng: bool = False,
        require_metric: bool | None = False,
        collective_timeout: float = 600.0,
        local_dir: str | os.PathLike[str] | None = None,
        keep_local: int = 2,
        max_pending_uploads: int = 2,
        every: str | None = None,
        mtbf: str | float | None = None,
        min_interval: str | float = 10.0,
        max_interval: str | float = "6h",
    ) -> None:
        arguments = dict(locals())
        fixed = [f"{name}={value!r}" for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps),
                                                          ("train_time_interval", train_time_interval)) if value]
        auto = AutoSchedule.chosen(every, mtbf, min_interval, max_interval, fixed=fixed)
        schedule = SaveSchedule() if auto else SaveSchedule.exclusive(
            every_n_epochs, every_n_train_steps, train_time_interval, steps_name="every_n_train_steps")
        if save_on_train_epoch_end not in (None, True, False):
            raise ConfigurationError(f"save_on_train_epoch_end must be True, False or None, not {save_on_train_epoch_end!r}")
        manager = given_manager(manager, arguments, _DEFAULTS)
        if manager is None:
            check_ranking(keep_top_k, metric_for_best)
            manager = ManagerOptions.of({**arguments, "keep_best": _keep_best(keep_best, metric_for_best)}).build()
        # ModelCheckpoint's own saving is off (save_top_k=0, no last): every saving hook is overridden below.
        super().__init__(
            dirpath=manager.checkpoint_dir,
            monitor=manager.metric_for_best,
            mode=manager.mode,
            save_top_k=0,
            save_last=False,
            every_n_epochs=schedule.every_n_epochs,
            every_n_train_steps=schedule.every_n_steps,
            train_time_interval=schedule.time_interval,
            save_on_train_epoch_end=save_on_train_epoch_end,
            save_weights_only=bool(save_weights_only),
        )
        self.manager = manager
        self.auto_resume = bool(auto_resume)
        self.schedule = schedule
        self.auto = auto
        self.every_n_train_steps = schedule.every_n_steps
        self.train_time_interval = schedule.time_interval
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.save_on_preemption = bool(save_on_preemption)
        self.checkpoint_names: list[str] = []
        self._stage: str | None = None
        self._validated_since_save = False
        self._warned_existing = False
        self._last_saved_step: int | None = None
        self._last_time_saved: float | None = None
        self._rng_at_first_batch: dict[str, Any] | None = None
        self._loaders = LoaderPositions(_train_loaders, rank_zero_warn)
        self._due_at_epoch_end = False
        self._preemption = PreemptionStop(self.save_on_preemption)
        if self.auto_resume and not isinstance(self, OnExceptionCheckpoint):
            self.__class__ = _auto_resuming(type(self))
            for message in _AUTO_RESUME_NOTICES:  # Lightning's wording assumes a ModelCheckpoint in one process
                warnings.filterwarnings("ignore", message=message)

    def __repr__(self) -> str:
        schedule = (
            f"every_n_train_steps={self.every_n_train_steps}"
            if self.every_n_train_steps
            else f"train_time_interval={self.train_time_interval!r}"
            if self.train_time_interval is not None
            else f"every_n_epochs={self.every_n_epochs}"
        )
        resume = ", auto_resume=True" if self.auto_resume else ""
        return f"{type(self).__name__}(manager={self.manager!r}, {schedule}{resume})"

    @property
    def state_key(self) -> str:
        """The key of the callback's state in Lightning's checkpoint dict (one such callback per Trainer)."""
        return self._STATE_KEY

    # ------------------------------------------------------------ what Lightning asks of a checkpoint callback

    @property
    def ckpt_path(self) -> str | None:
        """The latest checkpoint, which Lightning loads for ``ckpt_path="last"``; None when there is none.

        Waits for the save in flight, so the checkpoint it is writing counts.
        """
        self.manager.wait(uploads=False)
        return _lightning_path(self.manager.latest())

    @property  # type: ignore[override]
    def last_model_path(self) -> str:
        """The latest checkpoint's directory, or ``""`` when there is none."""
        return self.ckpt_path or ""

    @last_model_path.setter
    def last_model_path(self, value: str) -> None:
        """Ignored: the manager's directory is the only record of the latest checkpoint."""

    @property  # type: ignore[override]
    def best_model_path(self) -> str:
        """The best checkpoint's directory by ``metric_for_best``, which Lightning loads for ``ckpt_path="best"``.

        ``""`` when there is no checkpoint; the latest when the manager has no ``metric_for_best``.
        """
        if self.manager.metric_for_best is None:
            return self.last_model_path
        self.manager.wait(uploads=False)
        return _lightning_path(self.manager.best()) or ""

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        """Ignored: the best checkpoint is always found from the metrics recorded in the checkpoints."""

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """What Lightning may resume from for ``ckpt_path="last"``: the manager's latest checkpoint."""
        latest = self.ckpt_path
        return {latest} if latest else set()

    # ------------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install :class:`ManagerCheckpointIO` on the strategy and check that the config can be stored."""
        self._stage = stage
        self._world_size = trainer.world_size
        strategy = trainer.strategy
        if _sharded_strategy(strategy):
            _install_sharded_hooks(strategy, self.manager, callback_states=stage == "fit")
        elif type(strategy).save_checkpoint is not Strategy.save_checkpoint:
            raise ConfigurationError(
                f"the {type(strategy).__name__} strategy writes checkpoints itself instead of through its "
                "CheckpointIO plugin, so CheckpointCallback cannot save through the manager; use a strategy "
                "such as 'auto', 'ddp', 'ddp_spawn', 'fsdp' (FSDPStrategy(state_dict_type='sharded')) or "
                "ModelParallelStrategy"
            )
        else:
            current = strategy.checkpoint_io
            if not (isinstance(current, ManagerCheckpointIO) and current.manager is self.manager):
                current = strategy.checkpoint_io = ManagerCheckpointIO(self.manager, fallback=current)
            current.callback_states = current.fitting = stage == "fit"
        if stage == "fit":
            self._run_after_other_checkpoint_callbacks(trainer)
            try:
                self.manager.check_config(_config_of(trainer, pl_module))
            except EncodingError as exc:
                raise EncodingError(
                    f"{exc}. Checkpoints store the hyper-parameters as JSON; leave such values out with "
                    "self.save_hyperparameters(ignore=[...])"
                ) from None

    def _run_after_other_checkpoint_callbacks(self, trainer: pl.Trainer) -> None:
        """Move this callback after every other checkpoint callback, so that a checkpoint holds their
        states as they are once they have saved this epoch (a ``ModelCheckpoint``'s ``best_model_path``
        then names a file that exists). The list is replaced, not changed while Lightning iterates it."""
        others = [callback for callback in trainer.callbacks if callback is not self]
        if any(isinstance(callback, Checkpoint) for callback in others) and trainer.callbacks[-1] is not self:
            trainer.callbacks = [*others, self]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say once, clearly, when a fresh run starts in a directory that already holds checkpoints,
        or when a run resumes from a checkpoint older than the latest."""
        if self._warned_existing or not trainer.is_global_zero:
            return
        if trainer.ckpt_path is not None:
            self._warn_if_resumed_before_latest(trainer.ckpt_path)
            return
        latest = self.manager.latest()
        if latest is None:
            return
        self._warned_existing = True
        self.manager.acknowledge_later_checkpoints()  # this message says it already
        rank_zero_warn(
            f"{self.manager.checkpoint_dir} already holds checkpoints (up to {latest.name}); this fit() starts "
            "fresh and its checkpoints are ranked among them by epoch and step. To continue that run pass "
            "ckpt_path='last' (or build the callback with auto_resume=True); to keep runs apart use a new "
            "checkpoint_dir"
        )

    def _warn_if_resumed_before_latest(self, ckpt_path: Any) -> None:
        resumed = _checkpoint_to_load(self.manager, ckpt_path)
        later = [] if resumed is None else self.manager.later_than(resumed)
        if not later:
            return
        self._warned_existing = True
        self.manager.acknowledge_later_checkpoints()  # this message says it already
        rank_zero_warn(
            f"resuming from {resumed.name}, but {self.manager.checkpoint_dir} also holds later checkpoints "
            f"({', '.join(info.name for info in later)}) of the training that went on from it. This fit() replaces "
            "each of them when it saves the same epoch and step; until then they count as the latest, so "
            "ckpt_path='last' would resume from them. To keep them, copy them elsewhere first"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock of ``train_time_interval`` and, with ``save_on_preemption``, watch for the signals."""
        self._last_time_saved = time.monotonic()
        self._last_saved_step = trainer.global_step if trainer.ckpt_path else None
        self._due_at_epoch_end = False
        self._loaders.fit_started(trainer)
        self._preemption.start()
        if self._rng_at_first_batch is not None and trainer.world_size > 1:  # a mid-epoch resume
            _warn_if_order_not_restored(trainer)
        if self._resplit_epoch:
            self._resplit_epoch = False
            _count_batches_left_after_resplit(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume from an epoch's end, draw this epoch's order as the uninterrupted run did
        (see :mod:`ckpt_plugin._lightning_loaders`)."""
        self._loaders.epoch_started(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """After resuming mid-epoch, put the RNG states back once the data iterator exists (it draws from them)."""
        if self._rng_at_first_batch is not None:
            restore_rng_state(self._rng_at_first_batch)
            self._rng_at_first_batch = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Save every ``every_n_train_steps`` steps, once ``train_time_interval`` passed, or on preemption."""
        try:
            self._save_if_due_after_batch(trainer, pl_module, batch_idx)
        finally:
            self._loaders.batch_ended(trainer)

    def _save_if_due_after_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        if trainer.fast_dev_run or not _step_completed(trainer, batch_idx):
            return
        preempted = self._preemption.requested(functools.partial(trainer.strategy.reduce_boolean_decision, all=False))
        due = self.schedule.step_due(trainer.global_step)
        if self.schedule.time_interval is not None:
            elapsed = time.monotonic() - (self._last_time_saved or 0.0)
            due = bool(trainer.strategy.broadcast(self.schedule.time_due(elapsed), src=0)) or due
        if self.auto is not None:  # every rank measures; global rank 0 decides for all
            due = bool(trainer.strategy.broadcast(self.auto.due(self.manager, trainer.global_step), src=0)) or due
        if not (due or preempted):
            return
        if not _mid_epoch(trainer):
            # Lightning cannot resume from the last batch before its epoch has ended: save at the epoch's end
            self._due_at_epoch_end = True
            return
        if self._last_saved_step != trainer.global_step:
            self.save(trainer, pl_module)
        if preempted:
            self._stop_for_preemption(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._validated_since_save = True
        if not self._saves_on_train_epoch_end(trainer) and self._epoch_due(trainer) and self._last_saved_step != trainer.global_step:
            self.save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save when this epoch is one of every ``every_n_epochs``; Lightning has validated it by now.

        A save that fell due at the epoch's last batch (by steps, time or preemption) is taken here,
        after validation, where Lightning can resume from it.
        """
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        due, self._due_at_epoch_end = self._due_at_epoch_end, False
        if self._saves_on_train_epoch_end(trainer) and self._epoch_due(trainer):
            self.save(trainer, pl_module)
        preempted = self._preemption.requested(functools.partial(trainer.strategy.reduce_boolean_decision, all=False))
        if (due or preempted) and self._last_saved_step != trainer.global_step:
            self.save(trainer, pl_module)
        if preempted:
            self._stop_for_preemption(trainer)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return self.schedule.epoch_due(trainer.current_epoch)

    def _saves_on_train_epoch_end(self, trainer: pl.Trainer) -> bool:
        """``ModelCheckpoint``'s rule: at the end of the training epoch unless validation runs at other times."""
        if self.save_on_train_epoch_end is not None:
            return self.save_on_train_epoch_end
        if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.check_val_every_n_epoch != 1:
            return False
        batches = trainer.num_val_batches
        if (sum(batches) if isinstance(batches, list) else batches) == 0:
            return True
        return trainer.val_check_interval == 1.0

    def _stop_for_preemption(self, trainer: pl.Trainer) -> None:
        """Wait for the checkpoint to be on disk, put the signal handlers back, and end ``fit``."""
        rank_zero_warn(self._preemption.stop(self.manager, trainer.global_step, "fit(..., ckpt_path='last')"))
        raise SIGTERMException()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``every="auto"``, save the final state unless it is saved already; with a fixed
        schedule the last epoch's checkpoint is saved by now (``ModelCheckpoint`` would save "last" here)."""
        if self.auto is not None and not trainer.fast_dev_run and self._last_saved_step != trainer.global_step:
            self.save(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wait for the last asynchronous save; raise its error (on every rank) if it failed."""
        self._preemption.end()
        if not self.manager.async_save:
            return
        error: CheckpointError | None = None
        if trainer.is_global_zero:
            try:
                self.manager.wait()
            except CheckpointError as exc:
                error = exc
        message = None
        if error is not None:  # the predicted list included the failed save; say what is really there
            committed = [entry.name for entry in self.manager.checkpoints()]
            message = {"error": str(error), "error_type": type(error).__name__, "checkpoints": committed}
        outcome = trainer.strategy.broadcast(message, src=0)
        if outcome is not None:
            self.checkpoint_names = list(outcome["checkpoints"])
        if error is not None:
            raise error
        if outcome is not None:
            raise _error_type(outcome["error_type"])(f"global rank 0 could not save the checkpoint: {outcome['error']}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Write nothing: a run resumes from its last checkpoint, which is on disk.

        With asynchronous saves, wait for the save in flight so that it commits; if it failed,
        warn instead of hiding the exception that stopped training.
        """
        self._preemption.end()
        try:
            self.manager.close()
        except Exception as error:  # noqa: BLE001 - the original exception is the one to raise
            rank_zero_warn(f"a background checkpoint save failed while training stopped on an error: {error}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Flush and free the asynchronous staging buffer; keep every checkpoint."""
        self._preemption.end()
        self._stage = None
        self._rng_at_first_batch = None
        self._loaders.ended()
        if isinstance(trainer.strategy.checkpoint_io, ManagerCheckpointIO):
            trainer.strategy.checkpoint_io.fitting = False
        self.manager.close()

    def state_dict(self) -> dict[str, Any]:
        """The global RNG states, so ``ckpt_path="last"`` continues the same random streams.

        Only tensors, numbers, strings, tuples and lists: Lightning puts this state into every
        checkpoint, also the ``.ckpt`` files of a ``ModelCheckpoint`` beside this callback, which
        torch's weights-only loader must be able to read.
        """
        state = {
            "rng": portable_rng_state(capture_rng_state()),
            "mid_epoch": self._saving_mid_epoch,
            "world_size": self._world_size,
            "any_world_size": self._saving_any_world_size,
        }
        if self._saving_generators is not None:
            state["sampler_generators"] = self._saving_generators
        return state

    _saving_mid_epoch = False
    _saving_any_world_size = False
    _resplit_epoch = False
    _saving_generators: list[list[torch.Tensor]] | None = None
    _world_size = 1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Inside an epoch of a loader without a length, keep the position after the last batch trained
        (Lightning's is one batch ahead; see :mod:`ckpt_plugin._lightning_loaders`)."""
        self._loaders.correct(trainer, checkpoint, self._saving_mid_epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Put the global RNG states back when resuming a fit.

        Lightning restores callbacks before it creates the first training iterator, which draws from
        the global generator. At an epoch's end that is what the uninterrupted run did next, so the
        states are restored now; mid-epoch the uninterrupted run had drawn it already, so the states
        are restored at the first batch, after the iterator (restored by its own ``load_state_dict``
        when it is stateful) has been created. A mid-epoch state saved at another world size is
        refused (:func:`ckpt_plugin._data_state.check_world_size`): each rank's loader position counts
        the samples of its own shard, unless a ``ResumableDistributedSampler`` held it.
        """
        if self._stage != "fit" or state_dict.get("rng") is None:
            return
        if state_dict.get("mid_epoch") and "world_size" in state_dict:
            # mid-epoch, the loader's position counts the samples of each rank's shard
            data_state.check_world_size(state_dict, self._world_size, "the checkpoint resumed from")
            self._resplit_epoch = state_dict["world_size"] != self._world_size
        if state_dict.get("mid_epoch"):
            self._rng_at_first_batch = state_dict["rng"]
        else:
            restore_rng_state(state_dict["rng"])
            if state_dict.get("sampler_generators"):
                self._loaders.resumed_at_epoch_end(state_dict["rng"], state_dict["sampler_generators"])


    # ------------------------------------------------------------------------------------------- saving

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CheckpointInfo | None:
        """Save a checkpoint now; must be called on every rank. Returns what was saved (on rank zero).

        Every rank takes part in Lightning's save barrier and in one broadcast of rank zero's
        outcome, then records the same list of checkpoints in ``checkpoint_names``. A failure on
        rank zero is raised on every rank. With ``async_save`` the returned record is the pending
        one (no ``files`` yet) and ``checkpoint_names`` is the list as it will be once it commits.
        """
        request = SaveRequest(
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            metrics={},
            config=_config_of(trainer, pl_module),
        )
        if trainer.is_global_zero:
            try:
                request.metrics = plain_metrics(dict(trainer.callback_metrics))
                self._check_best_metric(trainer, request.metrics)
            except CheckpointError as exc:
                request.error = exc
        if _sharded_strategy(trainer.strategy):  # every rank writes: all must know of rank zero's error first
            problem = json.loads(trainer.strategy.broadcast(_outcome_message(request), src=0))
            if problem.get("error") is not None:
                if request.error is not None:
                    raise request.error
                raise _error_type(problem["error_type"])(f"global rank 0 could not save the checkpoint: {problem['error']}")
        self._saving_mid_epoch = _mid_epoch(trainer)
        self._saving_any_world_size = _resumes_at_any_world_size(trainer)
        self._saving_generators = None if self._saving_mid_epoch else self._loaders.generators_to_save(trainer)
        try:
            trainer.save_checkpoint(self.manager.checkpoint_dir, weights_only=self.save_weights_only, storage_options=request)
        finally:
            self._saving_mid_epoch = self._saving_any_world_size = False
            self._saving_generators = None
        if trainer.is_global_zero and request.error is None and request.outcome is None:
            request.error = CheckpointError(
                f"the {type(trainer.strategy).__name__} strategy did not pass the checkpoint to its CheckpointIO "
                "plugin, so nothing was saved"
            )
        outcome = json.loads(trainer.strategy.broadcast(_outcome_message(request), src=0))
        self._validated_since_save = False
        self._last_saved_step = trainer.global_step
        self._last_time_saved = time.monotonic()
        if outcome.get("error") is not None:
            if request.error is not None:
                raise request.error
            raise _error_type(outcome["error_type"])(f"global rank 0 could not save the checkpoint: {outcome['error']}")
        self.checkpoint_names = list(outcome["checkpoints"])
        return request.info

    def _check_best_metric(self, trainer: pl.Trainer, metrics: Mapping[str, Any]) -> None:
        """Once validation ran (or when there is none), the metric ranking checkpoints must be logged."""
        if not (self._validated_since_save or not trainer.enable_validation):
            return
        metric, keep_top_k = self.manager.metric_for_best, self.manager.keep_top_k
        check_metric_logged(
            metric,
            metrics,
            ranked_by=f", which keep_top_k={keep_top_k} ranks checkpoints by," if keep_top_k > 1 else "",
            reported="logged",
            fix=f"log it with self.log({metric!r}, value), rank by one of these instead, or pass metric_for_best=None "
            "to rank none and keep only the latest checkpoints",
        )


def _sharded_strategy(strategy: Strategy) -> bool:
    """Whether every rank of ``strategy`` holds a shard of the state: FSDP or model parallel."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def _install_sharded_hooks(strategy: Strategy, manager: CheckpointManager, *, callback_states: bool) -> None:
    """Route the checkpoints of an FSDP or model-parallel strategy through ``manager``.

    These strategies write checkpoints themselves, on every rank, instead of through a
    ``CheckpointIO``; their ``save_checkpoint`` and ``load_checkpoint`` are replaced on this
    strategy object. A save becomes the manager's collective save (each rank writes its own
    shards, no gather); a load of a manager checkpoint restores the sharded model and optimizer
    in place, at any world size, and returns the rest of Lightning's dict, as these strategies'
    own ``load_checkpoint`` does. Any other path goes to the strategy's own methods. Without
    ``callback_states`` (validating, testing, predicting) loads leave the callbacks' states out,
    as :class:`ManagerCheckpointIO` does.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy) and strategy._state_dict_type != "sharded":
        raise ConfigurationError(
            "CheckpointCallback saves FSDP models as sharded checkpoints, each rank its own shards; "
            "use FSDPStrategy(state_dict_type='sharded')"
        )
    if isinstance(strategy, ModelParallelStrategy) and not strategy._save_distributed_checkpoint:
        raise ConfigurationError(
            "CheckpointCallback saves model-parallel models as sharded checkpoints, each rank its own shards; "
            "use ModelParallelStrategy(save_distributed_checkpoint=True)"
        )
    own = getattr(strategy, "_ckpt_plugin_own", None) or (strategy.save_checkpoint, strategy.load_checkpoint)
    strategy._ckpt_plugin_own = own  # type: ignore[attr-defined]
    own_save, own_load = own

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not isinstance(storage_options, SaveRequest):
            own_save(checkpoint, filepath, storage_options=storage_options)
            return
        request = storage_options
        try:
            if len(checkpoint.get("optimizer_states", [])) > 1:
                raise ConfigurationError("a sharded checkpoint holds one optimizer; this module configures several")
            parts = split_checkpoint(checkpoint)
            info = manager.save(
                epoch=request.epoch, step=request.step, metrics=request.metrics, config=request.config, **parts
            )
            request.info = info
            request.outcome = {"saved": info.name, "checkpoints": [entry.name for entry in manager.checkpoints()]}
        except Exception as exc:  # the collective save failed on every rank; the callback raises it
            request.error = exc

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        info = _checkpoint_to_load(manager, checkpoint_path)
        if info is None:
            return own_load(checkpoint_path, weights_only=weights_only)
        if not info.sharded:
            raise ConfigurationError(
                f"{info.path} was saved by one process, not by this sharded strategy; load its weights with "
                "CheckpointManager.load() and start a new fit"
            )
        optimizers = strategy.optimizers
        if len(optimizers) > 1:
            raise ConfigurationError("a sharded checkpoint holds one optimizer; this module configures several")
        module = strategy.lightning_module
        assert module is not None
        manager.restore(strategy.model, optimizers[0] if optimizers else None, which=info,
                        strict=module.strict_loading, restore_rng=False)
        loaded = read_checkpoint(info, items=("scheduler", "extra"))
        loaded["model"] = None
        checkpoint = join_checkpoint(loaded)
        del checkpoint["state_dict"]
        checkpoint.pop("optimizer_states", None)
        if not callback_states:
            checkpoint.pop("callbacks", None)
        return checkpoint

    strategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]


def _keep_best(keep_best: bool | None, metric_for_best: str | None) -> bool:
    """``keep_best`` as given, or by default on exactly when there is a metric to rank by."""
    if keep_best is None:
        return metric_for_best is not None
    if keep_best and metric_for_best is None:
        raise ConfigurationError(
            "keep_best=True keeps the best checkpoint by metric_for_best, but metric_for_best=None ranks none; "
            "name the metric to rank by (one you log with self.log, e.g. metric_for_best='val_loss'), "
            "or leave keep_best out to keep only the latest checkpoints"
        )
    return bool(keep_best)


def _step_completed(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether this batch ended an optimizer step (gradient accumulation); only then is a checkpoint consistent."""
    if not trainer.lightning_module.automatic_optimization:
        return True
    accumulate = trainer.accumulate_grad_batches
    return (batch_idx + 1) % accumulate == 0 or bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The train loaders as Lightning prepared them (with the samplers it put in), flattened in the
    order of Lightning's checkpoint."""
    iterables = trainer.train_dataloader
    return [] if iterables is None else list(CombinedLoader(iterables).flattened)


def _resumes_at_any_world_size(trainer: pl.Trainer) -> bool:
    """Whether the train loader's position continues mid-epoch at another world size (one loader:
    the batches of several combined ones would not stay in step)."""
    loaders = _train_loaders(trainer)
    return len(loaders) == 1 and data_state.resumes_at_any_world_size(loaders[0])


def _warn_if_order_not_restored(trainer: pl.Trainer) -> None:
    """Say so when a mid-epoch resume under DDP cannot draw the interrupted epoch's order again.

    Lightning shards a sampler it does not know (torchdata's ``RandomSampler``, which a
    ``StatefulDataLoader(shuffle=True)`` builds) with a ``DistributedSamplerWrapper``, which keeps no
    state: the resumed epoch is drawn from the wrapped sampler's generator as it is now."""
    if all(data_state.sampler_of(loader, DistributedSamplerWrapper) is None for loader in _train_loaders(trainer)):
        return
    rank_zero_warn(
        "resuming inside an epoch under DDP with Lightning's DistributedSamplerWrapper around the loader's own sampler "
        "(torchdata's RandomSampler, from StatefulDataLoader(shuffle=True)): the wrapper keeps no position, so the rest "
        "of the epoch follows another order and repeats some samples while missing others. Give the loader "
        "sampler=ckpt_plugin.ResumableDistributedSampler(dataset) (or torch's DistributedSampler) to resume it exactly"
    )


def _count_batches_left_after_resplit(trainer: pl.Trainer) -> None:
    """After a mid-epoch resume at another world size, count the resumed epoch's batches done as
    ``len(loader)`` less the batches this rank's loader has left, so that Lightning ends the epoch
    (``is_last_batch``, its validation) at the loader's last batch.

    Lightning restored the batches each rank had trained in the interrupted layout; the
    ``ResumableDistributedSampler`` split what was left over this run's ranks, who have more or
    fewer batches of it left."""
    (loader,) = _train_loaders(trainer)  # saved as resumable at any world size only with one loader
    left = data_state.sampler_of(loader, ResumableDistributedSampler).samples_left()
    batches_left = left // loader.batch_size if loader.drop_last else -(-left // loader.batch_size)
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    shift = max(int(trainer.num_training_batches) - batches_left, 0) - current.ready
    # moved together: a save at a batch's end holds one batch fewer completed, which Lightning adds back
    current.ready, current.started = current.ready + shift, current.started + shift
    current.processed, current.completed = current.processed + shift, current.completed + shift


def _mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether a save now is taken inside a training epoch: more of its batches follow from the same iterator."""
    return not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(CheckpointCallback.__init__).parameters.items()}
"""The callback's defaults: a manager option that differs from its default was given (see ``manager=``)."""


class AutoResumingCheckpointCallback(OnExceptionCheckpoint, CheckpointCallback):
    """What ``CheckpointCallback(..., auto_resume=True)`` builds.

    Lightning makes ``fit()`` without ``ckpt_path`` resume from an ``OnExceptionCheckpoint``'s
    ``ckpt_path``; here that is the manager's latest checkpoint (a fresh directory starts fresh).
    Everything else is :class:`CheckpointCallback`'s: nothing is written on an exception.
    """

    ckpt_path = CheckpointCallback.ckpt_path
    on_exception = CheckpointCallback.on_exception
    teardown = CheckpointCallback.teardown

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CheckpointCallback.__init__(self, *args, **{**kwargs, "auto_resume": True})


_AUTO_RESUME_NOTICES = (
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint available",
)


@functools.cache
def _auto_resuming(cls: type[CheckpointCallback]) -> type[CheckpointCallback]:
    """The auto-resuming variant of :class:`CheckpointCallback` or of a subclass of it."""
    if cls is CheckpointCallback:
        return AutoResumingCheckpointCallback
    namespace = {name: getattr(cls, name) for name in ("on_exception", "teardown")}
    namespace["ckpt_path"] = CheckpointCallback.ckpt_path
    return type(f"AutoResuming{cls.__name__}", (OnExceptionCheckpoint, cls), namespace)


# ------------------------------------------------------------------------------------------- inference


def load_from_checkpoint(
    cls: type[ModuleOrData],
    checkpoint_dir: str | os.PathLike[str],
    which: str | int = "best",
    map_location: Any = None,
    strict: bool | None = True,
    instantiate: Collection[type] = (),
    *,
    storage_options: Mapping[str, Any] | None = None,
    **hparam_overrides: Any,
) -> ModuleOrData:
    """Rebuild a ``LightningModule`` (or ``LightningDataModule``) from a checkpoint, as
    ``cls.load_from_checkpoint(path)`` does for a ``.ckpt`` file.

    Lightning's own classmethod ``cls.load_from_checkpoint`` reads one ``.ckpt`` file and cannot
    read these checkpoint directories; call this function instead.

    ``checkpoint_dir`` is the callback's ``checkpoint_dir`` (a local directory or an object store
    URL such as ``s3://bucket/run/checkpoints``: any location ``CheckpointManager`` takes), from
    which ``which`` (``"best"``, ``"latest"`` or an epoch number) picks the checkpoint, or one
    checkpoint itself (its directory or URL, or the callback's ``best_model_path``).
    ``storage_options`` configure the object store's fsspec file system as for
    ``CheckpointManager``. ``"best"`` ranks by the ``metric_for_best`` and ``mode`` the checkpoints
    recorded; when they recorded none (``metric_for_best=None``), ``"best"`` is the latest, as
    ``ckpt_path="best"`` is. Files are verified against their checksums and nothing is unpickled.

    As in Lightning: the saved hyper-parameters, updated with ``hparam_overrides``, go to the
    constructor (the module's own; the datamodule's are kept for a ``LightningDataModule``
    class), ``on_load_checkpoint`` runs, the weights load with ``strict``, and the module is
    returned on the device of the loaded weights (CPU unless ``map_location`` says otherwise;
    a callable or dict ``map_location`` loads to CPU).

    The hyper-parameters are plain data: nothing they name is imported or built. Those that
    LightningCLI records (``_instantiator``, ``_class_path``, and ``class_path`` / ``init_args``
    for a nested class) are refused, unless the class they name is in ``instantiate``: then a
    ``_class_path`` picks that subclass of ``cls``, and each nested ``{"class_path": ...,
    "init_args": {...}}`` is built as ``cls(**init_args)``. Strings stay strings (no callable is
    looked up by name), and ``_instantiator`` is never called.

    Raises :class:`~ckpt_plugin.CheckpointNotFoundError` when there is no such checkpoint and
    :class:`~ckpt_plugin.IncompatibleCheckpointError` for one not written by
    :class:`CheckpointCallback`, whose hyper-parameters name a class not in ``instantiate``, or
    from which ``cls`` cannot be built (a hyper-parameter or weight the class does not accept).
    """
    from lightning.pytorch.core.saving import _load_state

    if not (isinstance(cls, type) and issubclass(cls, (pl.LightningModule, pl.LightningDataModule))):
        raise ConfigurationError(f"load_from_checkpoint needs a LightningModule or LightningDataModule class, not {cls!r}")
    allowed = _allowed_classes(instantiate)
    info = _resolve_checkpoint(checkpoint_dir, which, storage_options)
    loaded = read_checkpoint(info, map_location=_device(map_location))
    checkpoint = join_checkpoint({**loaded, "metadata": {**loaded.get("metadata", {}), "path": str(info.path)}})
    target = _plain_hparams(cls, checkpoint, allowed, info.path)
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(hparam_overrides)
    try:
        if issubclass(target, pl.LightningDataModule):
            return _load_state(target, checkpoint, **hparam_overrides)  # type: ignore[return-value]
        module = _load_state(target, checkpoint, strict=strict, **hparam_overrides)
    except (TypeError, ValueError, RuntimeError, LookupError, AttributeError) as exc:
        raise errors.IncompatibleCheckpointError(
            f"cannot rebuild {target.__name__} from {info.path}: {exc}; check that the class matches the one trained"
        ) from exc
    device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor)), None)
    return module if device is None else module.to(device)  # type: ignore[return-value]


_CODE_KEYS = ("_instantiator", "_class_path", "class_path", "init_args")
"""Keys through which LightningCLI's hyper-parameters name code to import and call."""


def _allowed_classes(instantiate: Collection[type]) -> dict[str, type]:
    """``instantiate`` by the import path a ``class_path`` would name them with."""
    if not isinstance(instantiate, Collection) or isinstance(instantiate, (str, bytes)) or not all(
        isinstance(c, type) for c in instantiate
    ):
        raise ConfigurationError(f"instantiate takes the classes a checkpoint may build, such as [MyEncoder], not {instantiate!r}")
    return {f"{c.__module__}.{c.__qualname__}": c for c in instantiate}


def _plain_hparams(cls: type[ModuleOrData], checkpoint: dict[str, Any], allowed: dict[str, type], path: Any) -> type[ModuleOrData]:
    """Make the hyper-parameters in ``checkpoint`` that ``cls`` is built from plain data, in place,
    and return the class to build: ``cls``, or the allowed subclass a ``_class_path`` names.

    Keys through which the hyper-parameters name code are refused unless the class is allowed;
    allowed nested classes are built here, so Lightning's loader never instantiates anything."""
    target: type[ModuleOrData] = cls
    keys = [cls.CHECKPOINT_HYPER_PARAMS_KEY]
    if issubclass(cls, pl.LightningModule):
        from lightning.pytorch.core.saving import CHECKPOINT_PAST_HPARAMS_KEYS

        keys += [key for key in CHECKPOINT_PAST_HPARAMS_KEYS if key in checkpoint]
    for key in keys:
        hparams = checkpoint.get(key)
        if hparams is None:
            hparams = checkpoint[key] = {}
        if not isinstance(hparams, Mapping):
            raise errors.IncompatibleCheckpointError(f"{path}: the hyper-parameters {key!r} are not a mapping but {type(hparams).__name__}")
        hparams = dict(hparams)
        class_path = None
        if allowed:  # LightningCLI's top-level keys: its instantiator (never called) and the subclass to build
            hparams.pop("_instantiator", None)
            class_path = hparams.pop("_class_path", None)
        if class_path is not None:
            target = _allowed_class(class_path, allowed, path, f"{key}._class_path")
            if not issubclass(target, cls):
                raise errors.IncompatibleCheckpointError(
                    f"{path}: {key}._class_path names {class_path!r}, which is not a subclass of {cls.__name__}"
                )
        checkpoint[key] = {name: _built(value, allowed, path, f"{key}.{name}") for name, value in hparams.items()}
        _refuse_code_keys(checkpoint[key], path, key)
    if not isinstance(checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_TYPE), (str, type(None))):
        checkpoint[cls.CHECKPOINT_HYPER_PARAMS_TYPE] = None
    return target


def _built(value: Any, allowed: dict[str, type], path: Any, where: str) -> Any:
    """``value`` with each ``{"class_path": ..., "init_args": ...}`` of an allowed class built."""
    if not allowed:
        return value
    if isinstance(value, Mapping):
        if "class_path" in value:
            klass = _allowed_class(value["class_path"], allowed, path, f"{where}.class_path")
            arguments = {**(value.get("init_args") or {}), **(value.get("dict_kwargs") or {})}
            built = {name: _built(item, allowed, path, f"{where}.{name}") for name, item in arguments.items()}
            try:
                return klass(**built)
            except (TypeError, ValueError) as exc:
                raise errors.IncompatibleCheckpointError(f"{path}: cannot build {where} as {klass.__name__}: {exc}") from exc
        return {name: _built(item, allowed, path, f"{where}.{name}") for name, item in value.items()}
    if isinstance(value, list):
        return [_built(item, allowed, path, f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def _allowed_class(name: Any, allowed: dict[str, type], path: Any, where: str) -> type:
    if isinstance(name, str) and name in allowed:
        return allowed[name]
    raise errors.IncompatibleCheckpointError(
        f"{path}: the hyper-parameter {where} names the class {name!r}, which is not in instantiate=[...]; "
        "a checkpoint never chooses what is imported or built: pass the classes you trust, e.g. instantiate=[MyEncoder]"
    )


def _refuse_code_keys(value: Any, path: Any, where: str) -> None:
    """Refuse the first hyper-parameter that names code to import or call (see :data:`_CODE_KEYS`)."""
    stack = [(value, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, Mapping):
            named = next((key for key in _CODE_KEYS if key in node), None)
            if named is not None:
                raise errors.IncompatibleCheckpointError(
                    f"{path}: the hyper-parameter {at}.{named} ({node[named]!r}) names code to import or build; "
                    "hyper-parameters are loaded as plain data. If you trust this checkpoint, pass the classes "
                    "it may build: load_from_checkpoint(..., instantiate=[MyEncoder])"
                )
            stack.extend((item, f"{at}.{key}") for key, item in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((item, f"{at}[{index}]") for index, item in enumerate(node))


ModuleOrData = TypeVar("ModuleOrData", pl.LightningModule, pl.LightningDataModule)


def _resolve_checkpoint(
    location: str | os.PathLike[str], which: str | int, storage_options: Mapping[str, Any] | None
) -> CheckpointInfo:
    """The checkpoint ``location`` names: one checkpoint, or a run's directory or URL, of which
    ``which`` picks one (``"best"`` is the latest when no checkpoint recorded a ``metric_for_best``)."""
    place = Location.of(location, storage_options)  # as CheckpointManager takes it; refuses options for a local path
    one = info_at(Location(_without_manifest(str(place)), place.storage_options))
    if one is not None:
        return one
    if place.is_missing_directory():
        raise errors.CheckpointNotFoundError(
            f"{location} is not a directory; pass the CheckpointCallback's checkpoint_dir or one of its checkpoints"
        )
    manager = CheckpointManager(location, max_checkpoints=None, storage_options=storage_options)
    if which == "best" and all(info.metric_for_best is None for info in manager.checkpoints()):
        which = "latest"  # the run ranked nothing (metric_for_best=None): its best is its latest
    found = manager.resolve(which)
    if found is None:
        raise errors.CheckpointNotFoundError(f"{manager.checkpoint_dir} holds no checkpoint yet")
    return found


def _device(map_location: Any) -> str | torch.device | None:
    """The device to load onto: a device or its name; None (CPU) for the callables and dicts Lightning also accepts."""
    return map_location if isinstance(map_location, (str, torch.device)) else None


def _config_of(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    config: dict[str, Any] = dict(pl_module.hparams) if pl_module.hparams else {}
    datamodule = trainer.datamodule
    if datamodule is not None and datamodule.hparams:
        config["datamodule"] = dict(datamodule.hparams)
    return config


def _outcome_message(request: SaveRequest) -> str:
    if request.error is not None:
        return json.dumps({"error": str(request.error), "error_type": type(request.error).__name__})
    return json.dumps({"error": None, **(request.outcome or {"checkpoints": []})})


def _error_type(name: str) -> type[CheckpointError]:
    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, CheckpointError) else CheckpointError


__all__ = [
    "AutoResumingCheckpointCallback",
    "CheckpointCallback",
    "ManagerCheckpointIO",
    "SaveRequest",
    "checkpoint_info",
    "join_checkpoint",
    "load_from_checkpoint",
    "split_checkpoint",
]
