"""Where Lightning's own record of the training loaders' position is not exact, the callback's.

Lightning keeps a stateful training loader's ``state_dict()`` in every checkpoint (in the fit
loop's state, ``combined_loader``) and hands it back on a resume inside an epoch. Two cases are
not exact, and :class:`LoaderPositions` corrects them from public hooks, patching nothing:

- **An epoch's end.** Lightning loads no loader state when the epoch resumed from had finished, and
  builds the loader (and its first iterator) before any callback hook runs. A sampler with its own
  generator (torchdata's ``RandomSampler``) then draws the next epoch from a newly seeded one. The
  callback keeps the generators' states (:mod:`ckpt_plugin._sampler_state`) in its own state at an
  epoch's end; when the next epoch starts after a resume it puts them and the global RNG states back
  and starts the epoch's iterator again, as Lightning itself does at every other epoch's start.
- **A loader without a length.** Lightning's data fetcher then reads one batch ahead to find the
  epoch's end, so the loader's ``state_dict()`` at a save is one batch past the last one trained.
  The callback keeps each batch's loader states until the next batch ends, and a save inside the
  epoch puts those (the position after the last batch trained) into the checkpoint instead. The
  first batch of a later epoch has no such states (the fetcher reads the second batch before any
  hook runs), so a save there keeps Lightning's and warns.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _data_state as data_state, _sampler_state as sampler_state
from ._io.rng import restore_rng_state

if TYPE_CHECKING:  # the Lightning callback hands in what it needs of Lightning: this module imports none of it
    import lightning.pytorch as pl

LOOKAHEAD_WARNING = (
    "this checkpoint is taken after the first batch of an epoch whose training loader has no length: Lightning "
    "has already read the epoch's second batch, so the loader position saved is one batch past the last one "
    "trained and a resume from it misses that batch. Give the dataset a __len__ (Lightning then reads no batch "
    "ahead) to resume every checkpoint exactly"
)


def _reads_ahead(trainer: pl.Trainer) -> bool:
    """Whether Lightning's fetcher reads one batch ahead: a loader without a length, batches fetched for the step."""
    if trainer.num_training_batches != float("inf"):
        return False
    return "dataloader_iter" not in inspect.signature(trainer.lightning_module.training_step).parameters


class LoaderPositions:
    """The corrections above, for one :class:`~ckpt_plugin.lightning.CheckpointCallback`.

    ``train_loaders`` gives a trainer's training loaders, flattened as Lightning orders them in its
    checkpoint, and ``warn`` shows a warning once per job (Lightning's ``rank_zero_warn``)."""

    def __init__(self, train_loaders: Callable[[pl.Trainer], list[Any]], warn: Callable[[str], Any]) -> None:
        self.train_loaders = train_loaders
        self.warn = warn
        self.at_epoch_end: tuple[dict[str, Any], list[list[Any]]] | None = None
        self.last_trained: list[dict[str, Any]] | None = None
        self.fresh_iterator = False
        self.warned = False

    # ------------------------------------------------------------------ an epoch's end

    def generators_to_save(self, trainer: pl.Trainer) -> list[list[Any]] | None:
        """The sampler generators' states, taken at an epoch's end (None when no sampler has one)."""
        states = sampler_state.capture(self.train_loaders(trainer))
        return states if any(states) else None

    def resumed_at_epoch_end(self, rng: dict[str, Any], generators: list[list[Any]]) -> None:
        """Restore these at the next epoch's start (:meth:`epoch_started`)."""
        self.at_epoch_end = (rng, generators)

    def epoch_started(self, trainer: pl.Trainer) -> None:
        """After an epoch-end resume, draw the epoch from the saved generators."""
        resumed, self.at_epoch_end = self.at_epoch_end, None
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if resumed is not None and fetcher is not None and sampler_state.restore(self.train_loaders(trainer), resumed[1]):
            restore_rng_state(resumed[0])  # the new iterator draws its worker seeds from it, as the uninterrupted run did
            iter(fetcher)  # Lightning built this epoch's iterator before any hook ran: build it again
            self.fresh_iterator, self.last_trained = True, self._states(trainer)
        if not self.fresh_iterator:  # a later epoch: its iterator comes after this hook
            self.last_trained = None
        self.fresh_iterator = False

    # ------------------------------------------------------------------ a loader without a length

    def batch_ended(self, trainer: pl.Trainer) -> None:
        """Keep the loader states of now: the position after the batch the next step trains on."""
        self.last_trained = self._states(trainer)

    def correct(self, trainer: pl.Trainer, checkpoint: dict[str, Any], mid_epoch: bool) -> None:
        """Put the position after the last batch trained into ``checkpoint`` (a save inside an epoch)."""
        if not (mid_epoch and _reads_ahead(trainer)):
            return
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if "combined_loader" not in fit_state:
            return
        if self.last_trained is None:
            if not self.warned:
                self.warned = True
                self.warn(LOOKAHEAD_WARNING)
            return
        fit_state["combined_loader"] = self.last_trained

    def _states(self, trainer: pl.Trainer) -> list[dict[str, Any]] | None:
        if not _reads_ahead(trainer):
            return None
        loaders = [loader for loader in self.train_loaders(trainer) if data_state.is_stateful(loader)]
        return [copy.deepcopy(loader.state_dict()) for loader in loaders] or None

    def fit_started(self, trainer: pl.Trainer) -> None:
        """Training starts: Lightning's first iterator exists and has read its first batch."""
        self.fresh_iterator, self.last_trained = True, self._states(trainer)

    def ended(self) -> None:
        self.at_epoch_end = self.last_trained = None


__all__ = ["LOOKAHEAD_WARNING", "LoaderPositions"]
