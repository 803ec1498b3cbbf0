"""Choosing and reading checkpoints for :class:`~ckpt_plugin.CheckpointManager`: ranking (best,
latest, by epoch), reads that survive a concurrent re-save or deletion, signed loads whose every
value comes from verified bytes, and the restore of a sharded checkpoint into plain objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _listing as listing, _retention as retention, signing
from ._options import DEFAULT_METRIC, SaveSettings
from ._store import CheckpointStore, newest
from .errors import CheckpointError, CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError, SignatureError
from ._format.names import checkpoint_name, parse_checkpoint_name
from ._io.info import CheckpointInfo
from ._io.reader import read_info
from ._io.rng import restore_rng_state
from ._reading import read_checkpoint, read_sharded_items

__all__ = ["CHOOSE_ATTEMPTS", "DeletedWhileReading", "Loader", "named_for", "newest", "ranges"]

CHOOSE_ATTEMPTS = 20
"""How many checkpoints ``load_latest`` and ``load_best`` try when each is deleted while it is
being read."""


class DeletedWhileReading(CheckpointNotFoundError):
    """The checkpoint being read was deleted meanwhile (by retention, say)."""


class Loader:
    """Chooses and reads the checkpoints of ``store`` as a manager with ``settings`` ranks them."""

    def __init__(self, store: CheckpointStore, settings: SaveSettings) -> None:
        self.store = store
        self.settings = settings

    # ------------------------------------------------------------------ choosing

    def ranking(self, found: list[CheckpointInfo], metric: str | None, mode: str | None) -> tuple[str, str]:
        """The metric and mode that ``best`` ranks by: those given, else the manager's
        ``metric_for_best``, else the one the checkpoints recorded (with its mode unless the
        manager was given one), else ``"loss"``."""
        if metric is None and self.settings.metric_for_best is not None:
            metric = self.settings.metric_for_best
        if metric is None:
            recorded = next((info for info in reversed(found) if info.metric_for_best is not None), None)
            if recorded is not None:
                metric = recorded.metric_for_best
                if mode is None and not self.settings.mode_given:
                    mode = recorded.mode
        return (metric if metric is not None else DEFAULT_METRIC), (mode if mode is not None else self.settings.mode)

    def best_of(self, found: list[CheckpointInfo], metric: str | None, mode: str | None) -> CheckpointInfo | None:
        """The best of ``found`` by ``metric`` in ``mode`` (see :meth:`ranking`)."""
        metric, mode = self.ranking(found, metric, mode)
        if mode not in retention.MODES:
            raise ConfigurationError(f"mode must be 'min' or 'max', not {mode!r}")
        if not found:
            return None
        index = retention.best_index(found, metric, mode)
        if index is None:
            recorded = sorted({name for info in found for name in info.metrics})
            raise CheckpointNotFoundError(
                f"no checkpoint in {self.store.location} records a number for metric {metric!r}; "
                f"recorded metrics: {', '.join(recorded) or 'none'}"
            )
        return found[index]

    def find_in(self, found: list[CheckpointInfo], epoch: int, step: int | None) -> CheckpointInfo:
        """The checkpoint of ``epoch`` (its last step unless ``step`` is given) among ``found``."""
        matches = [info for info in found if info.epoch == epoch and (step is None or info.step == step)]
        if matches:
            return matches[-1]
        wanted = f"epoch {epoch}" + ("" if step is None else f" step {step}")
        self._raise_if_unreadable(epoch, step, wanted)
        steps = sorted({info.step for info in found if info.epoch == epoch and info.step is not None})
        existing = (
            f"epoch {epoch} has step{'s' if len(steps) > 1 else ''} {ranges(steps)}" if steps
            else f"existing epochs: {ranges(sorted({info.epoch for info in found})) or 'none'}"
        )
        raise CheckpointNotFoundError(f"no checkpoint for {wanted} in {self.store.location}; {existing}")

    def _raise_if_unreadable(self, epoch: int, step: int | None, wanted: str) -> None:
        """Say why a directory on disk for ``epoch`` (and ``step``) is not listed as a checkpoint."""
        for entry in self.store.visible():
            parsed = parse_checkpoint_name(entry.name)
            if parsed is None or parsed[0] != epoch or (step is not None and parsed[1] != step):
                continue
            path = entry.location
            try:
                read_info(path, self.store.backend)
            except CheckpointError:
                raise
            except (OSError, KeyError, TypeError, ValueError) as exc:
                raise CorruptCheckpointError(f"the checkpoint for {wanted}, {path}, cannot be read: {exc}") from exc

    # ------------------------------------------------------------------ reading

    def read(self, info: CheckpointInfo, **options: Any) -> dict[str, Any]:
        """Read ``info``; when another writer replaces it mid-read, read the replacement instead.

        A re-save swaps the whole directory, so a reader can open some files of the old checkpoint
        and some of the new one. The recorded checksums catch that; then the checkpoint is listed
        again, and only a mismatch against an unchanged listing is real damage.
        """
        for _ in range(4):
            try:
                return read_checkpoint(info, **options)
            except CorruptCheckpointError:
                current = next((c for c in self.store.checkpoints() if c.name == info.name), None)
                if current is None:
                    raise DeletedWhileReading(f"{info.path} was deleted while it was being read") from None
                if current.files == info.files:
                    raise
                info = current
        return read_checkpoint(info, **options)

    def read_chosen(self, choose: Callable[[], CheckpointInfo | None], **options: Any) -> dict[str, Any] | None:
        """Read the checkpoint ``choose`` picks (None when it picks none); when retention deletes it
        while it is being read, pick again from what is left."""
        for _ in range(CHOOSE_ATTEMPTS):
            info = choose()
            if info is None:
                return None
            try:
                return self.read(info, **options)
            except DeletedWhileReading:
                continue
        raise CheckpointNotFoundError(
            f"{CHOOSE_ATTEMPTS} checkpoints in {self.store.location} were deleted while they were being read; "
            "another writer's retention keeps too few of them for this reader: raise its max_checkpoints, or retry"
        )

    def load_signed(
        self, choose: Callable[[list[CheckpointInfo]], CheckpointInfo | None], public_key: Any, **options: Any
    ) -> dict[str, Any] | None:
        """Load the checkpoint ``choose`` picks, with every value from bytes its signature covers.

        ``choose`` picks from the store's checkpoints as their own ``metadata.json`` says (never
        from the summary cache alone). The chosen checkpoint is read once into private memory, its
        signature checked over those bytes, and the checkpoint decoded from them (see
        :func:`~ckpt_plugin.signing.read_signed`). Its signed ``metadata.json`` must name it (a
        signed ``epoch_1`` under ``epoch_7`` is refused) and agree with what chose it; when it does
        not (the checkpoint was replaced meanwhile), the choice is made again from a fresh read.
        """
        for _ in range(4):
            candidates = [info for info in self.store.checkpoints_from_metadata() if named_for(info)]
            info = choose(candidates)
            if info is None:
                return None
            checkpoint, signed = self._read_signed(info, public_key, **options)
            if listing.summary(signed) == listing.summary(info):
                return checkpoint
            self.store.forget(info.name)
        raise CorruptCheckpointError(
            f"the checkpoints in {self.store.location} kept changing while a signed load chose among them; retry"
        )

    def _read_signed(self, info: CheckpointInfo, public_key: Any, **options: Any) -> tuple[dict[str, Any], CheckpointInfo]:
        """Read ``info`` once, verify its signature over those bytes, and decode them: the checkpoint
        and its :class:`CheckpointInfo` as its signed ``metadata.json`` says."""
        copy = signing.read_signed(info.backend, info.location, public_key)
        signed = read_info(info.location, copy)
        if not named_for(signed):
            raise SignatureError(
                f"{info.location} holds the signed checkpoint {checkpoint_name(signed.epoch, signed.step)}, not "
                f"{signed.name}; a signature vouches for a checkpoint's content and its metadata.json names it. "
                "Move it back under its own name, or delete it"
            )
        return read_checkpoint(signed, **options), signed

    # ------------------------------------------------------------------ restoring

    def restore(
        self, info: CheckpointInfo, model: Any, optimizer: Any, scheduler: Any, *, strict: bool, restore_rng: bool,
        atomic: bool, collective: bool,
    ) -> None:
        """Load ``info`` straight into live objects (see ``CheckpointManager.restore``): collectively
        when the model is sharded across ranks, consolidated when the checkpoint is sharded but the
        objects are not, else through the single-pass restore of :mod:`ckpt_plugin._io.restore`."""
        if collective:
            from ._distributed.collective import restore_sharded

            restore_sharded(self.settings, info, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng)
        elif info.sharded:
            self.restore_consolidated(info, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng)
        else:
            from ._io.restore import restore_checkpoint  # the tensor machinery loads on first use

            restore_checkpoint(
                info, model, optimizer, scheduler, strict=strict, restore_rng=restore_rng, atomic=atomic,
                sharded_reader=read_sharded_items,
            )

    def restore_consolidated(
        self, info: CheckpointInfo, model: Any, optimizer: Any, scheduler: Any, *, strict: bool, restore_rng: bool
    ) -> None:
        """Restore a sharded checkpoint into plain (unsharded) objects in one process."""
        wanted = ("model",) + (("optimizer",) if optimizer is not None else ()) + (("scheduler",) if scheduler is not None else ())
        checkpoint = self.read(info, items=wanted + (("rng",) if restore_rng else ()))
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


def ranges(numbers: list[int]) -> str:
    """Sorted whole numbers, a run of more than four written as its ends: ``[0, 1, 2, 3, 4, 5, 8, 9]``
    as ``"0-5, 8, 9"``, so that a message about a long run stays one line."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 4 else ", ".join(map(str, run)) for run in runs)


def named_for(info: CheckpointInfo) -> bool:
    """Whether ``info``'s name is the one its metadata's epoch and step give it."""
    return info.name == checkpoint_name(info.epoch, info.step)
