"""A distributed sampler whose position in an epoch resumes at any world size.

    sampler = ResumableDistributedSampler(dataset, seed=0)          # rank and world size from torch.distributed
    loader = StatefulDataLoader(dataset, batch_size=32, sampler=sampler)

It draws the order of ``DistributedSampler``: the seed and the epoch decide one permutation of the
dataset, and rank ``r`` of ``W`` takes every ``W``-th sample of it from ``r`` on. Its state is plain
data (the seed, the epoch, the dataset's size, the layout and how many samples this rank has
yielded), which a checkpoint holds as JSON. Every rank of a data-parallel job trains on the same
number of batches, and each rank's share has the same size, so one rank's position tells how far
every rank got: the first ``yielded × W`` samples of the order (from where the layout began) are
consumed. A resume at another world size therefore splits the rest of the epoch over the new ranks,
each remaining sample exactly once (padded as ``DistributedSampler`` pads, unless ``drop_last``), and
the next epochs are plain ``DistributedSampler`` epochs at the new size. At the same world size it
continues the interrupted order exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from .errors import IncompatibleCheckpointError

STATE_FORMAT = 1
STATE_KEY = "resumable_distributed_sampler"
"""The key whose value (the state's format) marks a :class:`ResumableDistributedSampler` state."""


@dataclass(frozen=True)
class EpochLayout:
    """How one epoch's order is shared out: from position ``start`` of the order on, over ``num_replicas`` ranks."""

    num_replicas: int
    start: int = 0

    def rest(self, order: list[int], drop_last: bool) -> list[int]:
        """The part of ``order`` this layout shares out, padded or cut to a multiple of the ranks."""
        rest = order[self.start :]
        if drop_last:
            return rest[: len(rest) - len(rest) % self.num_replicas]
        padding = -len(rest) % self.num_replicas
        if padding and rest:
            rest = rest + (rest * math.ceil(padding / len(rest)))[:padding]
        return rest

    def share(self, size: int, drop_last: bool) -> int:
        """How many samples each rank takes in this layout of an epoch of ``size`` samples."""
        rest = size - self.start
        return rest // self.num_replicas if drop_last else math.ceil(rest / self.num_replicas)

    def after(self, yielded: int, size: int, num_replicas: int) -> EpochLayout:
        """The layout over ``num_replicas`` ranks that continues this one once each rank yielded ``yielded``."""
        consumed = min(yielded * self.num_replicas, size - self.start)
        return EpochLayout(num_replicas=num_replicas, start=self.start + consumed)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler``'s order, with a position that resumes mid-epoch at any world size.

    Args are those of ``torch.utils.data.DistributedSampler``; without an initialized process group
    the sampler is the only rank of one. Put it in a
    ``torchdata.stateful_dataloader.StatefulDataLoader`` (``sampler=``), which saves its
    :meth:`state_dict` with the loader's, and call :meth:`set_epoch` at each epoch as with
    ``DistributedSampler`` (Lightning and the training loops of the guides do). Lightning leaves a
    ``DistributedSampler`` given to it in place.

    :meth:`load_state_dict` takes the state saved by any rank of the interrupted run: at the same
    world size the epoch continues in the same order, at another one the samples not yet trained
    are split over the ranks of this run; a loop that counts an epoch's batches then learns from
    :meth:`samples_left` how many the resumed epoch has left (the Lightning callback does so).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):  # one process
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.layout = EpochLayout(self.num_replicas)
        self.yielded = 0
        self._resume: int | None = None  # the position to continue from at the next iteration

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self._resume is None:
            self.layout, self.yielded = EpochLayout(self.num_replicas), 0
        self.yielded, self._resume = self._resume or 0, None
        mine = self.layout.rest(order, self.drop_last)[self.rank :: self.num_replicas]
        for index in mine[self.yielded :]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        """This rank's samples in a fresh epoch, as ``DistributedSampler`` counts them (see :meth:`samples_left`)."""
        return EpochLayout(self.num_replicas).share(len(self.dataset), self.drop_last)  # type: ignore[arg-type]

    def samples_left(self) -> int:
        """This rank's samples not yet yielded in the current epoch. After a resume at another world
        size a loop cannot tell them from ``len()`` (a fresh epoch's count) and the samples it
        counted before the resume, which were counted in the interrupted layout."""
        size = len(self.dataset)  # type: ignore[arg-type]
        yielded = self.yielded if self._resume is None else self._resume
        return max(self.layout.share(size, self.drop_last) - yielded, 0)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``; the position a state put back holds only for the epoch it was saved in."""
        if epoch != self.epoch:
            self.layout, self.yielded, self._resume = EpochLayout(self.num_replicas), 0, None
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The position as plain data: the epoch's order (seed, epoch, size), its layout, and the samples yielded."""
        return {
            STATE_KEY: STATE_FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "layout": asdict(self.layout),
            "yielded": self.yielded,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the epoch of ``state`` (from any rank, at any world size) at the next iteration."""
        self._check(state)
        saved, yielded, size = EpochLayout(**state["layout"]), int(state["yielded"]), int(state["dataset_size"])
        if yielded >= saved.share(size, self.drop_last):
            return  # saved at the end of its epoch: nothing of it is left
        self.epoch = int(state["epoch"])
        if saved.num_replicas == self.num_replicas:
            self.layout, self._resume = saved, yielded
        else:
            self.layout, self._resume = saved.after(yielded, size, self.num_replicas), 0
        self.yielded = self._resume

    def _order(self) -> list[int]:
        """The epoch's permutation, as ``DistributedSampler`` draws it."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return list(range(size))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(size, generator=generator).tolist()

    def _check(self, state: Mapping[str, Any]) -> None:
        if state.get(STATE_KEY) != STATE_FORMAT:
            raise IncompatibleCheckpointError(
                f"not a ResumableDistributedSampler state of format {STATE_FORMAT}: {sorted(state)!r}"
            )
        mine = {"seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last, "dataset_size": len(self.dataset)}  # type: ignore[arg-type]
        differing = {name: (state.get(name), value) for name, value in mine.items() if state.get(name) != value}
        if differing:
            found = ", ".join(f"{name} {saved!r} (this sampler: {value!r})" for name, (saved, value) in differing.items())
            raise IncompatibleCheckpointError(
                f"the saved sampler position belongs to another order: {found}; the rest of its epoch cannot be "
                "told apart from the samples already trained. Build the sampler as the interrupted run did"
            )


__all__ = ["ResumableDistributedSampler"]
