"""``CheckpointManager``: save, list, load and prune the checkpoints of one training run.

A facade: the options are validated into :class:`~ckpt_plugin._options.SaveSettings`; the commit
pipeline (backend, lock, listing cache, retention, save log, signing) is a
:class:`~ckpt_plugin._store.CheckpointStore`; a save takes one of the strategies of
:class:`~ckpt_plugin._saving.SaveStrategies` (plain, incremental, or collective across ranks); and
choosing, reading and restoring checkpoints is a :class:`~ckpt_plugin._loading.Loader`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _retention as retention
from ._loading import Loader, newest
from .auto_interval import AutoInterval, SaveCadence, learned_from_log
from ._options import DEFAULT_METRIC, BestMetricCheck, SaveSettings, check_top_k
from ._saving import SaveStrategies
from ._snapshot import SaveArguments, config_to_dict, normalize_metrics, whole_number
from ._store import CheckpointStore
from ._tiered.store import TieredLoader, TieredStore
from .errors import CheckpointError, CheckpointNotFoundError, ConfigurationError
from ._format import codec
from ._io.async_save import AsyncSaver
from ._io.files import read_bytes_file
from ._io.info import CheckpointInfo
from ._io.reader import Device, foreign_files
from ._storage import Backend, Location, trash

if TYPE_CHECKING:
    import torch


class CheckpointManager:
    """Owns the checkpoints of a run in ``checkpoint_dir``.

    Args:
        checkpoint_dir: the directory holding one sub-directory per checkpoint (created if missing),
            or a URL of an object store (``s3://bucket/run/checkpoints``, ``gs://``, ``az://``,
            ``memory://``, ``file://``: any fsspec URL), where checkpoints commit by manifest.
        max_checkpoints: keep this many most recent checkpoints (by epoch, then step); ``None`` keeps all.
        keep_best: also never delete the best checkpoint by ``metric_for_best``, even when it is old
            (opt-in: by default exactly the ``max_checkpoints`` most recent are kept); the same as
            ``keep_top_k=1``.
        metric_for_best: the metric that ranks checkpoints for ``keep_best``, ``keep_top_k`` and
            :meth:`load_best`, and that each checkpoint records. When left out it is ``"loss"`` with
            ``keep_best``; otherwise :meth:`best` ranks by the metric and mode the checkpoints
            themselves recorded. ``keep_top_k`` needs it given.
        mode: ``"min"`` if lower ``metric_for_best`` is better, ``"max"`` if higher is (default ``"min"``).
        save_rng: record the torch, CUDA, numpy and Python RNG states with every checkpoint so a
            resumed run continues bitwise identically.
        incremental: store the model as Hugging Face-style shards and hard-link the shards that did
            not change since the previous checkpoint instead of writing them again (frozen
            backbones, adapter fine-tuning). See :mod:`ckpt_plugin._io.incremental`.
        change_detection: how ``incremental`` finds unchanged tensors: ``"checksum"`` hashes every
            model tensor at each save; ``"version"`` trusts autograd version counters and hashes only
            tensors that were written to (writes through ``.data`` go unseen).
        async_save: return from :meth:`save` once the state is copied into a reused host staging
            buffer (about the size of the state), and write, commit and prune on a background
            thread. At most one save is in flight; a failed background save is raised again by the
            next :meth:`save`, :meth:`wait` or :meth:`close`. Loads wait for the save in flight.
        storage_options: options for the fsspec file system of a URL ``checkpoint_dir``
            (credentials, ``endpoint_url``, ``client_kwargs``...). Without them the store's standard
            environment applies (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
            ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for S3).
        signing_key: an elliptic-curve private key (PEM file) that signs every checkpoint before it
            commits (``model.sig`` in its directory, or inside its prefix on an object store, written
            before the manifest; see :mod:`ckpt_plugin.signing`). Loads check it when given
            ``verify_with=`` the public key. Needs the ``signing`` extra.
        keep_top_k: never delete the ``k`` best checkpoints by ``metric_for_best``, besides the
            ``max_checkpoints`` most recent (Lightning's ``save_top_k``). Given, it replaces
            ``keep_best``.
        require_metric: whether the first save must record ``metric_for_best`` (else it raises
            :class:`ConfigurationError` naming the metrics it recorded). Default: when
            ``keep_top_k`` is given. The framework callbacks, which may save before the first
            evaluation, turn it off and check the metric once an evaluation has run.
        collective_timeout: seconds a rank waits for the others in a collective (sharded) save or
            restore before it fails instead of hanging.
        local_dir: a fast local directory (an NVMe disk; ``/dev/shm/run`` for a RAM tier that
            survives the process) that makes ``checkpoint_dir`` the durable tier: :meth:`save`
            returns once the checkpoint is committed in ``local_dir``, and one background thread
            uploads it to ``checkpoint_dir``, in save order, with retries. A process killed meanwhile
            leaves its uploads pending, and the next manager with the same two tiers resumes them.
            Loads read the local copy when it verifies, else the durable one. Retention
            (``max_checkpoints``, ``keep_best``, ``keep_top_k``) governs the durable tier. One
            live manager per ``local_dir``: a second one raises :class:`ConfigurationError` until
            the first is closed (or its process has ended). In a collective (sharded) save every
            rank commits its own files to its own ``local_dir`` and uploads them itself; the
            coordinator commits the durable copy once all have (see the tiered guide).
        keep_local: with ``local_dir``, how many of the newest checkpoints stay in ``local_dir`` once
            durable (besides those whose upload is pending, which always stay).
        max_pending_uploads: with ``local_dir``, how many uploads may be pending; beyond it
            :meth:`save` waits for the oldest upload to finish. An upload that failed after its
            retries is raised (:class:`~ckpt_plugin.errors.UploadError`) by the next :meth:`save` or
            :meth:`wait`.

    When ``torch.distributed`` is initialized and the model holds DTensors (FSDP2 ``fully_shard``,
    tensor parallel), :meth:`save` and :meth:`restore` are collective: every rank calls them, each
    rank writes and reads only its own shards, and a checkpoint restores at any world size. See
    :mod:`ckpt_plugin._distributed.collective`.

    Saving a checkpoint for an epoch (and step) that already exists replaces it atomically:
    readers see the old checkpoint or the new one, never a mix.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] = "checkpoints",
        max_checkpoints: int | None = 5,
        keep_best: bool = False,
        metric_for_best: str | None = None,
        mode: str | None = None,
        *,
        save_rng: bool = True,
        incremental: bool = False,
        change_detection: str = "checksum",
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        signing_key: str | os.PathLike[str] | None = None,
        keep_top_k: int | None = None,
        require_metric: bool | None = None,
        collective_timeout: float = 600.0,
        local_dir: str | os.PathLike[str] | None = None,
        keep_local: int = 2,
        max_pending_uploads: int = 2,
    ) -> None:
        self._settings = settings = SaveSettings.validated(
            max_checkpoints=max_checkpoints, keep_best=keep_best, metric_for_best=metric_for_best, mode=mode,
            save_rng=save_rng, incremental=incremental, change_detection=change_detection, async_save=async_save,
            signing_key=signing_key, keep_top_k=keep_top_k, require_metric=require_metric,
            collective_timeout=collective_timeout,
        )
        location = Location.of(checkpoint_dir, storage_options)
        self.checkpoint_dir: Path | str = location.where
        self.remote = location.remote  # a public attribute since 0.2; nothing here branches on it
        self.storage_options = location.storage_options
        self.max_checkpoints = settings.max_checkpoints
        self.keep_top_k = settings.keep_top_k
        """How many of the best checkpoints retention keeps (0: none; 1: ``keep_best``)."""
        self.keep_best = settings.keep_best
        self.metric_for_best = settings.metric_for_best
        self.mode = settings.mode
        self.save_rng = settings.save_rng
        self.signing_key = settings.signing_key
        self.async_save = settings.async_save
        self.collective_timeout = settings.collective_timeout
        self._saver = AsyncSaver() if settings.async_save else None
        self._check_metric = BestMetricCheck(settings)
        self.local_dir = None if local_dir is None else Path(local_dir).expanduser()
        self._tiers: TieredStore | None = None
        if local_dir is None:
            self._store = CheckpointStore(location, policies=settings.retention_policies(), signing_key=signing_key)
            self._loader = Loader(self._store, settings)
        else:  # the tiered strategy: the same pipeline, committed in local_dir, then uploaded
            self._store = self._tiers = TieredStore(
                location, local_dir, policies=settings.retention_policies(), signing_key=signing_key,
                keep_local=keep_local, max_pending_uploads=max_pending_uploads,
                collective_timeout=settings.collective_timeout,
            )
            self._loader = TieredLoader(self._tiers, settings)
        self._saves = SaveStrategies(self._store, settings, self._saver)  # type: ignore[arg-type]
        self._cadence: SaveCadence | None = None
        self._saved_here = False

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.checkpoint_dir)!r}, max_checkpoints={self.max_checkpoints}, "
            f"keep_best={self.keep_best}, metric_for_best={self.metric_for_best!r}, mode={self.mode!r}"
            + (f", keep_top_k={self.keep_top_k}" if self.keep_top_k > 1 else "")
            + (", async_save=True)" if self.async_save else ")")
        )

    # ------------------------------------------------------------------ saving

    def save(
        self,
        model: torch.nn.Module | Mapping[str, Any],
        optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
        epoch: int = 0,
        metrics: Mapping[str, Any] | None = None,
        config: Any = None,
        *,
        step: int | None = None,
        scheduler: Any = None,
        extra: Any = None,
        files: Mapping[str, bytes] | None = None,
        on_commit: Callable[[CheckpointInfo], None] | None = None,
    ) -> CheckpointInfo:
        """Save one checkpoint and apply retention; return what was saved (path, epoch, step, metrics).

        ``model``, ``optimizer`` and ``scheduler`` may be live objects or their state dicts.
        ``config`` is any JSON-able tree (a dict, a dataclass, or an object with ``to_dict()``).
        ``extra`` is any tree of dicts, lists, tuples, scalars, strings and tensors.
        ``files`` maps plain file names to bytes written as they are into the checkpoint directory,
        committed and checksummed with it, for tools that expect a file by name (such as the
        ``trainer_state.json`` that Hugging Face ``Trainer.train`` reads when it resumes).

        With ``async_save`` this returns once the state is copied (the returned record has no
        ``files`` yet); the checkpoint is listed once it has committed, which :meth:`wait` ensures.

        ``on_commit`` is called with the committed checkpoint's record once it is committed and
        retention has run, before ``save`` returns or, with ``async_save``, on the background
        thread. It is not called for a save that failed; an exception it raises is raised like a
        failed save's, although the checkpoint stays committed. In a collective (sharded) save it
        runs on global rank 0 only, and an exception it raises is raised on every rank.
        """
        epoch = whole_number(epoch, "epoch")
        step = None if step is None else whole_number(step, "step")
        metrics = normalize_metrics(metrics)
        self._check_metric(metrics)
        arguments = SaveArguments(epoch, step, metrics, config, scheduler, extra, files)
        self._saved_here = True
        if self._cadence is None:
            return self._saves.save(model, optimizer, arguments, on_commit, collective=_collective(model))
        self._cadence.save_began()
        info = self._saves.save(model, optimizer, arguments, on_commit, collective=_collective(model))
        self._cadence.save_returned(in_background=self._saver is not None and self._saver.writing)
        return info

    def route_storage(self, wrap: Callable[[Backend], Backend]) -> Backend:
        """Move this manager's bytes through ``wrap(backend)`` from now on, commits included, and
        return that backend. The seam for wrapping storage, for example in a
        :class:`~ckpt_plugin._storage.faults.FaultyBackend` that injects failures in tests
        (:func:`ckpt_plugin._storage.faults.inject`), or in a wrapper that counts requests."""
        return self._store.route(wrap)

    @property
    def retention_policies(self) -> list[retention.RetentionPolicy]:
        """The retention policies this manager applies after each save (empty: keep everything)."""
        return list(self._store.policies)

    def apply_retention(self) -> None:
        """Delete now what the retention policies drop (each save does this once it has committed)."""
        self._store.retain()

    def retained(self, checkpoints: list[CheckpointInfo], protect: CheckpointInfo | None = None) -> list[CheckpointInfo]:
        """Which of ``checkpoints`` this manager's retention keeps, ``protect`` (a save just written)
        included: the prediction of what a save leaves, without deleting anything."""
        return self._store.retained(checkpoints, protect)

    def acknowledge_later_checkpoints(self) -> None:
        """Say that the caller has already told the user that ``checkpoint_dir`` holds checkpoints later
        than the saves to come (a run resumed from an earlier checkpoint, or a fresh run in a used
        directory): the manager's own warning about a save older than the latest is then not shown."""
        self._store.acknowledge_later_checkpoints()

    def check_config(self, config: Any) -> None:
        """Raise :class:`EncodingError` when :meth:`save` could not record ``config`` (it must become
        JSON: plain data, a dataclass, or an object with ``to_dict()``); check before training starts."""
        codec.to_json(config_to_dict(config), "config")

    def wait(self, *, uploads: bool = True) -> None:
        """Block until the asynchronous save in flight has committed, and raise its error if it failed.

        With ``local_dir``, also until every pending upload is durable, raising
        :class:`~ckpt_plugin.errors.UploadError` for one that failed after its retries; with
        ``uploads=False``, only until the save in flight is committed in ``local_dir``.

        Also waits until the checkpoints that retention or a re-save dropped are deleted from the
        disk (they leave every listing at once, and their files are removed in the background).
        """
        try:
            if self._saver is not None:
                self._saver.wait()
            if uploads and self._tiers is not None:
                self._tiers.wait()
        finally:
            trash.drain()

    def close(self) -> None:
        """Flush like :meth:`wait` and free the asynchronous staging buffer. With ``local_dir``, give it
        up: another manager may open it (this one takes it back on its next save). The manager
        stays usable."""
        try:
            if self._saver is not None:
                self._saver.close()
            if self._tiers is not None:
                self._tiers.wait()
        finally:
            if self._tiers is not None:
                self._tiers.close()
            trash.drain()

    def pending_uploads(self) -> list[CheckpointInfo]:
        """With ``local_dir``: the checkpoints committed there whose upload to the durable tier is
        still pending, oldest first (empty without ``local_dir``)."""
        return [] if self._tiers is None else self._tiers.pending_uploads()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as error:  # do not hide the exception already on its way out
            warnings.warn(f"a background save failed while another error was raised: {error}", UserWarning, stacklevel=2)

    def _note_resume(self) -> None:
        """A load before this process saved anything resumes the run: the next save's log entry
        says so, which is how ``every="auto"`` learns how often the run fails."""
        if not self._saved_here:
            self._store.mark_resumed()

    def due(
        self,
        step: int | None = None,
        *,
        mtbf: str | float | None = None,
        min_interval: str | float = 10.0,
        max_interval: str | float = "6h",
    ) -> bool:
        """Whether a checkpoint is due now: ``every="auto"`` for a plain training loop. Call it once
        per training step and save when it says so::

            for step, batch in enumerate(loader):
                train_step(batch)
                if manager.due(step):
                    manager.save(model, optimizer, epoch=epoch, step=step)

        The interval follows Young and Daly, ``T = sqrt(2 * C * MTBF)``: ``C`` is what recent saves
        cost this loop (the time :meth:`save` blocked it, plus how much the steps that overlapped a
        background write slowed down), and ``MTBF`` is ``mtbf`` (seconds, or ``"6h"``) or, when
        left out, learned from the restarts the run's save log records (one a day until the first).
        ``T`` is clamped to ``[min_interval, max_interval]``, re-evaluated after every save, and each
        change is logged once (logger ``ckpt_plugin``, level INFO). The options are read on the
        first call. See :mod:`ckpt_plugin.auto_interval`.
        """
        cadence = self._cadence
        if cadence is None:
            interval = AutoInterval(mtbf, min_interval=min_interval, max_interval=max_interval)
            if mtbf is None:
                interval.learn(*learned_from_log(self._store.save_log()))
            cadence = self._cadence = SaveCadence(interval)
        return cadence.due(writing=self._saver is not None and self._saver.writing)

    @property
    def auto_interval(self) -> AutoInterval | None:
        """The rule :meth:`due` follows (its cost, MTBF and interval), once :meth:`due` was called."""
        return None if self._cadence is None else self._cadence.interval

    def _settle(self) -> None:
        """Let the save in flight finish before reading, so a load sees this manager's own saves."""
        if self._saver is not None:
            self._saver.drain()

    # ------------------------------------------------------------------ listing

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint in the directory, oldest first (by epoch, then step)."""
        return self._store.checkpoints()

    def latest(self) -> CheckpointInfo | None:
        """The most recent checkpoint, or None when there is none."""
        return newest(self.checkpoints())

    def later_than(self, info: CheckpointInfo) -> list[CheckpointInfo]:
        """The checkpoints after ``info`` (by epoch, then step), oldest first: those that a run resumed
        from ``info`` replaces as it saves the same epochs and steps again."""
        return [entry for entry in self.checkpoints() if entry.sort_key > info.sort_key]

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        """The best checkpoint by ``metric`` in ``mode``.

        ``metric`` defaults to the manager's ``metric_for_best``; when the manager was built without
        one, to the ``metric_for_best`` the checkpoints recorded (the latest that recorded one), and
        ``mode`` then to the mode recorded with it; when none did, to ``"loss"``, ``"min"``.
        Checkpoints without the metric, or with NaN for it, never win. Returns None when the
        directory holds no checkpoint; raises :class:`CheckpointNotFoundError` when checkpoints
        exist but none recorded the metric.
        """
        return self._loader.best_of(self.checkpoints(), metric, mode)

    def ranking(self, found: list[CheckpointInfo] | None = None) -> tuple[str, str]:
        """The metric and mode that :meth:`best` ranks by without arguments, over ``found`` (by
        default the checkpoints listed now): the manager's ``metric_for_best``, else the one the
        checkpoints recorded, else ``"loss"``."""
        return self._loader.ranking(self.checkpoints() if found is None else found, None, None)

    def find(self, epoch: int, step: int | None = None) -> CheckpointInfo:
        """The checkpoint of ``epoch`` (the last step of it, unless ``step`` is given)."""
        return self._loader.find_in(self.checkpoints(), epoch, step)

    # ------------------------------------------------------------------ loading

    def read(
        self,
        info: CheckpointInfo,
        *,
        map_location: Device = None,
        verify: bool = True,
        items: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Load the checkpoint ``info`` (from :meth:`checkpoints`, :meth:`latest`, :meth:`best` or
        :meth:`checkpoint_at`) as a checkpoint dict; ``items`` restricts which state trees are read
        (``("model",)`` for inference)."""
        self._settle()
        if items is None or "optimizer" in items:  # training state: a resume, not an inference load
            self._note_resume()
        return self._loader.read(info, map_location=map_location, verify=verify, items=items)

    def read_file(self, info: CheckpointInfo, name: str) -> bytes:
        """The bytes of the file ``name`` that ``save(files=...)`` stored in checkpoint ``info``,
        checked against the size and checksum the checkpoint records for it.

        Raises :class:`CheckpointNotFoundError` when the checkpoint records no such file and
        :class:`CorruptCheckpointError` when the file does not match its record."""
        record = info.files.get(name)
        if record is None:
            raise CheckpointNotFoundError(f"{info.path} records no file {name!r}; it was not saved with files={{{name!r}: ...}}")
        return read_bytes_file(info.file(name), record, backend=info.backend)

    def foreign_files(self, info: CheckpointInfo) -> list[str]:
        """The names in checkpoint ``info`` that its format does not name, sorted: files ckpt_plugin
        never wrote and never reads, which a tool that reads whatever the directory holds (the HF
        Trainer's resume unpickles ``rng_state.pth``) must not be handed."""
        return foreign_files(info)

    @staticmethod
    def load_state_into(target: Any, item: str, state: Any, info: CheckpointInfo) -> None:
        """Load ``state``, the ``item`` state (``"model"``, ``"optimizer"``, ...) that :meth:`read` gave
        for checkpoint ``info``, into ``target`` with its ``load_state_dict``. Whatever ``target``
        raises on that content becomes :class:`IncompatibleCheckpointError` naming the checkpoint."""
        from ._io.restore import apply_state  # the tensor machinery loads on first use

        apply_state(item, info.path, target.load_state_dict, state)

    def checkpoint_at(self, location: str | os.PathLike[str]) -> CheckpointInfo | None:
        """The checkpoint at ``location`` (a path or URL inside ``checkpoint_dir``, as
        :attr:`CheckpointInfo.path` gives it), or None when nothing committed is there."""
        self._settle()
        return self._store.at(location)

    def load(
        self, epoch: int, step: int | None = None, *, map_location: Device = None, verify: bool = True, verify_with: Any = None
    ) -> dict[str, Any]:
        """Load the checkpoint of ``epoch`` (and ``step``), or raise :class:`CheckpointNotFoundError`
        naming the epochs that exist. With ``verify_with`` (a public key's PEM file) the checkpoint's
        signature must verify first (:class:`SignatureError` otherwise), and every value returned
        comes from the bytes it covers."""
        self._settle()
        self._note_resume()
        if verify_with is not None:
            loaded = self._loader.load_signed(lambda found: self._loader.find_in(found, epoch, step), verify_with, map_location=map_location)
            assert loaded is not None
            return loaded
        return self._loader.read(self.find(epoch, step), map_location=map_location, verify=verify)

    def load_latest(self, *, map_location: Device = None, verify: bool = True, verify_with: Any = None) -> dict[str, Any] | None:
        """Load the most recent checkpoint, or return None when the directory holds none. When another
        writer's retention deletes it while it is being read, the next most recent is loaded. With
        ``verify_with`` see :meth:`load`: the most recent checkpoint by the signed names and metadata."""
        self._settle()
        self._note_resume()
        if verify_with is not None:
            return self._loader.load_signed(newest, verify_with, map_location=map_location)
        return self._loader.read_chosen(self.latest, map_location=map_location, verify=verify)

    def load_best(
        self,
        metric: str | None = None,
        mode: str | None = None,
        *,
        map_location: Device = None,
        verify: bool = True,
        verify_with: Any = None,
    ) -> dict[str, Any] | None:
        """Load the best checkpoint by any recorded ``metric``; see :meth:`best`. When another writer's
        retention deletes it while it is being read, the next best is loaded. With ``verify_with``
        see :meth:`load`: the ranking is by metadata read from the directory, never by the listing
        cache, and the chosen checkpoint's signed metrics must be the ones it was ranked by."""
        self._settle()
        self._note_resume()
        if verify_with is not None:
            return self._loader.load_signed(lambda found: self._loader.best_of(found, metric, mode), verify_with, map_location=map_location)
        return self._loader.read_chosen(lambda: self.best(metric, mode), map_location=map_location, verify=verify)

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        which: str | int | CheckpointInfo = "latest",
        *,
        strict: bool = True,
        restore_rng: bool = True,
        atomic: bool = False,
    ) -> CheckpointInfo | None:
        """Load a checkpoint straight into live objects and return which one it was.

        ``which`` is ``"latest"``, ``"best"`` or an epoch. Returns None (and changes nothing) when
        ``"latest"`` is asked of an empty directory. RNG states are restored too unless
        ``restore_rng`` is False. Tensors are read once, straight into the model's parameters and
        the optimizer's state, with checksums verified in the same pass. If a file turns out to be
        damaged, :class:`CorruptCheckpointError` names it and says which live objects were already
        overwritten; ``atomic=True`` checks every file first so that nothing changes on damage.

        For a model holding DTensors in a distributed job, the restore is collective (every rank
        calls it) and reshards the checkpoint to this world size; ``atomic`` does not apply there.
        A sharded checkpoint restores into plain objects in one process too.
        """
        self._settle()
        self._note_resume()
        collective = _collective(model)
        if collective and self._tiers is not None:  # every rank chooses among the same checkpoints
            self._tiers.settle_sharded()
        info = self.resolve(which)
        if info is None:
            return None
        self._loader.restore(
            info, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng, atomic=atomic, collective=collective
        )
        return info

    def resolve(self, which: str | int | CheckpointInfo) -> CheckpointInfo | None:
        """The checkpoint ``"latest"``, ``"best"`` or an epoch number refers to (a
        :class:`CheckpointInfo` stands for itself)."""
        if isinstance(which, CheckpointInfo):
            return which
        if which == "latest":
            return self.latest()
        if which == "best":
            return self.best()
        if isinstance(which, int) and not isinstance(which, bool):
            return self.find(which)
        raise ConfigurationError(f"which must be 'latest', 'best' or an epoch number, not {which!r}")

    def model_tensors(self, which: str | int | CheckpointInfo = "latest", *, map_location: Device = None,
                      verify: bool = True) -> dict[str, Any]:
        """The full model tensors of the checkpoint ``which`` names (see :meth:`resolve`), a per-rank
        sharded one consolidated: :func:`ckpt_plugin.tensors.model_tensors`."""
        from .tensors import model_tensors_of

        return model_tensors_of(self, which, map_location=map_location, verify=verify)


def _collective(model: Any) -> bool:
    """Whether a save or restore of these objects is collective: a distributed job with DTensors."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    from ._distributed.collective import holds_dtensors

    return holds_dtensors(model)


__all__ = ["DEFAULT_METRIC", "CheckpointManager", "check_top_k", "config_to_dict", "normalize_metrics"]
