"""``CheckpointManager``: save, list, load and prune the checkpoints of one training run."""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import listing, retention, savelog, signing
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    EncodingError,
    ForeignFileError,
    SignatureError,
    StorageError,
)
from .format import codec
from .format.layout import looks_like_checkpoint
from .format.names import checkpoint_name, parse_checkpoint_name
from .format.records import METADATA_FILE
from .io import incremental as incremental_saves
from .io.async_save import AsyncSaver, pending_info
from .io.files import read_bytes_file
from .io.info import CheckpointInfo
from .io.reader import Device, foreign_files, read_info
from .io.rng import capture_rng_state, restore_rng_state
from .io.writer import Snapshot, take_snapshot, write_snapshot
from .metadata import git_provenance, git_provenance_in_background, provenance
from .reading import read_checkpoint, read_sharded_items
from .storage import Backend, LocalStore, directory_identity, is_url, open_store, trash, with_backend

if TYPE_CHECKING:
    import torch

DEFAULT_METRIC = "loss"
"""What ``keep_best`` and :meth:`CheckpointManager.best` rank by when nothing else says."""
_CHOOSE_ATTEMPTS = 20
"""How many checkpoints :meth:`CheckpointManager.load_latest` and ``load_best`` try when each is
deleted while it is being read."""


class _DeletedWhileReading(CheckpointNotFoundError):
    """The checkpoint being read was deleted meanwhile (by retention, say)."""


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
            backbones, adapter fine-tuning). See :mod:`ckpt_plugin.io.incremental`.
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

    When ``torch.distributed`` is initialized and the model holds DTensors (FSDP2 ``fully_shard``,
    tensor parallel), :meth:`save` and :meth:`restore` are collective: every rank calls them, each
    rank writes and reads only its own shards, and a checkpoint restores at any world size. See
    :mod:`ckpt_plugin.distributed.collective`.

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
    ) -> None:
        if mode is not None and mode not in retention.MODES:
            raise ConfigurationError(f"mode must be 'min' or 'max', not {mode!r}")
        if keep_best and metric_for_best is None:
            metric_for_best = DEFAULT_METRIC
        if max_checkpoints is not None and (
            isinstance(max_checkpoints, bool) or not isinstance(max_checkpoints, int) or max_checkpoints < 1
        ):
            raise ConfigurationError(
                f"max_checkpoints must be a whole number of at least 1, or None to keep every checkpoint; got {max_checkpoints!r}"
            )
        if change_detection not in incremental_saves.DETECTION_MODES:
            raise ConfigurationError(f"change_detection must be 'checksum' or 'version', not {change_detection!r}")
        if keep_best and metric_for_best is not None and not isinstance(metric_for_best, str):
            raise ConfigurationError(f"metric_for_best must be a metric name, not {metric_for_best!r}")
        check_top_k(keep_top_k, metric_for_best)
        self.remote = is_url(checkpoint_dir)
        self.checkpoint_dir: Path | str = (
            str(checkpoint_dir).rstrip("/") if self.remote else Path(checkpoint_dir).expanduser()
        )
        self.storage_options = dict(storage_options or {})
        self.max_checkpoints = max_checkpoints
        self.keep_top_k = keep_top_k if keep_top_k is not None else int(bool(keep_best))
        """How many of the best checkpoints retention keeps (0: none; 1: ``keep_best``)."""
        self.keep_best = self.keep_top_k > 0
        self._strict_metric = keep_top_k is not None if require_metric is None else bool(require_metric)
        self._first_save_checked = False
        self.metric_for_best = metric_for_best
        self.mode = mode if mode is not None else "min"
        self._mode_given = mode is not None
        self.save_rng = save_rng
        self.signing_key = signing_key
        self.async_save = bool(async_save)
        if isinstance(collective_timeout, bool) or not isinstance(collective_timeout, (int, float)) or not collective_timeout > 0:
            raise ConfigurationError(f"collective_timeout must be a number of seconds above 0, not {collective_timeout!r}")
        self.collective_timeout = float(collective_timeout)
        self._saver = AsyncSaver() if async_save else None
        self._store = open_store(self.checkpoint_dir, storage_options)
        self._incremental = incremental_saves.IncrementalWriter(change_detection) if incremental else None
        self._policies = retention.policies_for(max_checkpoints, self.keep_best, metric_for_best, self.mode, self.keep_top_k)
        self._lock = threading.RLock()
        self._listing: dict[str, tuple[str, CheckpointInfo]] = {}
        self._summaries: dict[str, tuple[listing.Identity, dict[str, Any]]] | None = None
        self._metadata_reads = 0
        self._warned_missing_metric = False
        self._warned_older_epoch = False
        self._warned_log = False
        self._warned_foreign: set[str] = set()
        self._from_cache: set[str] = set()
        """Checkpoints listed from the summary cache alone: advisory until their metadata.json is read here."""
        self._warned_cache = False
        if not self.remote:
            assert isinstance(self.checkpoint_dir, Path)
            if self.checkpoint_dir.exists() and not self.checkpoint_dir.is_dir():
                raise ConfigurationError(f"checkpoint_dir {self.checkpoint_dir} is a file, not a directory; choose another path")
        if self.remote or self.checkpoint_dir.is_dir():  # type: ignore[union-attr]
            self._recover()

    def _recover(self) -> None:
        """Clean up what dead writers left. Leftovers are invisible, so a reader that may not delete
        (read-only credentials, a read-only mount) is warned and goes on; a save would fail later."""
        try:
            self._store.recover()
        except (StorageError, PermissionError) as exc:
            warnings.warn(
                f"could not clean up leftovers of interrupted saves in {self.checkpoint_dir} ({exc}); they stay "
                "invisible, and the next manager with write access removes them",
                UserWarning,
                stacklevel=3,
            )

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
        epoch = _whole_number(epoch, "epoch")
        step = None if step is None else _whole_number(step, "step")
        metrics = normalize_metrics(metrics)
        self._check_best_metric(metrics)
        if _collective(model):
            from .distributed.collective import save_sharded

            self.wait()
            return save_sharded(
                self, model=model, optimizer=optimizer, epoch=epoch, step=step, metrics=metrics, config=config,
                scheduler=scheduler, extra=extra, files=files, on_commit=on_commit,
            )
        seen: list[incremental_saves.Observation | None] = [None]

        def take() -> Snapshot:
            snapshot, seen[0] = self._take_snapshot(
                model, optimizer, epoch, metrics, config, step, scheduler, extra, files
            )
            return snapshot

        cwd = _current_dir()
        if self._saver is None:
            snapshot = take()
            snapshot.pending_provenance = git_provenance_in_background(cwd)
            return _notify(self._write(snapshot, seen[0]), on_commit)

        def write(snapshot: Snapshot) -> CheckpointInfo:
            snapshot.provenance.update(git_provenance(cwd))
            return _notify(self._write(snapshot, seen[0]), on_commit)

        return pending_info(self._store, self._saver.save(take, write))

    def _take_snapshot(
        self,
        model: Any,
        optimizer: Any,
        epoch: int,
        metrics: dict[str, Any],
        config: Any,
        step: int | None,
        scheduler: Any,
        extra: Any,
        files: Mapping[str, bytes] | None,
    ) -> tuple[Snapshot, incremental_saves.Observation | None]:
        states = {
            "model": _state_of(model, "model"),
            "optimizer": _state_of(optimizer, "optimizer"),
            "scheduler": _state_of(scheduler, "scheduler"),
            "extra": extra,
            "rng": capture_rng_state() if self.save_rng else None,
        }
        seen = incremental_saves.observe(model, states["model"], states["optimizer"]) if self._incremental is not None else None
        snapshot = take_snapshot(
            states,
            epoch=epoch,
            step=step,
            metrics=metrics,
            config=config_to_dict(config),
            metric_for_best=self.metric_for_best,
            mode=self.mode,
            provenance=provenance(git=False),  # asked of git while the files are written
            files=files,
        )
        return snapshot, seen

    def _signing(self) -> dict[str, Any]:
        """The ``write_snapshot`` options that sign a checkpoint before it commits, when a key is set."""
        if self.signing_key is None:
            return {}
        return {"before_commit": signing.signer(self.signing_key)}

    def _write(self, snapshot: Snapshot, seen: incremental_saves.Observation | None) -> CheckpointInfo:
        """Write, commit and prune: the part of a save that an asynchronous save runs in the background."""
        with self._lock:
            self._store.ensure_writable()
            self._refuse_foreign(snapshot.name)
            signed = self._signing()
            if self._incremental is None:
                info = write_snapshot(self._store, snapshot, **signed)
            else:
                if not self._incremental.has_base:
                    self._incremental.adopt(self.latest())
                assert seen is not None
                info = self._incremental.write(self._store, snapshot, seen, **signed)
            self._remember(info)
            self._apply_retention(protect=info)
            self._log_save(info)
        return info

    def route_storage(self, wrap: Callable[[Backend], Backend]) -> Backend:
        """Move this manager's bytes through ``wrap(backend)`` from now on, commits included, and
        return that backend. The seam for wrapping storage, for example in a
        :class:`~ckpt_plugin.storage.faults.FaultyBackend` that injects failures in tests
        (:func:`ckpt_plugin.storage.faults.inject`), or in a wrapper that counts requests."""
        with self._lock:
            backend = wrap(self._store.backend)
            self._store = with_backend(self._store, backend)
        return backend

    @property
    def retention_policies(self) -> list[retention.RetentionPolicy]:
        """The retention policies this manager applies after each save (empty: keep everything)."""
        return list(self._policies)

    def _log_save(self, info: CheckpointInfo) -> None:
        """Record the committed checkpoint in the save log; a failure there never fails the save."""
        try:
            savelog.append(self.checkpoint_dir, info, backend=self._store.backend)
        except CheckpointError as exc:
            if not self._warned_log:
                self._warned_log = True
                warnings.warn(f"could not append to the save log ({exc}); the checkpoint is saved", UserWarning, stacklevel=4)

    def _check_best_metric(self, metrics: Mapping[str, Any]) -> None:
        if not self.keep_best or self.metric_for_best is None:
            return
        if self._strict_metric and not self._first_save_checked:
            if self.metric_for_best not in metrics:
                recorded = ", ".join(sorted(metrics)) or "none"
                raise ConfigurationError(
                    f"keep_top_k={self.keep_top_k} ranks checkpoints by metric_for_best={self.metric_for_best!r}, "
                    f"but the first save records no such metric (recorded: {recorded}); pass it in metrics= "
                    "or choose one of these as metric_for_best"
                )
            self._first_save_checked = True
        if self._warned_missing_metric:
            return
        if retention.as_float(metrics.get(self.metric_for_best)) is not None:
            return
        self._warned_missing_metric = True
        recorded = ", ".join(sorted(metrics)) or "none"
        warnings.warn(
            f"keep_best ranks checkpoints by {self.metric_for_best!r}, but this save's metrics do not "
            f"hold a number for it (recorded: {recorded}); such checkpoints are never the best. "
            "Log the metric or pass another metric_for_best. (This warning is shown once.)",
            UserWarning,
            stacklevel=3,
        )

    def _refuse_foreign(self, name: str) -> None:
        """Refuse to replace anything at ``name`` but a checkpoint this release can read (on an object
        store a save never replaces anything in place: it writes a new prefix)."""
        if not isinstance(self._store, LocalStore):
            return
        target = self._store.root / name
        if not os.path.lexists(target):
            return
        try:
            if not (target / METADATA_FILE).is_file():
                raise ForeignFileError("it is not a ckpt_plugin checkpoint")
            read_info(target)
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
            raise ForeignFileError(
                f"{target} exists but is not a checkpoint this release can read ({exc}); it will not be "
                "overwritten. Move it away or choose another checkpoint_dir"
            ) from None

    def _apply_retention(self, protect: CheckpointInfo | None = None) -> None:
        found = self._checkpoints_read_here() if self._policies else self.checkpoints()
        if protect is not None and found and found[-1].sort_key > protect.sort_key and not self._warned_older_epoch:
            self._warned_older_epoch = True
            warnings.warn(
                f"saved {protect.name}, but {self.checkpoint_dir} already holds later checkpoints (up to "
                f"{found[-1].name}), which load_latest() and resuming will prefer and which retention keeps "
                "as the most recent. Start a new run in a new checkpoint_dir. (This warning is shown once.)",
                UserWarning,
                stacklevel=4,
            )
        for entry in retention.to_delete(found, self._policies, protect.sort_key if protect is not None else None):
            self._store.remove(entry.name)  # type: ignore[attr-defined]
            self._listing.pop(entry.name, None)  # type: ignore[attr-defined]

    def retained(self, checkpoints: list[CheckpointInfo], protect: CheckpointInfo | None = None) -> list[CheckpointInfo]:
        """Which of ``checkpoints`` this manager's retention keeps, ``protect`` (a save just written)
        included: the prediction of what a save leaves, without deleting anything."""
        doomed = {info.name for info in retention.to_delete(checkpoints, self._policies, protect.sort_key if protect else None)}
        return [info for info in checkpoints if info.name not in doomed]

    def acknowledge_later_checkpoints(self) -> None:
        """Say that the caller has already told the user that ``checkpoint_dir`` holds checkpoints later
        than the saves to come (a run resumed from an earlier checkpoint, or a fresh run in a used
        directory): the manager's own warning about a save older than the latest is then not shown."""
        self._warned_older_epoch = True

    def check_config(self, config: Any) -> None:
        """Raise :class:`EncodingError` when :meth:`save` could not record ``config`` (it must become
        JSON: plain data, a dataclass, or an object with ``to_dict()``); check before training starts."""
        codec.to_json(config_to_dict(config), "config")

    def wait(self) -> None:
        """Block until the asynchronous save in flight has committed, and raise its error if it failed.

        Also waits until the checkpoints that retention or a re-save dropped are deleted from the
        disk (they leave every listing at once, and their files are removed in the background).
        """
        try:
            if self._saver is not None:
                self._saver.wait()
        finally:
            trash.drain()

    def close(self) -> None:
        """Flush like :meth:`wait` and free the asynchronous staging buffer. The manager stays usable."""
        try:
            if self._saver is not None:
                self._saver.close()
        finally:
            trash.drain()

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

    def _settle(self) -> None:
        """Let the save in flight finish before reading, so a load sees this manager's own saves."""
        if self._saver is not None:
            self._saver.drain()

    # ------------------------------------------------------------------ listing

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint in the directory, oldest first (by epoch, then step)."""
        found: dict[str, tuple[str, CheckpointInfo]] = {}
        read_before = self._metadata_reads
        with listing.gc_paused():
            for entry in self._store.visible():
                if not looks_like_checkpoint(entry.name):
                    continue
                cached = self._listing.get(entry.name)
                if entry.fingerprint and cached is not None and cached[0] == entry.fingerprint:
                    found[entry.name] = cached
                    continue
                info = self._read_info(entry.name, entry.location)
                if info is not None:
                    found[entry.name] = (entry.fingerprint, info)
        self._listing = found
        if self._metadata_reads - read_before > listing.REWRITE_AFTER_READS and self._summaries is not None:
            listing.save(self._store.root, {name: self._summaries[name] for name in found if name in self._summaries})
        return sorted((info for _, info in found.values()), key=lambda info: info.sort_key)

    def _read_info(self, name: str, location: str, *, use_cache: bool = True) -> CheckpointInfo | None:
        backend = self._store.backend
        key = None
        if isinstance(self._store, LocalStore):  # the summary cache file is kept on local disks only
            key = listing.identity(os.path.join(location, METADATA_FILE))
            if self._summaries is None:
                self._summaries = listing.load(self._store.root)
            known = self._summaries.get(name)
            if use_cache and key is not None and known is not None and known[0] == key:
                try:
                    cached = listing.info_from_summary(Path(location), known[1], backend)
                    self._from_cache.add(name)
                    return cached
                except (CheckpointError, KeyError, TypeError, ValueError):
                    pass
        try:
            info = read_info(location, backend)
            self._metadata_reads += 1
            self._from_cache.discard(name)
            if key is not None and self._summaries is not None:
                self._summaries[name] = (key, listing.summary(info))
            return info
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
            if backend.fingerprint(location) is None:
                return None  # deleted or replaced by another manager while being listed
            if name not in self._warned_foreign:
                self._warned_foreign.add(name)
                warnings.warn(
                    f"ignoring {location}: it is named like a checkpoint but is not a readable ckpt_plugin "
                    f"checkpoint ({exc}). It is never deleted; move it away to silence this warning.",
                    UserWarning,
                    stacklevel=3,
                )
            return None

    def _remember(self, info: CheckpointInfo) -> None:
        if isinstance(self._store, LocalStore):
            fingerprint = directory_identity(info.location)
        else:
            fingerprint = self._store.backend.fingerprint(info.file(METADATA_FILE)) or ""
        if fingerprint:
            self._listing[info.name] = (fingerprint, info)
            self._from_cache.discard(info.name)
        else:  # pragma: no cover - removed by another process
            self._listing.pop(info.name, None)

    def _checkpoints_read_here(self) -> list[CheckpointInfo]:
        """Every committed checkpoint as its own ``metadata.json`` says, oldest first.

        The summary cache (``.listing.json``) is unkeyed: anyone who can write the directory can
        write it. It speeds up :meth:`checkpoints`, but it never decides what retention deletes nor
        what a signed load chooses: those decide by this listing, in which every entry that came
        from the cache is read again from its ``metadata.json`` (once per process). An entry the
        cache got wrong is corrected in the cache too, with a warning (shown once).
        """
        found = []
        for info in self.checkpoints():
            if info.name in self._from_cache:
                info = self._read_here(info)
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda info: info.sort_key)

    def _read_here(self, cached: CheckpointInfo) -> CheckpointInfo | None:
        """``cached`` (an entry of the summary cache) read again from its ``metadata.json``."""
        fingerprint = self._listing.get(cached.name, ("", cached))[0]
        info = self._read_info(cached.name, cached.location, use_cache=False)
        if info is None:
            self._listing.pop(cached.name, None)
            return None
        self._listing[cached.name] = (fingerprint, info)
        if listing.summary(info) == listing.summary(cached):
            return info
        if self._summaries is not None:
            listing.save(self._store.root, {name: self._summaries[name] for name in self._listing if name in self._summaries})
        if not self._warned_cache:
            self._warned_cache = True
            warnings.warn(
                f"the listing cache {listing.CACHE_FILE} in {self.checkpoint_dir} disagrees with {cached.location}/"
                f"{METADATA_FILE}; it is ignored for that checkpoint and rewritten. Something other than "
                "ckpt_plugin edits that directory. (This warning is shown once.)",
                UserWarning,
                stacklevel=4,
            )
        return info

    def latest(self) -> CheckpointInfo | None:
        """The most recent checkpoint, or None when there is none."""
        return _newest(self.checkpoints())

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
        return self._best_of(self.checkpoints(), metric, mode)

    def _best_of(self, found: list[CheckpointInfo], metric: str | None, mode: str | None) -> CheckpointInfo | None:
        metric, mode = self._ranking(found, metric, mode)
        if mode not in retention.MODES:
            raise ConfigurationError(f"mode must be 'min' or 'max', not {mode!r}")
        if not found:
            return None
        index = retention.best_index(found, metric, mode)
        if index is None:
            recorded = sorted({name for info in found for name in info.metrics})
            raise CheckpointNotFoundError(
                f"no checkpoint in {self.checkpoint_dir} records a number for metric {metric!r}; "
                f"recorded metrics: {', '.join(recorded) or 'none'}"
            )
        return found[index]

    def ranking(self, found: list[CheckpointInfo] | None = None) -> tuple[str, str]:
        """The metric and mode that :meth:`best` ranks by without arguments, over ``found`` (by
        default the checkpoints listed now): the manager's ``metric_for_best``, else the one the
        checkpoints recorded, else ``"loss"``."""
        return self._ranking(self.checkpoints() if found is None else found, None, None)

    def _ranking(self, found: list[CheckpointInfo], metric: str | None, mode: str | None) -> tuple[str, str]:
        """The metric and mode that :meth:`best` ranks by (see there)."""
        if metric is None and self.metric_for_best is not None:
            metric = self.metric_for_best
        if metric is None:
            recorded = next((info for info in reversed(found) if info.metric_for_best is not None), None)
            if recorded is not None:
                metric = recorded.metric_for_best
                if mode is None and not self._mode_given:
                    mode = recorded.mode
        return (metric if metric is not None else DEFAULT_METRIC), (mode if mode is not None else self.mode)

    def find(self, epoch: int, step: int | None = None) -> CheckpointInfo:
        """The checkpoint of ``epoch`` (the last step of it, unless ``step`` is given)."""
        return self._find_in(self.checkpoints(), epoch, step)

    def _find_in(self, found: list[CheckpointInfo], epoch: int, step: int | None) -> CheckpointInfo:
        matches = [info for info in found if info.epoch == epoch and (step is None or info.step == step)]
        if not matches:
            wanted = f"epoch {epoch}" + ("" if step is None else f" step {step}")
            self._raise_if_unreadable(epoch, step, wanted)
            steps = sorted({info.step for info in found if info.epoch == epoch and info.step is not None})
            existing = (
                f"epoch {epoch} has step{'s' if len(steps) > 1 else ''} {_ranges(steps)}" if steps
                else f"existing epochs: {_ranges(sorted({info.epoch for info in found})) or 'none'}"
            )
            raise CheckpointNotFoundError(f"no checkpoint for {wanted} in {self.checkpoint_dir}; {existing}")
        return matches[-1]

    def _raise_if_unreadable(self, epoch: int, step: int | None, wanted: str) -> None:
        """Say why a directory on disk for ``epoch`` (and ``step``) is not listed as a checkpoint."""
        for entry in self._store.visible():
            parsed = parse_checkpoint_name(entry.name)
            if parsed is None or parsed[0] != epoch:
                continue
            if step is not None and parsed[1] != step:
                continue
            path = entry.location
            try:
                read_info(path, self._store.backend)
            except CheckpointError:
                raise
            except (OSError, KeyError, TypeError, ValueError) as exc:
                raise CorruptCheckpointError(f"the checkpoint for {wanted}, {path}, cannot be read: {exc}") from exc

    # ------------------------------------------------------------------ loading

    def _read(self, info: CheckpointInfo, **options: Any) -> dict[str, Any]:
        """Read ``info``; when another writer replaces it mid-read, read the replacement instead.

        A re-save swaps the whole directory, so a reader can open some files of the old checkpoint
        and some of the new one. The recorded checksums catch that; then the checkpoint is listed
        again, and only a mismatch against an unchanged listing is real damage.
        """
        for _ in range(4):
            try:
                return read_checkpoint(info, **options)
            except CorruptCheckpointError:
                current = next((c for c in self.checkpoints() if c.name == info.name), None)
                if current is None:
                    raise _DeletedWhileReading(f"{info.path} was deleted while it was being read") from None
                if current.files == info.files:
                    raise
                info = current
        return read_checkpoint(info, **options)

    def _load_signed(
        self, choose: Callable[[list[CheckpointInfo]], CheckpointInfo | None], public_key: Any, **options: Any
    ) -> dict[str, Any] | None:
        """Load the checkpoint ``choose`` picks, with every value from bytes its signature covers.

        ``choose`` picks from :meth:`_checkpoints_read_here` (never from the summary cache alone).
        The chosen checkpoint is read once into private memory, its signature checked over those
        bytes, and the checkpoint decoded from them (see :func:`~ckpt_plugin.signing.read_signed`).
        Its signed ``metadata.json`` must name it (a signed ``epoch_1`` under ``epoch_7`` is
        refused) and agree with what chose it; when it does not (the checkpoint was replaced
        meanwhile), the choice is made again from a fresh read of the directory.
        """
        for _ in range(4):
            candidates = [info for info in self._checkpoints_read_here() if _named_for(info)]
            info = choose(candidates)
            if info is None:
                return None
            checkpoint, signed = self._read_signed(info, public_key, **options)
            if listing.summary(signed) == listing.summary(info):
                return checkpoint
            self._listing.pop(info.name, None)
        raise CorruptCheckpointError(
            f"the checkpoints in {self.checkpoint_dir} kept changing while a signed load chose among them; retry"
        )

    def _read_signed(self, info: CheckpointInfo, public_key: Any, **options: Any) -> tuple[dict[str, Any], CheckpointInfo]:
        """Read ``info`` once, verify its signature over those bytes, and decode them: the checkpoint
        and its :class:`CheckpointInfo` as its signed ``metadata.json`` says."""
        copy = signing.read_signed(info.backend, info.location, public_key)
        signed = read_info(info.location, copy)
        if not _named_for(signed):
            raise SignatureError(
                f"{info.location} holds the signed checkpoint {checkpoint_name(signed.epoch, signed.step)}, not "
                f"{signed.name}; a signature vouches for a checkpoint's content and its metadata.json names it. "
                "Move it back under its own name, or delete it"
            )
        return read_checkpoint(signed, **options), signed

    def _read_chosen(self, choose: Callable[[], CheckpointInfo | None], **options: Any) -> dict[str, Any] | None:
        """Read the checkpoint ``choose`` picks (None when it picks none); when retention deletes it
        while it is being read, pick again from what is left."""
        for _ in range(_CHOOSE_ATTEMPTS):
            info = choose()
            if info is None:
                return None
            try:
                return self._read(info, **options)
            except _DeletedWhileReading:
                continue
        raise CheckpointNotFoundError(
            f"{_CHOOSE_ATTEMPTS} checkpoints in {self.checkpoint_dir} were deleted while they were being read; "
            "another writer's retention keeps too few of them for this reader: raise its max_checkpoints, or retry"
        )

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
        return self._read(info, map_location=map_location, verify=verify, items=items)

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
        from .io.restore import apply_state  # the tensor machinery loads on first use

        apply_state(item, info.path, target.load_state_dict, state)

    def checkpoint_at(self, location: str | os.PathLike[str]) -> CheckpointInfo | None:
        """The checkpoint at ``location`` (a path or URL inside ``checkpoint_dir``, as
        :attr:`CheckpointInfo.path` gives it), or None when nothing committed is there."""
        self._settle()
        if not self.remote:
            path = Path(location)
            return read_info(path, self._store.backend) if (path / METADATA_FILE).is_file() else None
        wanted = str(location).rstrip("/")
        return next((info for info in self.checkpoints() if info.location.rstrip("/") == wanted), None)

    def load(
        self, epoch: int, step: int | None = None, *, map_location: Device = None, verify: bool = True, verify_with: Any = None
    ) -> dict[str, Any]:
        """Load the checkpoint of ``epoch`` (and ``step``), or raise :class:`CheckpointNotFoundError`
        naming the epochs that exist. With ``verify_with`` (a public key's PEM file) the checkpoint's
        signature must verify first (:class:`SignatureError` otherwise), and every value returned
        comes from the bytes it covers."""
        self._settle()
        if verify_with is not None:
            loaded = self._load_signed(lambda found: self._find_in(found, epoch, step), verify_with, map_location=map_location)
            assert loaded is not None
            return loaded
        return self._read(self.find(epoch, step), map_location=map_location, verify=verify)

    def load_latest(self, *, map_location: Device = None, verify: bool = True, verify_with: Any = None) -> dict[str, Any] | None:
        """Load the most recent checkpoint, or return None when the directory holds none. When another
        writer's retention deletes it while it is being read, the next most recent is loaded. With
        ``verify_with`` see :meth:`load`: the most recent checkpoint by the signed names and metadata."""
        self._settle()
        if verify_with is not None:
            return self._load_signed(_newest, verify_with, map_location=map_location)
        return self._read_chosen(self.latest, map_location=map_location, verify=verify)

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
        if verify_with is not None:
            return self._load_signed(lambda found: self._best_of(found, metric, mode), verify_with, map_location=map_location)
        return self._read_chosen(lambda: self.best(metric, mode), map_location=map_location, verify=verify)

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
        info = self.resolve(which)
        if info is None:
            return None
        if _collective(model):
            from .distributed.collective import restore_sharded

            restore_sharded(self, info, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng)
            return info
        if info.sharded:
            self._restore_consolidated(info, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng)
            return info
        from .io.restore import restore_checkpoint  # the tensor machinery loads on first use

        restore_checkpoint(
            info,
            model,
            optimizer,
            scheduler,
            strict=strict,
            restore_rng=restore_rng,
            atomic=atomic,
            sharded_reader=read_sharded_items,
        )
        return info

    def _restore_consolidated(
        self, info: CheckpointInfo, model: torch.nn.Module, optimizer: Any, scheduler: Any, *, strict: bool, restore_rng: bool
    ) -> None:
        """Restore a sharded checkpoint into plain (unsharded) objects in one process."""
        wanted = ("model",) + (("optimizer",) if optimizer is not None else ()) + (("scheduler",) if scheduler is not None else ())
        checkpoint = self._read(info, items=wanted + (("rng",) if restore_rng else ()))
        for item in wanted:
            if checkpoint.get(item) is None:
                raise CheckpointNotFoundError(f"{info.path} holds no {item} state; pass {item}=None to restore without it")
        model.load_state_dict(checkpoint["model"], strict=strict)
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if restore_rng and checkpoint.get("rng") is not None:
            restore_rng_state(checkpoint["rng"])

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


def _newest(found: list[CheckpointInfo]) -> CheckpointInfo | None:
    return found[-1] if found else None


def _ranges(numbers: list[int]) -> str:
    """Sorted whole numbers, a run of more than four written as its ends: ``[0, 1, 2, 3, 4, 5, 8, 9]``
    as ``"0-5, 8, 9"``, so that a message about a long run stays one line."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 4 else ", ".join(map(str, run)) for run in runs)


def _named_for(info: CheckpointInfo) -> bool:
    """Whether ``info``'s name is the one its metadata's epoch and step give it."""
    return info.name == checkpoint_name(info.epoch, info.step)


def _collective(model: Any) -> bool:
    """Whether a save or restore of these objects is collective: a distributed job with DTensors."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    from .distributed.collective import holds_dtensors

    return holds_dtensors(model)


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


def _notify(info: CheckpointInfo, on_commit: Callable[[CheckpointInfo], None] | None) -> CheckpointInfo:
    if on_commit is not None:
        on_commit(info)
    return info


def _current_dir() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def _whole_number(value: Any, name: str) -> int:
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a whole number of at least 0, not {value!r}")
    return int(value)


def _state_of(obj: Any, label: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict):
        return state_dict()
    raise ConfigurationError(f"{label} must be an object with state_dict() or a state dict, not {type(obj).__name__}")


def normalize_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as plain numbers: one-element tensors and numpy scalars become floats (ints stay ints).

    Raises :class:`EncodingError` for a metric that is not a single number.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise EncodingError(f"metrics must be a dict of metric name to number, not {type(metrics).__name__}")
    normalized: dict[str, Any] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise EncodingError(f"metric names must be strings, not {name!r}")
        normalized[name] = _scalar(name, value)
    return normalized


def _scalar(name: str, value: Any) -> Any:
    import torch

    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):  # subclasses such as np.float64 become plain numbers
        return float(value) if isinstance(value, float) else _ranked_int(name, int(value))
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise EncodingError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}; log one number per metric")
        return float(value.detach().cpu().item())
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "size", 1) == 1:
        result = item()
        if isinstance(result, (bool, int, float)):
            return _scalar(name, result)
    raise EncodingError(f"metric {name!r} is {value!r}, not a number; log one number per metric")


def _ranked_int(name: str, value: int) -> int:
    """``value``, if a float can hold it (checkpoints are ranked by their metrics as floats)."""
    try:
        float(value)
    except OverflowError:
        raise ConfigurationError(
            f"metric {name!r} is a whole number of {value.bit_length()} bits, too large for a float to rank; "
            "log it as a float or on a smaller scale"
        ) from None
    return value


def config_to_dict(config: Any) -> Any:
    """Plain data for ``config``: objects with ``to_dict()``, dataclasses and namespaces are converted."""
    if config is None or isinstance(config, (Mapping, list, tuple, str, int, float, bool)):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "__dict__"):
        return {key: value for key, value in vars(config).items() if not key.startswith("_")}
    return config


__all__ = ["CheckpointManager", "check_top_k", "config_to_dict", "normalize_metrics"]
