"""Hugging Face ``Trainer`` integration: one callback hands the run's checkpoints to a manager.

    trainer = Trainer(model=model, args=args, ..., callbacks=[CheckpointCallback()])
    trainer.train()
    trainer.train(resume_from_checkpoint=True)      # later: resumes from the manager's latest

How a callback alone takes the checkpoints over from the Trainer:

* **Saving.** ``DefaultFlowCallback`` raises ``control.should_save`` when the Trainer would save.
  This callback runs after it, lowers the flag again, so ``Trainer._save_checkpoint`` never runs (no
  pickle, no rotation of its own), and saves through the manager at the last callback event before
  the point where the Trainer would have saved: ``on_evaluate`` when an evaluation runs there (so
  the checkpoint holds its metrics), else ``on_log`` when that step is logged, else at once.
* **What a checkpoint holds.** Model, optimizer, scheduler and RNG states (the manager's format), the
  model config and ``TrainingArguments`` as JSON config, ``trainer_state.json`` (the one file
  ``Trainer.train`` insists on reading from any directory it resumes from), and ``config.json`` and
  ``generation_config.json`` as ``save_pretrained`` writes them, so that
  ``AutoModelForCausalLM.from_pretrained(checkpoint)`` loads it. A relative symbolic link
  ``checkpoint-<step>`` in ``output_dir`` points at the newest checkpoint, so that the Trainer's
  ``get_last_checkpoint`` (``resume_from_checkpoint=True``) finds it, also after ``output_dir`` moved.
  The link moves only once the checkpoint has committed (``save(on_commit=...)``): with
  ``async_save=True`` that is on the manager's background thread, while training goes on, so the
  link never names a checkpoint that a crash could still lose.
* **Resuming.** The Trainer loads ``model.safetensors`` and ``trainer_state.json`` itself and, finding
  no ``optimizer.pt``, ``scheduler.pt`` or ``rng_state.pth``, skips the rest. ``on_train_begin`` then
  restores the verified weights, the optimizer and the scheduler from the manager checkpoint of the
  resumed step, and the RNG states are put back exactly where the Trainer would put back its own: at
  the start of the epoch, or after the skipped batches when the run stopped mid-epoch. With a
  stateful train loader (accelerate's ``use_stateful_dataloader``) every checkpoint holds its
  position as JSON and tensors, which goes back into the loader on a resume inside an epoch, and
  the Trainer then skips no batch (see ``_DataResume``). Nothing is
  unpickled: should the newest ``checkpoint-<step>`` hold any file its format does not name (a
  planted ``rng_state.pth``, which the Trainer would ``torch.load``), the callback raises
  :class:`~ckpt_plugin.ForeignFileError` when the Trainer is built and when training begins.
* **Best model.** The Trainer never learns a best checkpoint path (``state.best_model_checkpoint``
  stays None while training), so neither its ``save_total_limit=1`` clean-up nor its path-based best
  loading runs. ``on_train_end`` loads the manager's best weights instead, after closing the manager
  (which waits for an asynchronous save in flight and raises its error, if it failed).
* **save_strategy="best".** The Trainer saves after an evaluation when the metric beats
  ``state.best_metric``, after every callback has run. The callback saves in ``on_evaluate`` and
  records the new best in ``state.best_metric`` / ``best_global_step`` itself, as the Trainer would,
  so the Trainer sees no improvement left and writes nothing.
* **Preemption.** With ``save_on_preemption`` a signal is only recorded; at the next ``on_step_end``
  (ranks vote under ``torch.distributed``) the callback saves, waits for the save, and sets
  ``should_training_stop``, so ``train()`` returns after that step.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

try:
    from transformers.optimization import GreedyLR

    METRIC_SCHEDULERS: tuple[type, ...] = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)
except ImportError:  # transformers releases before GreedyLR
    METRIC_SCHEDULERS = (torch.optim.lr_scheduler.ReduceLROnPlateau,)

from . import _data_state as data_state
from ._callback_core import AutoSchedule, ManagerOptions, PreemptionStop, SaveSchedule, check_metric_logged, check_ranking, given_manager
from . import CheckpointInfo, Location, restore_rng_state
from .errors import CheckpointError, CheckpointNotFoundError, ConfigurationError, ForeignFileError, StorageError
from ._local_dirs import publish_dir, remove_dirs, remove_link, set_link, symlinks
from .manager import CheckpointManager

TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
LINK_PATTERN = re.compile(r"checkpoint-(0|[1-9][0-9]*)", re.ASCII)  # matched in full: only names this module makes
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")


class _FromArgs:
    def __repr__(self) -> str:
        return "FROM_ARGS"


FROM_ARGS: Any = _FromArgs()
"""Default of :class:`CheckpointCallback` parameters whose ``None`` has a meaning of its own."""


def eval_metric_name(name: str) -> str:
    """The key of metric ``name`` in the Trainer's evaluation metrics (``loss`` -> ``eval_loss``)."""
    return name if name.startswith("eval_") else f"eval_{name}"


@dataclass(frozen=True)
class Settings:
    """What a :class:`CheckpointCallback` does, resolved from its parameters and ``TrainingArguments``."""

    checkpoint_dir: Path | str
    max_checkpoints: int | None
    keep_best: bool
    metric_for_best: str | None
    mode: str
    save_strategy: str
    save_steps: float
    load_best_at_end: bool
    keep_top_k: int | None = None
    save_only_model: bool = False
    save_on_each_node: bool = False

    @classmethod
    def resolve(
        cls,
        args: TrainingArguments,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        max_checkpoints: int | None = FROM_ARGS,
        keep_best: bool | None = None,
        metric_for_best: str | None = FROM_ARGS,
        mode: str | None = None,
        save_strategy: str | None = None,
        save_steps: float | None = None,
        load_best_model_at_end: bool | None = None,
        keep_top_k: int | None = None,
        save_only_model: bool | None = None,
        save_on_each_node: bool | None = None,
    ) -> Settings:
        """Explicit values win; everything left out comes from ``args`` the way the Trainer reads it.

        ``metric_for_best=None`` ranks no checkpoint (whatever ``metric_for_best_model`` says), so
        nothing that needs a best checkpoint may be asked for with it."""
        args_strategy = _value(args.save_strategy)
        if args_strategy not in SAVE_STRATEGIES:
            raise ConfigurationError(
                f"save_strategy={args_strategy!r} is not one CheckpointCallback knows ({', '.join(SAVE_STRATEGIES)}), "
                "so it cannot take the Trainer's checkpoints over; use one of these"
            )
        if getattr(args, "enable_jit_checkpoint", False):
            raise ConfigurationError(
                "enable_jit_checkpoint=True makes the Trainer write its own pickled checkpoint on SIGTERM, past every "
                "callback; drop it and pass CheckpointCallback(save_on_preemption=True), which saves through the manager"
            )
        if max_checkpoints is FROM_ARGS:
            limit = args.save_total_limit
            max_checkpoints = limit if limit is not None and limit > 0 else None
        args_metric = None if args.metric_for_best_model is None else eval_metric_name(args.metric_for_best_model)
        ranks_none = metric_for_best is None
        if metric_for_best is FROM_ARGS:
            metric_for_best = args_metric
        elif metric_for_best is not None:
            metric_for_best = eval_metric_name(metric_for_best)
        same_metric = args_metric is not None and metric_for_best == args_metric
        if mode is None and same_metric and args.greater_is_better is not None:
            mode = "max" if args.greater_is_better else "min"
        if mode is None:
            mode = "min" if metric_for_best is None or metric_for_best.endswith("loss") else "max"
        load_best = args.load_best_model_at_end if load_best_model_at_end is None else load_best_model_at_end
        strategy = args_strategy if save_strategy is None else save_strategy
        if ranks_none:
            _refuse_best_without_ranking(keep_best, load_best, load_best_model_at_end is None, strategy, save_strategy is None)
        if keep_best and metric_for_best is None:
            raise ConfigurationError("keep_best=True needs a metric: set metric_for_best_model or pass metric_for_best")
        if load_best and metric_for_best is None:
            raise ConfigurationError(
                "load_best_model_at_end needs a metric: set metric_for_best_model or pass metric_for_best"
            )
        if strategy == "best" and metric_for_best is None:
            raise ConfigurationError("save_strategy='best' needs a metric: set metric_for_best_model or pass metric_for_best")
        if args_strategy == "best" and metric_for_best != args_metric:
            raise ConfigurationError(
                f"with TrainingArguments(save_strategy='best') the Trainer judges new bests by {args_metric!r}; "
                f"drop metric_for_best={metric_for_best!r} or set metric_for_best_model to it"
            )
        check_ranking(keep_top_k, metric_for_best)
        if (keep_top_k or strategy == "best") and _value(args.eval_strategy) == "no":
            option = f"keep_top_k={keep_top_k}" if keep_top_k else "save_strategy='best'"
            raise ConfigurationError(
                f"{option} ranks checkpoints by {metric_for_best!r}, an evaluation metric, but eval_strategy='no' "
                "never evaluates; set eval_strategy or drop the option"
            )
        return cls(
            checkpoint_dir=_location(checkpoint_dir if checkpoint_dir is not None else args.output_dir),
            max_checkpoints=max_checkpoints,
            keep_best=bool(args.load_best_model_at_end and metric_for_best is not None) if keep_best is None else keep_best,
            metric_for_best=metric_for_best,
            mode=mode,
            save_strategy=strategy,
            save_steps=args.save_steps if save_steps is None else save_steps,
            load_best_at_end=bool(load_best),
            keep_top_k=keep_top_k,
            save_only_model=bool(args.save_only_model if save_only_model is None else save_only_model),
            save_on_each_node=bool(args.save_on_each_node if save_on_each_node is None else save_on_each_node),
        )

    def should_save(self, args: TrainingArguments) -> bool:
        """Whether this process writes: global rank 0, or each node's local rank 0 with ``save_on_each_node``."""
        return (args.local_process_index if self.save_on_each_node else args.process_index) == 0

    def is_new_best(self, value: float, best: float | None) -> bool:
        """The Trainer's rule for a new best metric (strictly better than ``state.best_metric``)."""
        if best is None:
            return not math.isnan(value)
        return value > best if self.mode == "max" else value < best

    def save_due_at_step(self, state: TrainerState) -> bool:
        """Whether the Trainer would save at the end of this optimizer step (as ``DefaultFlowCallback``)."""
        if self.save_strategy != "steps":
            return False
        every = math.ceil(state.max_steps * self.save_steps) if self.save_steps < 1 else int(self.save_steps)
        return SaveSchedule(every_n_steps=max(every, 0)).step_due(state.global_step) or state.global_step >= state.max_steps


def _refuse_best_without_ranking(
    keep_best: bool | None, load_best: bool, load_best_from_args: bool, strategy: str, strategy_from_args: bool
) -> None:
    """Refuse, with ``metric_for_best=None``, each setting that needs a best checkpoint."""
    from_args = " (from the TrainingArguments)"
    conflicts = [
        (keep_best, "keep_best=True", "drop keep_best"),
        (load_best, "load_best_model_at_end=True" + (from_args if load_best_from_args else ""),
         "pass load_best_model_at_end=False"),
        (strategy == "best", "save_strategy='best'" + (from_args if strategy_from_args else ""),
         "pass another save_strategy"),
    ]
    wanted = [(setting, fix) for on, setting, fix in conflicts if on]
    if wanted:
        raise ConfigurationError(
            f"metric_for_best=None ranks no checkpoint, but {' and '.join(setting for setting, _ in wanted)} needs a "
            "best one; name the metric to rank by (e.g. metric_for_best='eval_loss'), or "
            + " and ".join(fix for _, fix in wanted)
        )


class CheckpointCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` whose :class:`~ckpt_plugin.CheckpointManager` replaces the
    Trainer's own checkpoints: safetensors and JSON, atomic, never a pickle.

    Every parameter left out is taken from the run's ``TrainingArguments`` when the ``Trainer`` is built:

    Args:
        checkpoint_dir: where the checkpoints go; default ``output_dir``.
        max_checkpoints: keep this many most recent; default ``save_total_limit`` (None keeps all).
        keep_best: never delete the best checkpoint; default ``load_best_model_at_end`` (when there
            is a metric to rank by).
        metric_for_best: the metric ranking checkpoints; default ``metric_for_best_model``. An ``eval_``
            prefix is added when missing, as the Trainer does. ``None`` ranks none, whatever the
            arguments say: the ``max_checkpoints`` latest are kept, no best is tracked or loaded,
            and no metric is required (``keep_best``, ``load_best_model_at_end`` and
            ``save_strategy="best"`` are refused with it).
        mode: ``"min"`` or ``"max"``; default from ``greater_is_better`` (else ``"min"`` for names
            ending in ``loss``, ``"max"`` otherwise).
        save_strategy: ``"steps"``, ``"epoch"``, ``"best"`` (save after each evaluation that improves
            ``metric_for_best``) or ``"no"``; default ``save_strategy``.
        save_steps: default ``save_steps`` (a number below 1 is a fraction of the training steps).
        load_best_model_at_end: load the manager's best weights into the model when training ends;
            default ``load_best_model_at_end``.
        async_save: save in the background: training goes on once the state is copied into a
            reused host buffer (see :class:`~ckpt_plugin.CheckpointManager`). A failed background
            save is raised at the next save or when training ends.
        incremental: store the model as shards and hard-link the shards that did not change since
            the previous checkpoint (frozen backbones, adapters). Unchanged tensors are found by
            checksum (``change_detection="checksum"``, the default); ``"version"`` trusts autograd
            version counters, which the Trainer's default fused AdamW does not bump, so use it only
            with an optimizer that does.
        keep_top_k: keep the k best checkpoints by ``metric_for_best`` besides the ``max_checkpoints``
            most recent (given, it replaces ``keep_best``).
        save_only_model: save only the model weights (no optimizer, scheduler or RNG state); default
            ``save_only_model``. Such a checkpoint cannot resume training exactly.
        save_on_each_node: write on the first process of every node instead of only on the first
            process of the job (node-local disks); default ``save_on_each_node``.
        save_on_preemption: on SIGTERM or SIGUSR1, finish the current optimizer step, save a checkpoint
            (waiting for an asynchronous save in flight) and stop training: ``train()`` returns.
            Under DDP every rank stops after the same step when any rank is signalled. The next
            launch resumes with ``train(resume_from_checkpoint=True)``. The signal handlers found
            when training started are put back when it ends.
        manager: a ready :class:`~ckpt_plugin.CheckpointManager` to use instead of building one;
            its directory, retention and ranking then replace ``checkpoint_dir``,
            ``max_checkpoints``, ``keep_best``, ``metric_for_best``, ``mode`` and ``keep_top_k``,
            and passing any manager option beside it is refused.
        storage_options, change_detection, signing_key, save_rng, require_metric, collective_timeout:
            passed on to the manager as for ``CheckpointManager``, which takes every manager option:
            ``signing_key`` signs each checkpoint; ``require_metric`` is off because saves may come
            before the first evaluation.
        local_dir, keep_local, max_pending_uploads: as for ``CheckpointManager``: checkpoints
            commit in ``local_dir`` and upload to ``checkpoint_dir`` in the background.
        every: ``"auto"`` saves when :meth:`CheckpointManager.due <ckpt_plugin.CheckpointManager.due>`
            says so, at the interval ``sqrt(2 * C * MTBF)`` (Young and Daly) for the measured save
            cost ``C``, instead of the ``TrainingArguments``' save strategy (``save_strategy`` and
            ``save_steps`` are then refused). The final state is saved when training ends, and
            ``save_on_preemption`` stays in force.
        mtbf, min_interval, max_interval: with ``every="auto"``: the mean time between failures
            (seconds, or ``"6h"``; learned from the run's restarts when left out) and the bounds of
            the interval.

    The manager is :attr:`manager`, available once the callback is given to a ``Trainer`` (at
    once with ``manager=``).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        max_checkpoints: int | None = FROM_ARGS,
        keep_best: bool | None = None,
        metric_for_best: str | None = FROM_ARGS,
        mode: str | None = None,
        save_strategy: str | None = None,
        save_steps: float | None = None,
        load_best_model_at_end: bool | None = None,
        *,
        async_save: bool = False,
        incremental: bool = False,
        keep_top_k: int | None = None,
        save_only_model: bool | None = None,
        save_on_each_node: bool | None = None,
        save_on_preemption: bool = False,
        storage_options: dict[str, Any] | None = None,
        manager: CheckpointManager | None = None,
        change_detection: str = "checksum",
        signing_key: str | os.PathLike[str] | None = None,
        save_rng: bool = True,
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
        fixed = [f"{name}={value!r}" for name, value in (("save_strategy", save_strategy), ("save_steps", save_steps)) if value is not None]
        self.auto = AutoSchedule.chosen(every, mtbf, min_interval, max_interval, fixed=fixed)
        self._manager: CheckpointManager | None = given_manager(manager, arguments, _DEFAULTS)
        self._given_manager = self._manager
        if mode not in (None, "min", "max"):
            raise ConfigurationError(f"mode must be 'min' or 'max', not {mode!r}")
        if save_strategy not in (None, *SAVE_STRATEGIES):
            raise ConfigurationError(
                f"save_strategy must be one of {', '.join(SAVE_STRATEGIES)}, not {save_strategy!r}"
            )
        if save_steps is not None and not (isinstance(save_steps, (int, float)) and save_steps > 0):
            raise ConfigurationError(f"save_steps must be a positive number, not {save_steps!r}")
        self._overrides = {
            "checkpoint_dir": checkpoint_dir,
            "max_checkpoints": max_checkpoints,
            "keep_best": keep_best,
            "metric_for_best": metric_for_best,
            "mode": mode,
            "save_strategy": save_strategy,
            "save_steps": save_steps,
            "load_best_model_at_end": load_best_model_at_end,
            "keep_top_k": keep_top_k,
            "save_only_model": save_only_model,
            "save_on_each_node": save_on_each_node,
        }
        check_ranking(keep_top_k, metric_for_best, metric_known=metric_for_best is not FROM_ARGS)  # else from the arguments
        self.save_on_preemption = bool(save_on_preemption)
        self._preemption = PreemptionStop(self.save_on_preemption)
        self._preempted = False
        self._best_value = None
        self._manager_options = {
            name: arguments[name] for name in ManagerOptions.names() if name in arguments and name not in self._overrides
        }
        """The manager options that TrainingArguments do not supply, passed on as given."""
        self.settings: Settings | None = None
        self._pending = False
        self._saved_step: int | None = None
        self._last_train_log = 0
        self._rng: dict[str, Any] | None = None
        self._rng_mid_epoch = False
        self._warned_link = False
        self._data = _DataResume()

    @property
    def manager(self) -> CheckpointManager:
        """The :class:`~ckpt_plugin.CheckpointManager` holding this run's checkpoints."""
        if self._manager is None:
            raise ConfigurationError(
                "CheckpointCallback.manager exists once the callback is given to a Trainer, whose "
                "TrainingArguments supply its settings: Trainer(..., callbacks=[callback])"
            )
        return self._manager

    # ------------------------------------------------------------------ set-up and resume

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._attach(args)
        self._refuse_foreign_files(args)

    def _refuse_foreign_files(self, args: TrainingArguments) -> None:
        """Refuse a Trainer whose ``resume_from_checkpoint=True`` would read files ckpt_plugin did not write.

        The Trainer reads the checkpoint it resumes from before any callback runs, and hands
        ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``, ``pytorch_model.bin``
        and the like to ``torch.load`` (a pickle loader) when it finds them. Our checkpoints hold
        none of them, so when the newest ``checkpoint-<step>`` is one of ours (a link to one of the
        manager's checkpoints, or a resume marker) and holds any file its format does not name, the
        Trainer is refused, when it is built and again when training begins.
        """
        if args.output_dir is None:
            return
        unnamed = _foreign_resume_files(Path(args.output_dir), self.manager)
        if unnamed is not None and unnamed[1]:
            path, names = unnamed
            raise ForeignFileError(
                f"{path} holds files that ckpt_plugin did not write: {', '.join(map(repr, names))}. "
                "train(resume_from_checkpoint=True) would hand them to the Trainer, which unpickles such files "
                f"(rng_state.pth, optimizer.pt, ...) with torch.load. Remove them (ckpt verify {self.manager.checkpoint_dir} "
                "lists every one), or resume from a checkpoint you trust"
            )

    def _attach(self, args: TrainingArguments) -> Settings:
        """Resolve the settings against ``args`` and build the manager (validating both once); a
        manager given as ``manager=`` supplies the settings it holds instead of ``args``."""
        if self._given_manager is not None:
            self.settings = Settings.resolve(args, **{**self._overrides, **_settings_of(self._given_manager)})
            return self.settings
        self.settings = s = Settings.resolve(args, **self._overrides)
        self._manager = ManagerOptions(
            checkpoint_dir=s.checkpoint_dir,
            max_checkpoints=s.max_checkpoints,
            keep_best=s.keep_best,
            metric_for_best=s.metric_for_best,
            mode=s.mode,
            keep_top_k=s.keep_top_k,
            **self._manager_options,
        ).build()
        return self.settings

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._manager is None:  # added with trainer.add_callback() after the Trainer was built
            self._attach(args)
        self._refuse_foreign_files(args)
        self.manager.wait()  # a save left in flight by an earlier train() that raised
        _refuse_sharded(kwargs.get("model"))
        self._pending = False
        self._saved_step = None
        self._rng = None
        self._last_train_log = state.global_step
        self._preempted = False
        self._best_value: float | None = None
        self._preemption.start()
        self._data.drop_early_iterator(args, kwargs.get("train_dataloader"))
        if state.global_step > 0:
            self._resume(args, state, **kwargs)
        elif self.settings.should_save(args) and self.manager.checkpoints():
            warnings.warn(
                f"{self.manager.checkpoint_dir} already holds checkpoints of an earlier run (up to "
                f"{self.manager.latest().name}); this run's checkpoints are ranked among them by epoch and step. "
                "Pass resume_from_checkpoint=True to continue that run, or use a fresh output_dir",
                UserWarning,
                stacklevel=2,
            )

    def _resume(
        self,
        args: TrainingArguments,
        state: TrainerState,
        model: torch.nn.Module,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        train_dataloader: Any = None,
        **_: Any,
    ) -> None:
        info = self._checkpoint_of_step(state.global_step)
        if info is None:
            warnings.warn(
                f"the Trainer resumed at step {state.global_step}, but {self.manager.checkpoint_dir} holds no "
                "checkpoint of that step written by CheckpointCallback; the optimizer, scheduler and RNG states "
                "are whatever the Trainer restored itself",
                UserWarning,
                stacklevel=3,
            )
            return
        if self.settings is not None and self.settings.should_save(args):
            self._warn_if_before_latest(info)
        checkpoint = self.manager.read(info, items=("model", "optimizer", "scheduler", "rng", "extra"))
        self.manager.load_state_into(model, "model", checkpoint["model"], info)
        for name, target in (("optimizer", optimizer), ("scheduler", lr_scheduler)):
            if target is None:
                continue
            if checkpoint.get(name) is None:
                warnings.warn(
                    f"{info.path} holds no {name} state (save_only_model?); the {name} starts afresh",
                    UserWarning,
                    stacklevel=3,
                )
                continue
            self.manager.load_state_into(target, name, checkpoint[name], info)
        _replay_metric_scheduler(args, lr_scheduler, info)
        self._rng = checkpoint.get("rng")
        self._rng_mid_epoch = _resumes_mid_epoch(args, state, train_dataloader)
        self._saved_step = state.global_step
        self._data.resume(args, state, info, checkpoint.get("extra"), train_dataloader)

    def _warn_if_before_latest(self, resumed: CheckpointInfo) -> None:
        """Say what becomes of the later checkpoints when a run resumes from an earlier one."""
        later = self.manager.later_than(resumed)
        if not later:
            return
        self.manager.acknowledge_later_checkpoints()  # this message says it already, and accurately
        warnings.warn(
            f"resuming from {resumed.name}, but {self.manager.checkpoint_dir} also holds later checkpoints "
            f"({', '.join(info.name for info in later)}) of the training that went on from it. This run replaces each "
            "of them when it saves the same epoch and step; until then they count among the latest and the best "
            "(load_latest(), best(), retention), while resume_from_checkpoint=True finds this run's newest save "
            "through output_dir's checkpoint-<step>. To keep them, copy them elsewhere first",
            UserWarning,
            stacklevel=4,
        )

    def _checkpoint_of_step(self, step: int) -> CheckpointInfo | None:
        matches = [info for info in self.manager.checkpoints() if info.step == step]
        return matches[-1] if matches else None

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(args, state, **kwargs)
        if self._rng is not None and not self._rng_mid_epoch:
            restore_rng_state(self._rng)
            self._rng = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(args, state, **kwargs)
        self._data.started(args)
        if self._rng is not None and self._rng_mid_epoch:
            restore_rng_state(self._rng)
            self._rng = None

    # ------------------------------------------------------------------ saving

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        settings = self.settings or self._attach(args)
        self._data.correct_epoch(state)
        if self._preemption.requested(functools.partial(_any_rank, args=args)):
            self._stop_for_preemption(args, state, control, **kwargs)
            return control
        if self.auto is not None:  # every process measures; any process's "due" saves on all of them
            due = _any_rank(self.auto.due(self.manager, state.global_step), args=args)
        else:
            due = settings.save_due_at_step(state)
        return self._request(args, state, control, due, **kwargs)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        settings = self.settings or self._attach(args)
        self._data.epoch_ended(args)
        if self._preempted:  # stopping: no evaluation or save at the end of the cut-short epoch
            control.should_save = control.should_evaluate = False
            return control
        return self._request(args, state, control, settings.save_strategy == "epoch" and self.auto is None, **kwargs)

    def _stop_for_preemption(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Save this step's checkpoint now, wait until it is on disk, and end training."""
        self._preempted = True
        control.should_save = control.should_evaluate = False
        control.should_training_stop = True
        if self._saved_step != state.global_step:
            self._save(args, state, None, **kwargs)
        message = self._preemption.stop(self.manager, state.global_step, "train(resume_from_checkpoint=True)")
        if self.settings is not None and self.settings.should_save(args):
            warnings.warn(message, UserWarning, stacklevel=3)

    def _request(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, due: bool, **kwargs: Any
    ) -> TrainerControl:
        if self.auto is not None:
            control.should_save = False  # the TrainingArguments' schedule gives way to every="auto"
        if control.should_save or due:
            control.should_save = False
            if self.settings is None or self.settings.save_strategy != "best":  # "best" saves only in on_evaluate
                self._pending = self._pending or self._saved_step != state.global_step
        if self._pending:  # a save owed at the next hook must hold the loader's position of this step
            self._data.hold(args, kwargs.get("train_dataloader"))
        log_coming = control.should_log and state.global_step > self._last_train_log
        if self._pending and not control.should_evaluate and not log_coming:
            self._save(args, state, None, **kwargs)
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs and "learning_rate" in logs:
            self._last_train_log = state.global_step
        if self._pending and not control.should_evaluate:
            self._save(args, state, None, **kwargs)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        settings = self.settings or self._attach(args)
        self._check_metric(settings, metrics or {})
        if control.should_save:
            control.should_save = False
            if settings.save_strategy != "best" and self.auto is None:
                self._pending = self._pending or self._saved_step != state.global_step
        if settings.save_strategy == "best" and metrics and settings.metric_for_best in metrics:
            value = float(metrics[settings.metric_for_best])
            tracked_by_trainer = args.metric_for_best_model is not None and (
                eval_metric_name(args.metric_for_best_model) == settings.metric_for_best
            )
            if settings.is_new_best(value, state.best_metric if tracked_by_trainer else self._best_value):
                self._best_value = value
                self._pending = True
                if _value(args.save_strategy) == "best":
                    # The Trainer saves its own checkpoint after this hook when the metric beats
                    # state.best_metric. Record the new best here, as it would: then it sees no
                    # improvement and leaves the saving to the manager.
                    state.best_metric = value
                    state.best_global_step = state.global_step
        if self._pending:
            self._save(args, state, metrics, **kwargs)
        return control

    def _check_metric(self, settings: Settings, metrics: dict[str, Any]) -> None:
        """An evaluation must report the metric that ``keep_top_k`` or ``save_strategy="best"`` ranks by."""
        if not (settings.keep_top_k or settings.save_strategy == "best"):
            return
        check_metric_logged(
            settings.metric_for_best,
            metrics,
            ranked_by=", which " + ("keep_top_k" if settings.keep_top_k else "save_strategy='best'") + " ranks checkpoints by,",
            reported="evaluation",
            fix="return it from compute_metrics or pass one of these as metric_for_best (metric_for_best_model)",
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._preemption.end()
        self._data.started(args)
        if self.auto is not None and not self._preempted and self._saved_step != state.global_step:
            self._pending = True  # every="auto" leaves a checkpoint of the final state
        self._flush(args, state, **kwargs)
        if self._manager is not None:
            self._manager.close()  # the last save commits (or its error is raised) before the best is read
        if self.settings is not None and self.settings.load_best_at_end and not self._preempted:
            self._load_best(state, kwargs["model"])

    def _flush(self, args: TrainingArguments, state: TrainerState, **kwargs: Any) -> None:
        """Save a checkpoint still owed because the log or evaluation it waited for did not come."""
        if self._pending:
            self._save(args, state, None, **kwargs)

    def _save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        metrics: dict[str, Any] | None,
        model: torch.nn.Module,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        train_dataloader: Any = None,
        **_: Any,
    ) -> None:
        self._pending = False
        self._saved_step = state.global_step
        settings = self.settings or self._attach(args)
        loader_state = self._data.state_to_save(args, train_dataloader)
        if not settings.should_save(args):
            return
        output_dir = Path(args.output_dir)
        self.manager.save(
            model=model,
            optimizer=None if settings.save_only_model else optimizer,
            scheduler=None if settings.save_only_model else lr_scheduler,
            epoch=int(state.epoch or 0),
            step=state.global_step,
            metrics=metrics or {},
            config=run_config(args, model),
            files={TRAINER_STATE_FILE: trainer_state_json(args, state, metrics), **pretrained_files(model)},
            extra=None if loader_state is None else {data_state.DATA_STATE_KEY: loader_state},
            on_commit=lambda info: self._link_latest(output_dir, info),
        )

    def _link_latest(self, output_dir: Path, info: CheckpointInfo) -> None:
        """Point ``output_dir/checkpoint-<step>`` at the committed checkpoint ``info``.

        ``resume_from_checkpoint=True`` resumes from the link. Called once ``info`` has committed,
        on the manager's background thread for asynchronous saves (which commit one at a time).
        A checkpoint on an object store gets a resume marker instead of a link (see
        :func:`_mark_remote`).
        """
        if not isinstance(info.path, Path):
            _mark_remote(self.manager, output_dir, info)
            return
        if not info.path.is_dir():  # an earlier run's later checkpoints outrank it and retention took it
            return
        link = f"checkpoint-{info.step}"
        try:
            set_link(output_dir / link, info.path)
            for name, target in symlinks(output_dir).items():
                if name != link and LINK_PATTERN.fullmatch(name) and _same_dir(target.parent, self.manager.checkpoint_dir):
                    remove_link(output_dir / name)
        except StorageError as exc:
            if not self._warned_link:
                self._warned_link = True
                warnings.warn(
                    f"could not link {output_dir / link} to the newest checkpoint ({exc}); resume_from_checkpoint=True "
                    f"will not find it: pass the checkpoint's path instead ({info.path})",
                    UserWarning,
                    stacklevel=4,
                )

    def _load_best(self, state: TrainerState, model: torch.nn.Module) -> None:
        try:
            best = self.manager.best()
        except CheckpointNotFoundError as exc:
            warnings.warn(
                f"load_best_model_at_end: {exc}; the model keeps its final weights", UserWarning, stacklevel=3
            )
            return
        if best is None:
            return
        self.manager.load_state_into(model, "model", self.manager.read(best, items=("model",))["model"], best)
        state.best_model_checkpoint = str(best.path)


_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(CheckpointCallback.__init__).parameters.items()}
"""The callback's defaults: a manager option that differs from its default was given (see ``manager=``)."""


def _settings_of(manager: CheckpointManager) -> dict[str, Any]:
    """The :meth:`Settings.resolve` arguments a ready manager fixes: where and how it keeps checkpoints.

    The Trainer reports evaluation metrics as ``eval_<name>``, so the manager must rank by such a name."""
    metric = manager.metric_for_best
    if metric is not None and eval_metric_name(metric) != metric:
        raise ConfigurationError(
            f"the manager ranks checkpoints by metric_for_best={metric!r}, but the Trainer reports evaluation metrics "
            f"with an eval_ prefix; build it with metric_for_best={eval_metric_name(metric)!r}"
        )
    return {
        "checkpoint_dir": manager.checkpoint_dir,
        "max_checkpoints": manager.max_checkpoints,
        "keep_best": manager.keep_best,
        "metric_for_best": metric,
        "mode": manager.mode,
        "keep_top_k": manager.keep_top_k if manager.keep_top_k > 1 else None,
    }


def _refuse_sharded(model: Any) -> None:
    """Refuse a model sharded across ranks (accelerate FSDP): the Trainer resumes it from its own
    FSDP files, which the manager does not write, so its checkpoints could not be resumed."""
    from .tensors import sharded_across_ranks

    if model is not None and sharded_across_ranks(model):
        raise ConfigurationError(
            "ckpt_plugin.hf.CheckpointCallback does not support FSDP (the model's parameters are sharded "
            "across ranks): the Trainer reloads FSDP runs from its own files. Use the Trainer's checkpointing, "
            "or train with ckpt_plugin.lightning (ModelParallelStrategy) or CheckpointManager directly"
        )


def trainer_state_json(args: TrainingArguments, state: TrainerState, metrics: dict[str, Any] | None) -> bytes:
    """``trainer_state.json`` as the Trainer would write it at this save, without a best checkpoint path.

    The callback saves inside ``on_evaluate``, just before the Trainer records a new best metric, so
    that update is applied here by the Trainer's own rule.
    """
    data = dataclasses.asdict(state)
    data["best_model_checkpoint"] = None
    if metrics and args.metric_for_best_model is not None:
        value = metrics.get(eval_metric_name(args.metric_for_best_model))
        best = data["best_metric"]
        if best is None:
            best = -math.inf if args.greater_is_better else math.inf
        if value is not None and (value > best if args.greater_is_better else value < best):
            data["best_metric"] = value
            if _value(args.save_strategy) in ("steps", "epoch", "best"):
                data["best_global_step"] = state.global_step
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def run_config(args: TrainingArguments, model: torch.nn.Module) -> dict[str, Any]:
    """The JSON config of a checkpoint: the ``TrainingArguments`` and, when the model has one, its config."""
    config: dict[str, Any] = {"training_args": json.loads(args.to_json_string())}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_json_string"):
        config["model"] = json.loads(model_config.to_json_string(use_diff=False))
    return config


def pretrained_files(model: torch.nn.Module) -> dict[str, bytes]:
    """``config.json`` and ``generation_config.json`` exactly as ``model.save_pretrained`` writes them.

    With them (and the weights under the model's own names) a checkpoint directory loads with
    ``AutoModelForCausalLM.from_pretrained(path)``. ``save_pretrained`` first records the weights'
    dtype and the model's class in its config; that is done here on a copy, so the live config is
    left as it is. Models without a ``PretrainedConfig`` get neither file.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return {}
    config = copy.deepcopy(config)
    dtype = str(getattr(model, "dtype", torch.float32)).split(".")[1]
    setattr(config, "dtype" if hasattr(PretrainedConfig, "dtype") else "torch_dtype", dtype)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    files = {CONFIG_FILE: config.to_json_string(use_diff=True).encode("utf-8")}
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation_config is not None and callable(can_generate) and can_generate():
        try:
            text = generation_config.to_json_string(use_diff=True, keys_to_pop=["compile_config"])
        except TypeError:  # transformers releases before keys_to_pop
            text = generation_config.to_json_string(use_diff=True)
        files[GENERATION_CONFIG_FILE] = text.encode("utf-8")
    return files


def _replay_metric_scheduler(args: TrainingArguments, scheduler: Any, info: CheckpointInfo) -> None:
    """Redo the metric-driven scheduler step the Trainer took right after the checkpoint was saved."""
    if not isinstance(scheduler, METRIC_SCHEDULERS) or args.metric_for_best_model is None:
        return
    value = info.metrics.get(eval_metric_name(args.metric_for_best_model))
    if value is not None:
        scheduler.step(value)


def _resumes_mid_epoch(args: TrainingArguments, state: TrainerState, train_dataloader: Any) -> bool:
    """Whether the Trainer skips batches into the resumed epoch (and so restores RNG after them)."""
    if args.ignore_data_skip:
        return False
    try:
        batches = len(train_dataloader)
    except TypeError:
        return state.epoch is not None and state.epoch != int(state.epoch)
    accumulation = args.gradient_accumulation_steps
    updates_per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return state.global_step % updates_per_epoch != 0


class _DataResume:
    """The train data loader's position in the callback's checkpoints, and a resume that skips nothing.

    A save keeps the loader's state (see :mod:`ckpt_plugin._data_state`) as of the optimizer step
    it belongs to. On a resume inside an epoch that state goes back into the Trainer's loader, and
    ``args.ignore_data_skip`` is raised until the first step begins, so the Trainer does not replay
    the epoch's first batches through ``skip_first_batches`` (which would also rebuild the loader
    without its state). The Trainer then counts the resumed epoch's batches from 0, so the
    fractional ``state.epoch`` it sets after each step is moved on by the batches not replayed.
    A loader that is not stateful keeps the Trainer's skip, with one warning saying its cost.
    """

    def __init__(self) -> None:
        self.held: dict[str, Any] | None = None
        self.offset = 0
        self.steps_in_epoch = 0
        self.skip_setting: bool | None = None
        self.warned_replay = False

    def hold(self, args: TrainingArguments, loader: Any) -> None:
        """Keep the loader's position now, for a save that waits for the step's log or evaluation."""
        if self.held is None:
            self.held = data_state.capture(loader, world_size=args.world_size)

    def state_to_save(self, args: TrainingArguments, loader: Any) -> dict[str, Any] | None:
        """The loader state for the save being written: the one held for it, else the current one."""
        held, self.held = self.held, None
        return held if held is not None else data_state.capture(loader, world_size=args.world_size)

    def resume(self, args: TrainingArguments, state: TrainerState, info: CheckpointInfo, extra: Any, loader: Any) -> None:
        """Restore the loader's saved position and turn the Trainer's skip off for this epoch, or warn."""
        self.held = None
        batches, steps_in_epoch = _batches_trained_in_epoch(args, state, loader)
        if batches == 0:
            return
        saved = extra.get(data_state.DATA_STATE_KEY) if isinstance(extra, dict) else None
        accumulation = args.gradient_accumulation_steps
        if saved is None or not data_state.is_stateful(loader) or (accumulation > 1 and steps_in_epoch % accumulation):
            self._warn_replay(batches, saved is not None)
            return
        data_state.restore(loader, saved, world_size=args.world_size, path=info.path)
        self.skip_setting, args.ignore_data_skip = args.ignore_data_skip, True
        self.offset, self.steps_in_epoch = batches, steps_in_epoch

    @staticmethod
    def drop_early_iterator(args: TrainingArguments, loader: Any) -> None:
        """Make the first epoch draw its order from the sampler the loader holds when training begins.

        accelerate builds a stateful loader, asks it for its state, and only then installs its
        seedable sampler. Asking makes torchdata start the loader's workers, which begin prefetching
        from the Trainer's own ``RandomSampler`` (seeded from the global generator), and torchdata
        keeps that iterator for the first epoch. A resumed run never uses it, so without this the
        first epoch of a run with workers follows another order than its resume continues. An empty
        state (torchdata's public way to reset a loader) discards that iterator.
        """
        if args.dataloader_num_workers > 0 and data_state.is_stateful(loader):
            loader.load_state_dict({})

    def started(self, args: TrainingArguments) -> None:
        """Put ``ignore_data_skip`` back once the resumed epoch has begun without a skip."""
        if self.skip_setting is not None:
            args.ignore_data_skip, self.skip_setting = self.skip_setting, None

    def correct_epoch(self, state: TrainerState) -> None:
        """Count the batches trained before the resume in the resumed epoch's ``state.epoch``."""
        if self.offset and state.epoch is not None:
            state.epoch += self.offset / self.steps_in_epoch

    def epoch_ended(self, args: TrainingArguments) -> None:
        self.started(args)
        self.offset = 0

    def _warn_replay(self, batches: int, saved: bool) -> None:
        if self.warned_replay:
            return
        self.warned_replay = True
        why = (
            "the checkpoint holds the loader's position, but this run's loader cannot take it back"
            if saved
            else "the training data loader is not stateful, so the checkpoint holds no position in the epoch"
        )
        warnings.warn(
            f"resuming inside an epoch: {why}. The Trainer replays the epoch's first {batches} batches to skip them "
            "(an iterable dataset loads every sample of them again). To resume in constant time, use a stateful "
            "loader (torchdata): trainer.accelerator.dataloader_config.use_stateful_dataloader = True before "
            "trainer.train(), with a map-style dataset or an iterable one that has state_dict()/load_state_dict() "
            "(Hugging Face datasets' IterableDataset has), and gradient_accumulation_steps dividing an epoch's batches",
            UserWarning,
            stacklevel=4,
        )


def _batches_trained_in_epoch(args: TrainingArguments, state: TrainerState, loader: Any) -> tuple[int, int]:
    """The batches the Trainer skips into the resumed epoch, and the batches of an epoch, as it counts them."""
    accumulation = args.gradient_accumulation_steps
    try:
        steps_in_epoch = len(loader)
        updates_per_epoch = max(steps_in_epoch // accumulation + int(steps_in_epoch % accumulation > 0), 1)
    except TypeError:
        updates_per_epoch = max(state.max_steps, 1)
        steps_in_epoch = updates_per_epoch * accumulation
    if args.ignore_data_skip:
        return 0, steps_in_epoch
    return (state.global_step % updates_per_epoch) * accumulation, steps_in_epoch


REMOTE_MARKER_FILE = "ckpt_plugin_checkpoint.json"
EMPTY_SAFETENSORS = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"


def _location(place: str | os.PathLike[str]) -> Path | str:
    return Location(place).where


def _mark_remote(manager: CheckpointManager, output_dir: Path, info: CheckpointInfo) -> None:
    """Leave ``output_dir/checkpoint-<step>/`` for the Trainer to find when it resumes from a
    checkpoint on an object store: its ``trainer_state.json``, the URL of the checkpoint
    (``ckpt_plugin_checkpoint.json``) and an empty ``model.safetensors``, so that the Trainer
    accepts the directory (it logs that the model's keys are missing there); the callback then
    restores the model, optimizer, scheduler and RNG states from the object store, bitwise.
    Older markers are removed; the directory appears whole through one rename.
    """
    name = f"checkpoint-{info.step}"

    def fill(staging: Path) -> None:
        trainer_state = manager.read_file(info, TRAINER_STATE_FILE)
        (staging / TRAINER_STATE_FILE).write_bytes(trainer_state)
        (staging / REMOTE_MARKER_FILE).write_text(json.dumps({"checkpoint": info.location}))
        (staging / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)

    publish_dir(output_dir, name, fill)
    remove_dirs(output_dir, lambda entry, path: entry != name and bool(LINK_PATTERN.fullmatch(entry))
                and os.path.isfile(os.path.join(path, REMOTE_MARKER_FILE)))


MARKER_FILES = frozenset({TRAINER_STATE_FILE, REMOTE_MARKER_FILE, "model.safetensors"})
"""What a resume marker (:func:`_mark_remote`) holds."""


def _foreign_resume_files(output_dir: Path, manager: CheckpointManager) -> tuple[Path, list[str]] | None:
    """The checkpoint that ``resume_from_checkpoint=True`` would resume from in ``output_dir`` and the
    files in it that its format does not name; None when there is none or it is not one of ours."""
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is None:
        return None
    path = Path(last)
    if (path / REMOTE_MARKER_FILE).is_file() and not path.is_symlink():
        return path, sorted(set(os.listdir(path)) - MARKER_FILES)
    target = Path(os.path.realpath(path))
    checkpoint_dir = manager.checkpoint_dir
    if not (path.is_symlink() and isinstance(checkpoint_dir, Path) and _same_dir(target.parent, checkpoint_dir)):
        return None
    try:
        info = manager.checkpoint_at(target)
        if info is None:
            raise CheckpointNotFoundError(f"{target} holds no committed checkpoint")
        return path, manager.foreign_files(info)
    except CheckpointError as exc:  # nothing vouches for its files: the Trainer must not read them
        raise ForeignFileError(
            f"{path} links to {target}, which train(resume_from_checkpoint=True) would read, but it is not a readable "
            f"checkpoint ({exc}); remove the link or restore the checkpoint"
        ) from exc


def _any_rank(flag: bool, args: TrainingArguments) -> bool:
    """``flag`` of any rank, on every rank (one all-reduce under ``torch.distributed``), so all stop together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    vote = torch.tensor([int(flag)], device=args.device)
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX)
    return bool(vote.item())


def _same_dir(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _value(strategy: Any) -> str:
    return getattr(strategy, "value", strategy)


__all__ = [
    "CheckpointCallback",
    "FROM_ARGS",
    "Settings",
    "eval_metric_name",
    "pretrained_files",
    "run_config",
    "trainer_state_json",
]
