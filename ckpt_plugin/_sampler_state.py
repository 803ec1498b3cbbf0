"""The random generators a data loader's samplers draw their order from, kept as tensors.

A shuffling sampler that owns a ``torch.Generator`` (torchdata's ``RandomSampler`` seeds one of its
own when the loader is built; torch's takes the loader's ``generator=``) draws each epoch's order
from it, and moves it on once an epoch has drawn. A run resumed from a checkpoint taken at an
epoch's end builds its loader afresh, so its sampler would start from a newly seeded generator: the
next epoch's order would differ from the uninterrupted run's. Keeping each generator's state (a
``uint8`` tensor, never pickled) at the epoch's end and putting it back before the next epoch draws
gives that epoch the uninterrupted run's order.

Nothing here imports a training framework; the callbacks hand in the loaders.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def generators(loader: Any) -> list[Any]:
    """The distinct ``torch.Generator`` objects of ``loader``'s sampler and batch sampler, in that order."""
    import torch  # already imported by whoever built a loader

    batch_sampler = getattr(loader, "batch_sampler", None)
    found: list[Any] = []
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        generator = getattr(sampler, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not known for known in found):
            found.append(generator)
    return found


def capture(loaders: Iterable[Any]) -> list[list[Any]]:
    """Each loader's sampler generator states (see :func:`generators`), one list per loader."""
    return [[generator.get_state() for generator in generators(loader)] for loader in loaders]


def restore(loaders: Sequence[Any], states: Sequence[Sequence[Any]]) -> bool:
    """Put the states from :func:`capture` back; False (and nothing changed) unless they fit ``loaders``.

    They fit when there are as many loaders, each with as many sampler generators, as when captured,
    and at least one generator: another data pipeline is left to its own order."""
    targets = [generators(loader) for loader in loaders]
    if len(targets) != len(states) or any(len(found) != len(saved) for found, saved in zip(targets, states)):
        return False
    if not any(targets):
        return False
    for found, saved in zip(targets, states):
        for generator, state in zip(found, saved):
            generator.set_state(state)
    return True


__all__ = ["capture", "generators", "restore"]
